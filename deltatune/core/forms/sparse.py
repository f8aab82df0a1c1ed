"""Sparse form: k (flat index, value) pairs on one base tensor, W = W0 + scatter(indices, values).

On Linear / GPT-2 Conv1D / Embedding weights the module's forward is replaced by one autograd
function that builds W0 + Δ for this layer only, runs the module's own operation with it, and in
backward rebuilds it again (nothing of size m·n is kept between forward and backward). The
gradient of ``values`` is the layer's weight gradient gathered at ``indices``; that dense
gradient exists for one layer at a time, inside backward, and is dropped right after (a policy
may look at it first through ``grad_observer``: SpIEL's candidate statistics). Any other tensor
(a bias, a norm) is parametrised as W0 + scatter(...), which autograd differentiates the same way.

On a quantized base (``deltatune.core.quantized``) W0 is the dequantized weight, built in forward and again in
backward like W0 + Δ itself, as the SpIEL paper's quantized variant adds the sparse values to the dequantized
weight: nothing of size m·n is kept between calls either way.

``indices`` are int32 where the tensor has fewer than 2^31 entries, unique, in the base tensor's
own layout (Conv1D: (in, out)). A form's k may change on load (LT-SFT and LIFT store the support
they ended with), so loading resizes ``indices`` and ``values`` in place.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from deltatune.core.forms.base import WeightDelta, refuse_quantized_merge
from deltatune.errors import DeltatuneError

GradObserver = Callable[["Sparse", torch.Tensor], None]


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def random_indices(numel: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k distinct flat positions in [0, numel), sorted."""
    if not 0 <= k <= numel:
        raise DeltatuneError(f"cannot choose {k} distinct entries of a tensor with {numel}")
    if k == 0:
        return torch.empty(0, dtype=index_dtype(numel))
    if numel <= 1 << 26:
        picked = torch.randperm(numel, generator=generator)[:k]
    else:  # randperm of a huge tensor costs 8 bytes per entry: draw with rejection instead
        picked = torch.empty(0, dtype=torch.long)
        while picked.numel() < k:
            more = torch.randint(numel, (2 * (k - picked.numel()) + 16,), generator=generator)
            picked = torch.unique(torch.cat([picked, more]))
        picked = picked[torch.randperm(picked.numel(), generator=generator)[:k]]
    return picked.sort().values.to(index_dtype(numel))


def split_budget(total: int, sizes: list[int]) -> list[int]:
    """Share ``total`` entries over tensors in proportion to their sizes: floors, then the remainder
    one by one to the largest fractional parts, so the shares sum to ``total`` exactly (capped by size)."""
    whole = sum(sizes)
    if whole == 0:
        return [0] * len(sizes)
    total = min(total, whole)
    exact = [total * s / whole for s in sizes]
    shares = [int(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda i: exact[i] - shares[i], reverse=True)
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return [min(s, n) for s, n in zip(shares, sizes, strict=True)]


def sparse_sum(
    idx_a: torch.Tensor, val_a: torch.Tensor, idx_b: torch.Tensor, val_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sparse deltas of one tensor added: the union of their indices, values summed where both have one."""
    both = torch.cat([idx_a.long(), idx_b.long()])
    union, inverse = torch.unique(both, sorted=True, return_inverse=True)
    values = torch.zeros(union.numel(), dtype=torch.promote_types(val_a.dtype, val_b.dtype), device=val_a.device)
    values.index_add_(0, inverse, torch.cat([val_a.to(values.dtype), val_b.to(values.dtype)]))
    return union.to(idx_a.dtype), values


def _compute_dtype(x: torch.Tensor, form: Sparse) -> torch.dtype:
    """The dtype the base module would compute in (autocast's, when autocast is on; a quantized layer's
    compute dtype, not its packed storage's)."""
    kind = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return form.base_dtype


class _SparseWeightForward(torch.autograd.Function):
    """``module(x)`` computed with W0 + scatter(indices, values); returns grads for x, values, bias (and
    W0 itself if something else trains it)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, values: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                indices: torch.Tensor, module: nn.Module, form: Sparse) -> torch.Tensor:
        dtype = _compute_dtype(x, form)
        ctx.module, ctx.form, ctx.dtype, ctx.x_dtype = module, form, dtype, x.dtype
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, values, weight, indices)
        with torch.autocast(x.device.type, enabled=False):
            w = form.effective_weight(dtype)
            return form.op(module, x, w, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        x, values, weight, indices = ctx.saved_tensors
        form: Sparse = ctx.form
        need_x, need_values, need_weight, need_bias = ctx.needs_input_grad[:4]
        gy = grad_out.to(ctx.dtype)
        grad_x = grad_values = grad_weight = grad_bias = None
        if need_x:
            w = form.effective_weight(ctx.dtype)
            grad_x = form.op_grad_input(ctx.module, gy, w).to(ctx.x_dtype)
            del w
        if need_values and not need_weight and form.grad_observer is None and form.can_sample(ctx.module):
            # only the k entries: a sampled matmul, no m×n gradient at all
            grad_values = (form.sampled_grad(ctx.module, x, gy) * form.scale).to(values.dtype)
        elif need_values or need_weight or form.grad_observer is not None:
            g_w = form.op_grad_weight(ctx.module, x, gy, torch.Size(form.shape))  # dense, this layer only
            if form.grad_observer is not None:
                form.grad_observer(form, g_w)
            if need_values:
                grad_values = (g_w.view(-1)[indices] * form.scale).to(values.dtype)
            if need_weight:
                grad_weight = g_w.to(weight.dtype)
            del g_w
        if ctx.has_bias and need_bias:
            grad_bias = gy.reshape(-1, gy.shape[-1]).sum(0)
        return grad_x, grad_values, grad_weight, grad_bias, None, None, None


class Sparse(WeightDelta):
    """k (index, value) pairs on one base tensor; values start at zero so the model starts at the base."""

    kind = "sparse"

    def __init__(
        self,
        sites: list[tuple[nn.Module, str]],
        param_name: str,
        k: int = 0,
        *,
        indices: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        scale: float = 1.0,
    ) -> None:
        super().__init__(sites, param_name)
        self.scale = float(scale)  # ΔW = scale · scatter(values) (DSEE's α/r on its sparse part)
        base = self.base
        self.shape = tuple(self.base_shape)  # a quantized weight's (out, in), not its packed storage's
        self.numel_base = math.prod(self.shape)
        if indices is None:
            indices = random_indices(self.numel_base, k, generator)
        indices = self._checked(indices.to(base.device))
        base_dtype = self.base_dtype
        dtype = dtype or (base_dtype if base_dtype in (torch.float32, torch.float64) else torch.float32)
        self.register_buffer("indices", indices)
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=dtype, device=base.device))
        self.grad_observer: GradObserver | None = None
        self._saved: torch.Tensor | None = None  # W0 at the indices while merged (exact unmerge)
        self._patched: list[nn.Module] = []

    # -- indices ------------------------------------------------------------------------------
    @property
    def k(self) -> int:
        return self.indices.numel()

    def _checked(self, indices: torch.Tensor) -> torch.Tensor:
        if indices.dim() != 1 or indices.is_floating_point():
            raise DeltatuneError(f"sparse indices of {self.param_name} must be a 1-d integer tensor")
        if indices.numel():
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= self.numel_base:
                raise DeltatuneError(
                    f"sparse index {hi if hi >= self.numel_base else lo} is outside {self.param_name} "
                    f"({self.numel_base} entries): the artifact was made for another base model"
                )
            if torch.unique(indices).numel() != indices.numel():
                raise DeltatuneError(f"sparse indices of {self.param_name} repeat an entry; each may appear once")
        return indices.to(index_dtype(self.numel_base))

    def set_support(self, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Replace the support (and values; zero if not given), keeping the tensors' identity so
        an optimizer holding ``values`` still holds it."""
        indices = self._checked(indices.to(self.indices.device))
        with torch.no_grad():
            self.indices.data = indices
            new = torch.zeros(indices.numel(), dtype=self.values.dtype, device=self.values.device)
            if values is not None:
                new.copy_(values)
            self.values.data = new

    def rows_cols(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, column) of every index in the base tensor's 2-d layout (1-d tensors: one row)."""
        n_cols = self.shape[-1] if len(self.shape) > 1 else self.numel_base
        idx = self.indices.long()
        return idx // n_cols, idx % n_cols

    # -- the delta as a dense tensor ----------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        flat = torch.zeros(self.numel_base, dtype=self.values.dtype, device=self.values.device)
        return flat.index_put((self.indices.long(),), self.values * self.scale).view(self.shape)

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every (index, value of ΔW) of this delta; subclasses with fixed entries add theirs (sums,
        composition and compression read a sparse delta through this)."""
        return self.indices, self.scaled_values()

    def scaled_values(self) -> torch.Tensor:
        return self.values.detach() * self.scale if self.scale != 1.0 else self.values.detach()

    def effective_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W0 + ΔW for this layer, as a fresh tensor (built in forward and again in backward, never kept).
        Subclasses with more fixed entries add them here."""
        # a quantized base: the dequantized matrix (fresh); else a copy, since the entries are added in place
        w = self.dense_base(dtype) if self.quantized else self.base.detach().to(dtype, copy=True)
        w.view(-1).index_add_(0, self.indices, self.scaled_values().to(dtype))
        return w

    def num_trainable(self) -> int:
        return self.k if self.values.requires_grad else 0

    def stored_bytes(self) -> int:
        return self.k * (self.indices.element_size() + self.values.element_size())

    def load_stored(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != {"indices", "values"} or tensors["indices"].numel() != tensors["values"].numel():
            raise DeltatuneError(
                f"a sparse delta of {self.param_name} needs 'indices' and 'values' of one length; got "
                + ", ".join(f"{n} {tuple(t.shape)}" for n, t in tensors.items())
            )
        self.set_support(tensors["indices"], tensors["values"])

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # checkpoints of policies that change k (resume) load into a form built with another k
        idx = state_dict.get(prefix + "indices")
        if idx is not None and idx.numel() != self.k:
            self.set_support(idx)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- forward --------------------------------------------------------------------------------
    def _functional(self) -> bool:
        return all(attr == "weight" and _op_kind(m) is not None for m, attr in self._sites)

    def attach(self) -> None:
        if self.attached:
            return
        if not self._functional():
            super().attach()  # parametrisation: W0 + delta_weight()
            return
        for module, _ in self._sites:
            if "forward" in module.__dict__:
                raise DeltatuneError(
                    f"{type(module).__name__} holding {self.param_name} already has a replaced forward (another "
                    "sparse delta): add the two sparse deltas into one (dt.compose) instead of stacking them"
                )
            module.forward = _bound_forward(self, module)  # type: ignore[method-assign]
            self._patched.append(module)
        self.attached = True

    def detach(self) -> None:
        if not self.attached:
            return
        if self._patched:
            for module in self._patched:
                module.__dict__.pop("forward", None)
            self._patched.clear()
            self.attached = False
            return
        super().detach()

    def op(self, module: nn.Module, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        kind = _op_kind(module)
        if kind == "linear":
            return F.linear(x.to(w.dtype), w, None if bias is None else bias.to(w.dtype))
        if kind == "conv1d":
            flat = x.reshape(-1, x.shape[-1]).to(w.dtype)
            out = flat @ w if bias is None else torch.addmm(bias.to(w.dtype), flat, w)
            return out.view(*x.shape[:-1], w.shape[1])
        e = module
        return F.embedding(x, w, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)

    def op_grad_input(self, module: nn.Module, gy: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        kind = _op_kind(module)
        if kind == "linear":
            return gy @ w
        return gy @ w.T  # conv1d; embeddings take integer input and are never asked

    def op_grad_weight(self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        kind = _op_kind(module)
        gy2 = gy.reshape(-1, gy.shape[-1])
        if kind == "embedding":
            ids = x.reshape(-1)
            if module.padding_idx is not None:
                gy2 = gy2 * (ids != module.padding_idx).unsqueeze(1).to(gy2.dtype)
            return torch.zeros(shape, dtype=gy2.dtype, device=gy2.device).index_add_(0, ids, gy2)
        x2 = x.reshape(-1, x.shape[-1]).to(gy2.dtype)
        return gy2.T @ x2 if kind == "linear" else x2.T @ gy2

    def can_sample(self, module: nn.Module) -> bool:
        return _op_kind(module) in ("linear", "conv1d") and len(self.shape) == 2 and self.k > 0

    def sampled_grad(self, module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
        """(∂L/∂W)[indices] without forming ∂L/∂W: torch's sampled dense-dense matmul (SDDMM) on the
        support as a CSR pattern (on CPU ~10× faster than the dense gradient at SpIEL's densities)."""
        gy2 = gy.reshape(-1, gy.shape[-1])
        x2 = x.reshape(-1, x.shape[-1]).to(gy2.dtype)
        left, right = (gy2.T, x2) if _op_kind(module) == "linear" else (x2.T, gy2)  # (m, tokens), (tokens, n)
        n_rows, n_cols = self.shape
        idx = self.indices.long()
        order = torch.argsort(idx)  # CSR wants row-major order; swaps leave the slots unsorted
        flat = idx[order]
        rows = flat // n_cols
        crow = torch.zeros(n_rows + 1, dtype=torch.long, device=idx.device)
        crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta": the op itself is stable
            pattern = torch.sparse_csr_tensor(crow, flat % n_cols, torch.zeros(flat.numel(), dtype=left.dtype,
                                              device=left.device), size=(n_rows, n_cols), check_invariants=False)
            try:
                sampled = torch.sparse.sampled_addmm(pattern, left.contiguous(), right.contiguous(), beta=0.0).values()
            except RuntimeError:  # a dtype/device without the kernel: gather from the dense gradient instead
                return (left @ right).reshape(-1)[idx]
        out = torch.empty_like(sampled)
        out[order] = sampled
        return out

    # -- merge (exact unmerge: W0 at the indices is kept while merged) --------------------------
    def merge(self) -> None:
        if self.merged:
            raise DeltatuneError("this delta is already merged; unmerge it before merging again")
        refuse_quantized_merge(self)
        self.detach()
        with torch.no_grad():
            flat = self.base.data.view(-1)
            idx, vals = self.entries()
            idx = idx.long()
            self._saved = flat[idx].clone()
            flat.index_add_(0, idx, vals.to(flat.dtype))
            self._merged_at = flat[idx].clone()
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            raise DeltatuneError("this delta is not merged; there is nothing to unmerge")
        with torch.no_grad():
            flat = self.base.data.view(-1)
            idx, vals = self.entries()
            idx = idx.long()
            if torch.equal(flat[idx], self._merged_at):
                flat[idx] = self._saved  # untouched since merge: put W0 back bit for bit
            else:  # another delta was merged on top at the same entries: subtract instead
                flat.index_add_(0, idx, -vals.to(flat.dtype))
        self._saved = self._merged_at = None
        self.merged = False
        self.attach()

    def extra_repr(self) -> str:
        scale = f", scale={self.scale:g}" if self.scale != 1.0 else ""
        return f"shape={self.shape}, k={self.k}, density={self.k / max(1, self.numel_base):.4g}{scale}"


def _op_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        if module.scale_grad_by_freq or module.sparse:
            return None  # rare options: fall back to the parametrisation path
        return "embedding"
    # a module with a parametrised tensor (its bias, say) is an instance of a generated subclass
    if parametrize.type_before_parametrizations(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "conv1d"
    return None


def _bound_forward(form: Sparse, module: nn.Module) -> Callable[..., torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        bias = getattr(module, "bias", None)
        return _SparseWeightForward.apply(x, form.values, form.base, bias, form.indices, module, form)

    return forward
