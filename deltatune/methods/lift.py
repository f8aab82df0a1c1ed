"""LIFT (Liu et al., ICML 2025, arXiv 2506.00772): sparse fine-tuning of the Principal Weights.

Every target matrix W (m×n) trains k = min((m+n)·r_b, m·n) entries, the parameter count of a rank-r_b
LoRA on it. They are the k largest entries, in magnitude, of W's rank-r̃ approximation
W_r̃ = U_r̃ Σ_r̃ V_r̃ᵀ (of the approximation itself: not of W, not of the residual W − W_r̃). Only they
get updates and Adam moments (2k numbers per matrix). Every I optimizer steps the mask is recomputed
from the current weights W0 + Δ; entries in both masks keep their moments, newcomers start at zero,
and entries that leave the mask keep what they learnt, frozen. Schedule, budget and selection follow
the official code (zihanghliu/LIFT ``src/sparseAdam.py``);
where it has bugs (a no-op weight decay, the global-step bias correction of fresh entries, saving
only the last mask) we do not copy them.

The delta is a ``LiftSparse`` form: a ``Sparse`` form whose (index, value) pairs are the current mask,
plus frozen ``past_indices`` / ``past_values`` for the entries earlier masks trained. The artifact
stores both: the union of all masks is needed to reproduce the trained weights.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from deltatune.core.forms.sparse import Sparse, index_dtype
from deltatune.core.optim import ElementAdamW
from deltatune.core.policy import Policy
from deltatune.core.registry import Built, Traits, register
from deltatune.core.targeting import sites_of
from deltatune.core.tuned import Tuned
from deltatune.errors import DeltatuneError
from deltatune.methods._common import block_matrices, from_rank0

_PAST = ("past_indices", "past_values")


@dataclass
class LiftConfig:
    # r_b (--lora_rank): each matrix trains k = min((m+n)·r_b, m·n) entries, a rank-r_b LoRA's parameter
    # count. 128 is the argparse default and the README's advice; with it a small matrix (m, n ≲ 256)
    # trains every entry. The paper's "top 5%" is r_b = 128 on 4096-wide LLaMA matrices.
    lora_rank: int = 128
    # r̃ (--filter_rank): rank of the approximation whose largest entries are the Principal Weights
    # (argparse default and README; the scripts use 16-128 by model size)
    approx_rank: int = 128
    # I (--update_interval, argparse default): masks are recomputed when (completed steps + 1) mod I == 0,
    # the official optimizer's timing (scripts: 400 for MATH-10K, 2000 for commonsense-170K)
    update_interval: int = 200
    # the official scripts' Adam betas and the optimizer's eps. Bias correction counts each entry's own
    # updates (deltatune.core.optim.ElementAdamW): the official code uses the tensor's global step, which
    # over-scales a newcomer's first updates after a refresh (a pitfall the spec lists). eps is added as
    # torch's AdamW adds it (to √v̂), so with a full mask one step equals torch.optim.AdamW.
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-6  # Adam's eps (added to the square root of v̂, as torch's AdamW)
    # "full": fp32 SVD (mask_type lift_sparse); "randomized": torch.svd_lowrank with q = 2r̃ and ``niter``
    # subspace iterations (lift_rand_sparse), seeded per matrix and step so runs repeat exactly
    svd: Literal["full", "randomized"] = "full"
    niter: int = 2  # torch.svd_lowrank's default (the official code reads args.niter, which its parser never defines)
    # where the SVD runs. None: the weight's device if it is an accelerator, else CUDA when there is one
    # (the first masks are chosen at attach time, usually before the model moves to the GPU), else the CPU.
    # The official code hard-codes CUDA. The result comes back to the weight's device.
    svd_device: str | None = None
    # what train.weight_decay shrinks. "weight": the model's weights at the masked entries,
    # W[M] ← (1 − lr·wd)·W[M], as full fine-tuning's AdamW does and the official optimizer means to (its
    # in-place decay writes into a copy and is a no-op). "delta": Δ toward 0, i.e. toward the base model.
    decay: Literal["weight", "delta"] = "weight"
    # None: every Linear / Conv1D in the numbered blocks (the scripts train q,k,v,o,gate,up,down and freeze
    # embeddings, lm_head, norms and biases with --no_grad head)
    targets: list[str] | None = None
    layers: list[int] | str | None = None  # blocks: an index, a list, or 'start:stop' (None: all)
    exclude: list[str] | None = None  # name patterns left out (as in targets)

    def __post_init__(self) -> None:
        for name in ("lora_rank", "approx_rank", "update_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.niter < 0:
            raise ValueError(f"niter={self.niter} must be >= 0")
        self.betas = tuple(self.betas)  # YAML gives a list
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas={self.betas} must be two numbers in [0, 1)")
        if self.svd_device is not None:
            try:
                torch.device(self.svd_device)
            except RuntimeError as e:
                raise ValueError(f"svd_device={self.svd_device!r} is not a torch device (e.g. 'cpu', 'cuda:0')") from e


# -- Principal Weights -------------------------------------------------------------------------------
def budget(shape: tuple[int, ...] | torch.Size, lora_rank: int) -> int:
    """k = min((m+n)·r_b, m·n): the trainable entries of one matrix (symmetric in m, n: any layout)."""
    m, n = shape
    return min((m + n) * lora_rank, m * n)


def low_rank_approximation(w: torch.Tensor, rank: int, svd: str = "full", niter: int = 2,
                           seed: int = 0) -> torch.Tensor:
    """U_r Σ_r V_rᵀ of a 2-d fp32 matrix, computed where ``w`` lives."""
    r = min(rank, *w.shape)
    if svd == "full":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return (u[:, :r] * s[:r]) @ vh[:r]
    devices = [w.device] if w.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # a fixed draw that leaves the run's RNG alone
        if devices:
            with torch.cuda.device(w.device):
                torch.cuda.manual_seed(seed)  # this device's generator only: fork_rng restores just that one
        else:
            torch.default_generator.manual_seed(seed)
        u, s, v = torch.svd_lowrank(w, q=min(2 * r, *w.shape), niter=niter)
    return (u[:, :r] * s[:r]) @ v[:, :r].T


def principal_indices(w: torch.Tensor, k: int, rank: int, svd: str = "full", niter: int = 2,
                      device: str | torch.device | None = None, seed: int = 0) -> torch.Tensor:
    """The mask: sorted flat positions (in ``w``'s own layout) of the k largest |W_r̃| entries.

    A transposed matrix (GPT-2 Conv1D stores (in, out)) has the transposed approximation, so the chosen
    entries are the same whichever layout the SVD sees; we use the tensor's own and need no mapping."""
    if w.dim() != 2:
        raise DeltatuneError(f"LIFT selects entries of weight matrices; got a tensor of shape {tuple(w.shape)}")
    numel = w.numel()
    if k >= numel:  # every entry is chosen whatever the approximation says: skip the SVD
        return torch.arange(numel, device=w.device)
    approx = low_rank_approximation(w.detach().to(device or _svd_device(w), torch.float32), rank, svd, niter, seed)
    chosen = torch.topk(approx.abs().flatten(), k, sorted=False).indices
    mask = torch.zeros(numel, dtype=torch.bool, device=chosen.device)
    mask[chosen] = True
    return mask.nonzero().squeeze(1).to(w.device)  # sorted, in O(m·n) rather than a sort of k


def _svd_device(w: torch.Tensor) -> torch.device:
    if w.device.type != "cpu":
        return w.device
    return torch.device("cuda") if torch.cuda.is_available() else w.device


def _positions(keys: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """For each query index, its position in ``keys`` (unique, any order), or -1 where absent."""
    if keys.numel() == 0:
        return torch.full_like(query, -1)
    sorted_keys, order = keys.sort()
    pos = torch.searchsorted(sorted_keys, query).clamp_(max=keys.numel() - 1)
    return torch.where(sorted_keys[pos] == query, order[pos], torch.full_like(pos, -1))


# -- the form ----------------------------------------------------------------------------------------
class LiftSparse(Sparse):
    """A sparse delta whose trainable (indices, values) are the current mask, plus the frozen entries
    earlier masks trained (``past_indices`` / ``past_values``, disjoint from ``indices``)."""

    def __init__(self, sites: list[tuple[nn.Module, str]], param_name: str, indices: torch.Tensor) -> None:
        super().__init__(sites, param_name, indices=indices)
        self.register_buffer("past_indices", torch.empty(0, dtype=self.indices.dtype, device=self.indices.device))
        self.register_buffer("past_values", torch.empty(0, dtype=self.values.dtype, device=self.values.device))

    def _checked(self, indices: torch.Tensor) -> torch.Tensor:
        # masks arrive sorted: distinct iff strictly increasing, an O(k) test instead of torch.unique
        if indices.dim() == 1 and not indices.is_floating_point() and indices.numel() > 1:
            if bool((indices[1:] > indices[:-1]).all()):
                if int(indices[0]) < 0 or int(indices[-1]) >= self.numel_base:
                    return super()._checked(indices)  # its message names the bad index
                return indices.to(index_dtype(self.numel_base))
        return super()._checked(indices)

    @property
    def num_past(self) -> int:
        return self.past_indices.numel()

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every entry of Δ (current mask, then past), as flat indices and scaled values."""
        idx = torch.cat([self.indices.long(), self.past_indices.long()])
        return idx, torch.cat([self.scaled_values(), self.past_values * self.scale])

    # -- the delta, with its past entries ----------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        flat = super().delta_weight().view(-1)
        if self.num_past:
            flat = flat.index_put((self.past_indices.long(),), self.past_values * self.scale)
        return flat.view(self.shape)

    def effective_weight(self, dtype: torch.dtype) -> torch.Tensor:
        w = super().effective_weight(dtype)
        if self.num_past:
            w.view(-1).index_add_(0, self.past_indices, (self.past_values * self.scale).to(dtype))
        return w

    # -- moving the mask ---------------------------------------------------------------------------
    def reselect(self, new: torch.Tensor) -> torch.Tensor:
        """Make ``new`` (unique flat indices) the trainable support. Entries that leave it join the frozen
        past with their values; entries that come back from the past continue from their learnt value.
        Returns, for each new slot, the old slot it continues (-1: not trained a moment ago)."""
        new = self._checked(new.to(self.indices.device).sort().values).long()
        old, past = self.indices.long(), self.past_indices.long()
        old_vals, past_vals = self.values.detach(), self.past_values
        src = _positions(old, new)
        back = _positions(past, new)
        vals = torch.zeros(new.numel(), dtype=old_vals.dtype, device=old_vals.device)
        vals[src >= 0] = old_vals[src[src >= 0]]
        vals[back >= 0] = past_vals[back[back >= 0]]
        union, union_vals = torch.cat([old, past]), torch.cat([old_vals, past_vals])
        leave = ~torch.isin(union, new)
        order = union[leave].argsort()
        self.set_support(new, vals)
        self._set_past(union[leave][order], union_vals[leave][order])
        if self.values.grad is not None:
            self.values.grad = None  # laid out for the old mask
        return src

    def _set_past(self, indices: torch.Tensor, values: torch.Tensor) -> None:
        self.past_indices = self._checked(indices.to(self.indices.device))
        self.past_values = values.detach().to(self.values.dtype, copy=True).to(self.values.device)

    # -- artifact and checkpoints ------------------------------------------------------------------
    def stored_tensors(self) -> dict[str, torch.Tensor]:
        out = {"indices": self.indices, "values": self.values.detach()}
        if self.num_past:  # a delta never refreshed (or an old artifact) has none
            out.update(past_indices=self.past_indices, past_values=self.past_values)
        return out

    def optional_tensors(self) -> set[str]:
        return set(_PAST)

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stored_tensors().values())

    def load_stored(self, tensors: dict[str, torch.Tensor]) -> None:
        names = set(tensors)
        ok = {"indices", "values"} <= names <= {"indices", "values", *_PAST} and (names & set(_PAST)) in (set(), set(_PAST))
        if not ok or any(tensors[i].numel() != tensors[v].numel() for i, v in (("indices", "values"), _PAST) if i in tensors):
            raise DeltatuneError(
                f"a LIFT delta of {self.param_name} needs 'indices' and 'values' of one length (and optionally "
                "'past_indices' and 'past_values' of one length); got "
                + ", ".join(f"{n} {tuple(t.shape)}" for n, t in tensors.items())
            )
        self.set_support(tensors["indices"], tensors["values"])
        if "past_indices" in tensors:
            past = tensors["past_indices"].to(self.indices.device)
            if torch.isin(past.long(), self.indices.long()).any():
                raise DeltatuneError(f"the LIFT delta of {self.param_name} lists an entry both as trainable and as past")
            self._set_past(past, tensors["past_values"])
        else:
            self._set_past(self.past_indices[:0], self.past_values[:0])

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # a checkpoint's past entries (resume) have whatever length the run had reached
        for name in _PAST:
            saved = state_dict.get(prefix + name)
            own = getattr(self, name)
            if saved is not None and saved.shape != own.shape:
                setattr(self, name, torch.zeros(saved.shape, dtype=own.dtype, device=own.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # merge / unmerge: the core Sparse form merges every entry of entries() (past ones included), exactly

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", past={self.num_past}" if self.num_past else "")


# -- the optimizer -----------------------------------------------------------------------------------
class LiftAdamW(ElementAdamW):
    """``ElementAdamW`` whose weight decay, in groups marked ``decay_weight``, shrinks the model's weight
    at the trained entries: W = W0 + s·Δ becomes (1 − lr·wd)·W, i.e. Δ ← Δ − lr·wd·(W0/s + Δ). Decay comes
    first, as in torch's AdamW, so with a full mask a step equals torch.optim.AdamW on the dense weight."""

    def __init__(self, params: Iterable[Any], forms: Iterable[LiftSparse], **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._forms = {id(f.values): f for f in forms}

    @torch.no_grad()
    def step(self, closure: Any = None) -> float | None:
        loss = closure() if closure is not None else None
        decayed = []
        for group in self.param_groups:
            wd = group["weight_decay"]
            if not (group.get("decay_weight") and wd):
                continue
            for p in group["params"]:
                form = self._forms.get(id(p))
                if p.grad is None:
                    continue
                if form is None:  # not a LIFT delta: ordinary decoupled decay
                    p.mul_(1 - group["lr"] * wd)
                    continue
                w0 = form.base.detach().view(-1)[form.indices.long()].to(p.dtype)
                p.sub_((w0 / form.scale + p) * (group["lr"] * wd))
            decayed.append((group, wd))
            group["weight_decay"] = 0.0
        try:
            super().step()
        finally:
            for group, wd in decayed:
                group["weight_decay"] = wd
        return loss


# -- the policy --------------------------------------------------------------------------------------
class LiftPolicy(Policy):
    """Mask refresh every I steps: after the optimizer step that completes t steps, when (t + 1) mod I == 0
    (the official timing), recompute each mask from the current W, carry the moments (and ages) of
    entries kept, start newcomers at zero. The masks themselves are in the forms' buffers (checkpointed
    with the delta); the policy keeps the step count."""

    name = "lift"

    def __init__(self, cfg: LiftConfig) -> None:
        self.cfg = cfg
        self.completed = 0
        self.refreshes = 0
        self.forms: dict[str, LiftSparse] = {}

    def setup(self, tuned: Tuned) -> None:
        self.forms = {n: f for n, f in tuned.forms().items() if isinstance(f, LiftSparse)}

    def make_optimizer(self, params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
        ours = {id(f.values) for f in self.forms.values()}
        groups: list[dict[str, Any]] = [{"params": [p for p in params if id(p) in ours],
                                         "decay_weight": self.cfg.decay == "weight"}]
        others = [p for p in params if id(p) not in ours]
        if others:
            groups.append({"params": others, "decay_weight": False})
        return LiftAdamW(groups, self.forms.values(), lr=lr, betas=self.cfg.betas, eps=self.cfg.eps,
                         weight_decay=weight_decay)

    def due(self, completed: int) -> bool:
        return (completed + 1) % self.cfg.update_interval == 0

    def after_optimizer_step(self, step: int, tuned: Tuned, optimizer: torch.optim.Optimizer) -> None:
        self.completed = step + 1
        if self.due(self.completed):
            self.refresh(optimizer)

    def refresh(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Recompute every mask from the current weights and keep the optimizer state consistent."""
        cfg = self.cfg
        for name, form in self.forms.items():
            with torch.no_grad():
                w = form.effective_weight(torch.float32)
            seed = zlib.crc32(f"{name}:{self.completed}".encode())
            new = principal_indices(w, form.k, cfg.approx_rank, cfg.svd, cfg.niter, cfg.svd_device, seed)
            del w
            new = from_rank0(new)  # ranks' weights agree, but two SVDs need not pick the same ties
            old_k = form.k
            src = form.reselect(new)
            if optimizer is not None:
                _carry_state(optimizer, form.values, src, old_k)
        self.refreshes += 1

    def state_dict(self) -> dict[str, Any]:
        return {"completed": self.completed, "refreshes": self.refreshes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.completed = int(state["completed"])
        self.refreshes = int(state["refreshes"])


def _carry_state(optimizer: torch.optim.Optimizer, p: torch.Tensor, src: torch.Tensor, old_k: int) -> None:
    """Per-entry optimizer state (Adam's m, v; ElementAdamW's age) follows its entry to the new slot;
    newcomers start at zero. Scalars (torch Adam's step count) stay: the step counter is not reset."""
    state = optimizer.state.get(p)
    if not state:
        return
    hit = src >= 0
    for key, t in list(state.items()):
        if torch.is_tensor(t) and t.dim() == 1 and t.numel() == old_k:
            moved = torch.zeros(src.numel(), dtype=t.dtype, device=t.device)
            moved[hit] = t[src[hit]]
            state[key] = moved


# why it cannot train on a quantized base (deltatune.core.quantized): said in its one-line refusal
QUANTIZED_BASE = (
    "it picks its entries from a low-rank approximation of every full-precision weight, taken again as it"
    " trains"
)


@register("lift", LiftConfig, "LIFT: sparse fine-tuning of the Principal Weights, the largest entries of a "
          "low-rank approximation, refreshed every I steps (Liu et al., 2025)",
          traits=Traits(quantized_base=QUANTIZED_BASE), family="sparse")
def build(model: nn.Module, cfg: LiftConfig, *, loading: bool = False) -> Built:
    modules = block_matrices(model, cfg.targets, cfg.layers, cfg.exclude)
    if not modules:
        raise DeltatuneError(
            "LIFT found no weight matrices to tune: the model has no Linear / Conv1D in numbered blocks, or "
            "targets / layers / exclude match none. Name them with targets=[...]"
        )
    forms: dict[str, LiftSparse] = {}
    for name, module in modules:
        w = module.weight
        k = budget(w.shape, cfg.lora_rank)
        if loading:  # the artifact brings the masks: no SVD, any placeholder of the right size
            idx = torch.arange(k, device=w.device)
        else:  # the first mask, from W0: deterministic
            seed = zlib.crc32(f"{name}.weight:0".encode())
            idx = principal_indices(w.detach(), k, cfg.approx_rank, cfg.svd, cfg.niter, cfg.svd_device, seed)
            idx = from_rank0(idx)
        forms[f"{name}.weight"] = LiftSparse(sites_of(model, w), "weight", idx)
    return Built(dict(forms), LiftPolicy(cfg))
