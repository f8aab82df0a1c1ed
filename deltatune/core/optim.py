"""Optimizers the policies need beyond torch's own.

- ``ElementAdamW``: AdamW whose bias correction counts steps per element (``age``), so an entry that
  started training later (a regrown sparse slot) is corrected for its own number of updates, and a
  policy may seed its moments (SpIEL seeds regrown slots from accumulated gradients). With all ages
  equal it is exactly ``torch.optim.AdamW``.
- ``SM3`` (Anil et al., 2019): second-moment accumulators per row and per column instead of per
  entry. For a sparse delta the rows/columns are those of the base matrix (``layout`` gives them for
  each step), so the accumulators also score entries that are not trained yet (SpIEL-MA).
- LoRA+ (``loraplus_optimizer``): any torch optimizer over PEFT's LoRA+ parameter groups, the B factors of
  low-rank deltas at λ·lr (``train.loraplus_ratio``; both training loops).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

from deltatune.errors import DeltatuneError

Layout = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor, int, int] | None"]


class ElementAdamW(torch.optim.Optimizer):
    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    def fresh_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if "age" not in state or state["age"].shape != p.shape:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["age"] = torch.zeros_like(p, dtype=torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.fresh_state(p)
                m, v, age = state["exp_avg"], state["exp_avg_sq"], state["age"]
                g = p.grad
                age.add_(1)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                # the order of torch's AdamW, with per-element corrections (computed in float64 like its scalars)
                bc1 = 1 - torch.pow(beta1, age.double())
                bc2_sqrt = (1 - torch.pow(beta2, age.double())).sqrt()
                denom = (v.sqrt() / bc2_sqrt.to(v.dtype)).add_(group["eps"])
                p.add_((m / denom) * (-group["lr"] / bc1).to(p.dtype))
        return loss


class SM3(torch.optim.Optimizer):
    """SM3 without momentum: ν = min(row acc, col acc) + g²; accumulators ← max(acc, ν); p −= lr·g/√(ν+eps).

    ``layout(p)`` returns (rows, cols, n_rows, n_cols) for a sparse vector of entries of a matrix; for
    other tensors the cover is one accumulator per index of each dimension (a vector: Adagrad)."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, eps: float = 1e-8, weight_decay: float = 0.0,
                 layout: Layout | None = None) -> None:
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})
        self.layout = layout or (lambda _p: None)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                where = self.layout(p)
                if where is not None:
                    rows, cols, n_rows, n_cols = where
                    if "row" not in state:
                        state["row"] = torch.zeros(n_rows, dtype=torch.float32, device=p.device)
                        state["col"] = torch.zeros(n_cols, dtype=torch.float32, device=p.device)
                    r, c = state["row"], state["col"]
                    nu = torch.minimum(r[rows], c[cols]) + g.float() ** 2
                    r.scatter_reduce_(0, rows, nu, "amax")
                    c.scatter_reduce_(0, cols, nu, "amax")
                else:
                    accs = [state.setdefault(f"acc{d}", torch.zeros(n, dtype=torch.float32, device=p.device))
                            for d, n in enumerate(p.shape or (1,))]
                    nu = g.float() ** 2 + _min_over_cover(accs, p.shape)
                    for d, acc in enumerate(accs):
                        other = [i for i in range(nu.dim()) if i != d]
                        acc.copy_(torch.maximum(acc, nu.amax(dim=other) if other else nu.reshape(acc.shape)))
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_((g.float() / (nu + group["eps"]).sqrt()).to(p.dtype), alpha=-group["lr"])
        return loss


def _min_over_cover(accs: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    if not shape:
        return accs[0].reshape(())
    out = None
    for d, acc in enumerate(accs):
        view = [1] * len(shape)
        view[d] = shape[d]
        a = acc.view(view)
        out = a if out is None else torch.minimum(out, a)
    return out.expand(shape)


# -- LoRA+ (Hayou et al., 2024, arXiv 2402.12354) --------------------------------------------------------------
# The B factors of a low-rank delta train at λ·lr (the paper's and PEFT's λ = 16). The groups are PEFT's
# ``create_loraplus_optimizer`` (peft/optimizers/loraplus.py, 0.21.2), in its order:
#   A           every other tensor with ≥ 2 dims (A factors, fully trained weights):  lr,           weight_decay
#   embedding   both factors of a low-rank delta on an embedding:                     lr_embedding, weight_decay
#   B           B factors, and 1-dim tensors (DoRA's magnitude, a norm's weight):     λ·lr,         weight_decay
#   B_no_decay  those of them that are biases or belong to a LayerNorm:               λ·lr,         0
# PEFT puts every 1-dim tensor with the B factors ("lora_B" in name or ndim == 1); ``weight_decay`` is PEFT's
# ``loraplus_weight_decay``. A B factor is a tensor named ``B`` in a form (ΔW = s·B·A: LoRA and the forms built on
# it, AdaLoRA's P·Λ·Q), as PEFT finds ``lora_B`` by name.

LORAPLUS_GROUPS = ("A", "embedding", "B", "B_no_decay")
LORAPLUS_LR_EMBEDDING = 1e-6  # PEFT's loraplus_lr_embedding default
_GROUP_RULE = "_deltatune_group_of"  # an optimizer attribute: where a tensor that joins later goes


def _loraplus_roles(forms: Mapping[str, nn.Module]) -> dict[int, tuple[str, bool]]:
    """id(tensor) -> (its LoRA+ group, whether it is a B factor) for every parameter of ``forms``."""
    roles: dict[int, tuple[str, bool]] = {}
    for form_name, form in forms.items():
        # the base module(s) a weight-side form changes: a LayerNorm's tensors are never decayed (PEFT, Trainer)
        sites = [m for m, _ in getattr(form, "sites", [])]
        for module_name, module in form.named_modules():
            for local, p in module.named_parameters(recurse=False):
                name = ".".join(n for n in (form_name, module_name, local) if n)
                if getattr(module, "layout", None) == "embedding" and local in ("A", "B"):
                    roles[id(p)] = ("embedding", local == "B")
                elif local == "B" or p.ndim == 1:
                    norm = any(isinstance(m, nn.LayerNorm) for m in [*sites, module])
                    roles[id(p)] = ("B_no_decay" if norm or "bias" in name else "B", local == "B")
                else:
                    roles[id(p)] = ("A", False)
    return roles


def loraplus_param_groups(forms: Mapping[str, nn.Module], params: Iterable[nn.Parameter], *, lr: float,
                          ratio: float, lr_embedding: float = LORAPLUS_LR_EMBEDDING, weight_decay: float = 0.0,
                          what: str = "this delta") -> list[dict[str, Any]]:
    """PEFT's four LoRA+ parameter groups (see above) of ``params``, the tensors of ``forms`` (a tensor that
    belongs to none goes with the A factors). ``what`` names the delta in the error raised when no tensor is
    a B factor (LoRA+ would change nothing)."""
    if not (math.isfinite(ratio) and ratio > 0):
        raise DeltatuneError(f"loraplus_ratio={ratio!r} must be a number > 0 (the B factors train at ratio·lr; "
                             "the paper's default is 16)")
    roles = _loraplus_roles(forms)
    members: dict[str, list[nn.Parameter]] = {g: [] for g in LORAPLUS_GROUPS}
    factors = 0
    for p in params:
        group, factor = roles.get(id(p), ("A", False))
        members[group].append(p)
        factors += factor and group != "embedding"
    if not factors:
        kinds = sorted({str(getattr(f, "kind", type(f).__name__)) for f in forms.values()})
        raise DeltatuneError(
            f"train.loraplus_ratio (LoRA+) gives the B factors of low-rank deltas (ΔW = s·B·A) their own learning "
            f"rate, but {what} has none outside embeddings (its deltas: {', '.join(kinds) or 'none'}): remove "
            "train.loraplus_ratio, or train a low-rank method (`deltatune methods` lists them)"
        )
    settings = {"A": (lr, weight_decay), "embedding": (lr_embedding, weight_decay), "B": (lr * ratio, weight_decay),
                "B_no_decay": (lr * ratio, 0.0)}
    return [{"params": members[g], "lr": settings[g][0], "weight_decay": settings[g][1]} for g in LORAPLUS_GROUPS]


def loraplus_optimizer(optimizer_cls: type[torch.optim.Optimizer], forms: Callable[[], Mapping[str, nn.Module]],
                       params: Iterable[nn.Parameter], *, lr: float, ratio: float,
                       lr_embedding: float = LORAPLUS_LR_EMBEDDING, weight_decay: float = 0.0,
                       what: str = "this delta", **kwargs: Any) -> torch.optim.Optimizer:
    """``optimizer_cls`` over LoRA+'s groups (``loraplus_param_groups``; ``kwargs``: the optimizer's other
    options). ``forms()`` gives the delta's forms now: a tensor that joins the optimizer later (a policy that grows
    or rebuilds forms; the loops' ``sync_optimizer``) goes to its own group (``group_for``), not the first."""
    groups = loraplus_param_groups(forms(), params, lr=lr, ratio=ratio, lr_embedding=lr_embedding,
                                   weight_decay=weight_decay, what=what)
    optimizer = optimizer_cls(groups, lr=lr, **kwargs)

    def group_of(p: torch.Tensor) -> int:
        return LORAPLUS_GROUPS.index(_loraplus_roles(forms()).get(id(p), ("A", False))[0])

    setattr(optimizer, _GROUP_RULE, group_of)
    return optimizer


def group_for(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> int:
    """The index of the param group a tensor joining ``optimizer`` belongs to: its LoRA+ group for an optimizer
    built by ``loraplus_optimizer``, else the first."""
    rule = getattr(optimizer, _GROUP_RULE, None)
    return rule(p) if rule is not None else 0
