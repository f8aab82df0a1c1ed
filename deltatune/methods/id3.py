"""ID³ (Agarwal et al., 2024, arXiv 2408.14470): step-by-step unmasking of individual weights.

A hard budget B of trainable scalar entries. Nothing trains at first; at every optimizer step t < T
(``max_steps``, by default the run's length) the n_t not-yet-chosen entries with the largest D³ score

    h = |∇θ| / (ε + |θ|)^λ        (θ = W0 + Δ, the current weight; λ = ``exp``)

join the chosen set C (global over all targeted tensors), gradients outside C are zeroed and the run's
own optimizer steps. n_t = ⌊B/T⌋, plus one for the first B mod T steps, so Σ n_t = B exactly at step T;
after that nothing is unmasked. Earlier picks keep training (exploitation) while the score re-ranks the
rest after every update (exploration).

Forms. Until the budget is reached every targeted tensor is a dense delta (``MaskedDense``) carrying its
chosen mask; the artifact stores only its chosen entries as ``indices`` + ``values`` (O(B) on disk at any
moment). When Σ|C| = B the dense deltas become ``Sparse`` forms on C (no dense delta, gradient or Adam
moments from then on) and the optimizer moments of the chosen entries carry over, so the switch does
not change the training. ``dt.load`` builds empty ``Sparse`` forms that take the stored size.

Where the official code (Aradhye2002/selective-peft-toolkit) goes wrong, this does not:

- exactly n_t new entries per step, ties broken by tensor and index order (no ``>=`` overshoot, no
  trimming of old, already trained entries from the mask); one global count, never above B, and no
  unmasking after T;
- tensors without a gradient are skipped (they only miss that step's ranking);
- the summary loads in memory and from disk alike (tensor names, not positional arguments);
- decoupled weight decay cannot move an unchosen entry: it acts on Δ, which is exactly 0 there, as are
  its masked gradient and Adam moments, so any torch optimizer leaves W0 bit for bit (tested with AdamW
  weight decay > 0); on chosen entries it decays Δ, i.e. towards W0, as for every delta here;
- the native loop clips gradients after the mask, so clipping sees only the chosen entries.

Choices never use random numbers and break ties deterministically: under data parallelism every rank
sees the same all-reduced gradients and so chooses the same entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltatune.core.forms.base import WeightDelta
from deltatune.core.forms.sparse import Sparse
from deltatune.core.policy import Policy
from deltatune.core.registry import Built, Traits, register
from deltatune.core.targeting import (
    count_layers,
    layer_index,
    match_name,
    nearest_names,
    resolve_layers,
    sites_of,
)
from deltatune.core.tuned import Tuned
from deltatune.errors import DeltatuneError
from deltatune.methods._common import block_matrices
from deltatune.methods._sparse_selection import DenseAsSparse, delta_dtype, top_k_entries

# The paper's GLUE budget is 103K entries on DeBERTa-v3-base, whose block matrices hold ~85M: 0.12%
# [inferred from the paper's numbers; the official code takes an absolute budget only].
DEFAULT_DENSITY = 0.0012


@dataclass
class Id3Config:
    budget: int | None = None  # B, trainable entries in all (the paper: 103K on GLUE); or give density
    density: float | None = None  # B as a share of the targeted entries (None with no budget: 0.0012)
    max_steps: int | None = None  # T, steps that unmask; None: the run's length (Policy.plan)
    eps: float = 1e-3  # ε of the D³ score (official default)
    exp: float = 0.0  # λ of the D³ score; 0 (the official README's) ranks by |∇θ| alone
    targets: list[str] | None = None  # parameter or module patterns (a module: its weight); None: block matrices
    layers: list[int] | str | None = None  # blocks: an index, a list, or 'start:stop' (None: all)
    exclude: list[str] | None = None  # name patterns left out (as in targets)

    def __post_init__(self) -> None:
        if self.budget is not None and self.density is not None:
            raise ValueError("give budget (an entry count) or density (a share of the targeted entries), not both")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget={self.budget} must be a positive number of entries")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise ValueError(f"density={self.density} must be in (0, 1]")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps} must be >= 1 (or None for the run's length)")
        if self.eps <= 0:
            raise ValueError(f"eps={self.eps} must be > 0 (it keeps the score finite where θ = 0)")
        if self.exp < 0:
            raise ValueError(f"exp={self.exp} must be >= 0")


# -- the schedule -------------------------------------------------------------------------------
def unmask_count(budget: int, max_steps: int, step: int) -> int:
    """n_t: ⌊B/T⌋, one more for the first B mod T steps (the official ``t/T < rem/T``), 0 from T on."""
    if step >= max_steps:
        return 0
    base, rem = divmod(budget, max_steps)
    return base + 1 if step < rem else base


def unmasked_by(budget: int, max_steps: int, step: int) -> int:
    """Σ_{s ≤ step} n_s: how many entries are chosen once step ``step`` (0-based) has unmasked."""
    done = min(step + 1, max_steps)
    base, rem = divmod(budget, max_steps)
    return base * done + min(done, rem)


# -- forms --------------------------------------------------------------------------------------
class MaskedDense(DenseAsSparse):
    """A dense delta that only the chosen entries (``mask``) may move, stored as ``indices`` (flat,
    sorted) + ``values`` of those entries, the names a ``Sparse`` form loads. Off the mask Δ stays 0;
    entries that moved without a policy (a plain optimizer) are stored too, so save → load is exact."""

    def __init__(self, sites: list[tuple[nn.Module, str]], param_name: str, dtype: torch.dtype | None = None) -> None:
        super().__init__(sites, param_name, dtype)
        # a buffer so it follows .to(device); not persistent: checkpoints hold it bit-packed in the policy state
        self.register_buffer("mask", torch.zeros_like(self.delta, dtype=torch.bool), persistent=False)

    def support(self) -> torch.Tensor:
        """Flat indices of the entries the delta holds: the chosen ones (and any other non-zero)."""
        keep = self.mask | (self.delta.detach() != 0)
        return torch.nonzero(keep.reshape(-1)).flatten()

    def loaded_support(self, idx: torch.Tensor) -> None:
        with torch.no_grad():
            self.mask.zero_()
            self.mask.view(-1)[idx] = True


def _sparse_on(form: WeightDelta, indices: torch.Tensor | None = None) -> Sparse:
    return Sparse(form.sites, form.param_name, 0, indices=indices, dtype=delta_dtype(form.base))


# -- bit-packed masks (policy state holds tensors only) -------------------------------------------
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, 8 entries a byte (row-major, zero-padded); one byte per entry of scratch."""
    flat = F.pad(mask.reshape(-1).to(torch.uint8), (0, -mask.numel() % 8))
    return (flat.view(-1, 8) * _BITS.to(flat.device)).sum(1).to(torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    numel = int(torch.Size(shape).numel())
    bits = (packed.to(torch.uint8).unsqueeze(1) & _BITS.to(packed.device)) != 0
    return bits.reshape(-1)[:numel].reshape(shape)


# -- the policy -----------------------------------------------------------------------------------
class Id3Policy(Policy):
    """Score → unmask → mask gradients before every optimizer step; sparse forms once B are chosen.

    State (checkpointed): T, the phase, the masks (bit-packed, dense phase) and, between the switch and
    the next step, the chosen entries' optimizer moments that the new sparse values take over."""

    name = "id3"

    def __init__(self, cfg: Id3Config, targets: list[str], budget: int) -> None:
        self.cfg = cfg
        self.targets = targets
        self.budget = budget
        self.max_steps: int | None = cfg.max_steps
        self.phase = "dense"
        self._moments: dict[str, dict[str, Any]] = {}  # optimizer state handed to the sparse values
        self._tuned: Tuned | None = None

    def setup(self, tuned: Tuned) -> None:
        self._tuned = tuned

    def plan(self, total_steps: int, grad_accum: int) -> None:
        if self.cfg.max_steps is None:
            self.max_steps = total_steps

    def _forms(self, tuned: Tuned) -> dict[str, Any]:
        """The targeted forms: ``MaskedDense`` before the switch, ``Sparse`` after it."""
        forms = tuned.forms()
        return {n: forms[n] for n in self.targets}

    def chosen(self, tuned: Tuned) -> int:
        """Σ|C| over the targeted tensors."""
        forms = self._forms(tuned)
        if self.phase == "sparse":
            return sum(f.k for f in forms.values())
        return sum(int(f.mask.sum()) for f in forms.values())

    # -- every step ---------------------------------------------------------------------------------
    def before_optimizer_step(self, step: int, tuned: Tuned, optimizer: torch.optim.Optimizer) -> None:
        if self.phase == "sparse":
            self._hand_over_moments(tuned, optimizer)
            return  # only the chosen entries are parameters: nothing to mask
        if self.max_steps is None:
            raise DeltatuneError("id3: call tuned.policy.plan(total_steps, grad_accum) before training "
                                 "(dt.train and the Trainer bridge do it), or set max_steps")
        forms = self._forms(tuned)
        # the cumulative target, not n_t alone: a step that could not fill its share is caught up later
        wanted = min(self.budget, unmasked_by(self.budget, self.max_steps, step)) - self.chosen(tuned)
        if wanted > 0:
            self.unmask(forms, wanted)
        with torch.no_grad():
            for form in forms.values():
                if form.delta.grad is not None:
                    form.delta.grad.masked_fill_(~form.mask, 0)

    def scores(self, form: MaskedDense) -> torch.Tensor:
        """D³ = |∇θ| / (ε + |θ|)^λ of every entry of one tensor (fp32)."""
        g = form.delta.grad.detach().float().abs()
        if self.cfg.exp == 0:
            return g
        theta = form.base.detach().float() + form.delta.detach().float()
        return g / (self.cfg.eps + theta.abs()).pow(self.cfg.exp)

    def unmask(self, forms: dict[str, Any], n: int) -> dict[str, torch.Tensor]:
        """Add the n unchosen entries of largest score (fewer if fewer have a gradient) to the masks;
        returns the new flat indices per tensor."""
        scored = {name: f for name, f in forms.items() if f.delta.grad is not None}
        if not scored:
            return {}
        exclude = {name: torch.nonzero(f.mask.reshape(-1)).flatten() for name, f in scored.items()}
        free = sum(f.mask.numel() - exclude[name].numel() for name, f in scored.items())
        scores = {name: self.scores(f) for name, f in scored.items()}
        # exactly n, ties to the first entries in tensor and index order: deterministic on every rank
        new = top_k_entries(scores, min(n, free), exclude)
        with torch.no_grad():
            for name, idx in new.items():
                forms[name].mask.view(-1)[idx.long()] = True
        return new

    def after_optimizer_step(self, step: int, tuned: Tuned, optimizer: torch.optim.Optimizer) -> None:
        if self.phase == "dense" and self.chosen(tuned) >= self.budget:
            self.to_sparse(tuned, optimizer)

    # -- dense -> sparse ----------------------------------------------------------------------------
    def to_sparse(self, tuned: Tuned, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Every targeted tensor becomes a ``Sparse`` form on its chosen entries with their values; the
        optimizer moments of those entries are kept for the next step (the loop drops the state of
        parameters that are new to it, so they are put back in ``before_optimizer_step``)."""
        new: dict[str, Sparse] = {}
        for name, form in self._forms(tuned).items():
            idx = form.support()
            sparse = _sparse_on(form, idx)
            with torch.no_grad():
                sparse.values.copy_(form.delta.detach().reshape(-1)[idx.long()])
            sparse.values.requires_grad_(idx.numel() > 0)  # an empty tensor need not build its weight gradient
            new[name] = sparse
            state = optimizer.state.get(form.delta) if optimizer is not None else None
            if state and idx.numel():
                self._moments[name] = {k: _gather(v, form.delta, idx) for k, v in state.items()}
        tuned.replace_forms(new)
        self.phase = "sparse"

    def _hand_over_moments(self, tuned: Tuned, optimizer: torch.optim.Optimizer) -> None:
        if not self._moments:
            return
        forms = self._forms(tuned)
        for name, state in self._moments.items():
            values = forms[name].values
            optimizer.state[values] = {k: v.to(values.device) if isinstance(v, torch.Tensor) and v.dim() else v
                                       for k, v in state.items()}
        self._moments = {}

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"max_steps": self.max_steps, "phase": self.phase}
        if self.phase == "dense" and self._tuned is not None:
            state["masks"] = {n: pack_mask(f.mask) for n, f in self._forms(self._tuned).items()}
        if self._moments:
            state["moments"] = self._moments
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore T, the masks or the sparse forms (the loop loads the delta tensors next)."""
        if self._tuned is None:
            raise DeltatuneError("id3: the policy has no model yet; attach it (dt.attach) before loading its state")
        self.max_steps = None if state.get("max_steps") is None else int(state["max_steps"])
        self.phase = str(state["phase"])
        self._moments = {n: dict(s) for n, s in state.get("moments", {}).items()}
        forms = self._forms(self._tuned)
        if self.phase == "sparse":  # empty forms, sized by the loaded indices
            if any(isinstance(f, MaskedDense) for f in forms.values()):
                self._tuned.replace_forms({n: _sparse_on(f) for n, f in forms.items()})
            return
        for name, form in forms.items():
            packed = state["masks"][name]
            form.mask.copy_(unpack_mask(packed.to(form.mask.device), form.mask.shape))


def _gather(value: Any, param: torch.Tensor, idx: torch.Tensor) -> Any:
    """One optimizer-state entry restricted to the chosen entries (per-element tensors) or kept (a step count)."""
    if isinstance(value, torch.Tensor):
        if value.shape == param.shape:
            return value.detach().reshape(-1)[idx.long()].clone()
        return value.detach().clone()
    return value


# -- what is targeted ---------------------------------------------------------------------------------
def _owner_and_attr(name: str) -> tuple[str, str]:
    return (name.rsplit(".", 1)[0], name.rsplit(".", 1)[1]) if "." in name else ("", name)


def target_parameters(model: nn.Module, cfg: Id3Config) -> list[tuple[str, nn.Parameter]]:
    """The tensors whose entries compete for the budget: by default the weight of every Linear / GPT-2
    Conv1D in the numbered blocks; else every parameter whose name matches a pattern, or the weight of
    every module whose name does. Biases before weights (the order the sparse forms attach in)."""
    if not cfg.targets:
        chosen = [(f"{n}.weight", m.weight) for n, m in block_matrices(model, None, cfg.layers, cfg.exclude)]
    else:
        params = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
        picked: dict[int, tuple[str, nn.Parameter]] = {}
        for pattern in cfg.targets:
            hits = [(n, p) for n, p in params if match_name(pattern, n)
                    or (_owner_and_attr(n)[1] == "weight" and match_name(pattern, _owner_and_attr(n)[0]))]
            if not hits:
                near = ", ".join(nearest_names(pattern, [n for n, _ in params]))
                raise DeltatuneError(f"id3 target {pattern!r} matches no parameter or module. Nearest names: {near}")
            picked.update({id(p): (n, p) for n, p in hits})
        chosen = [item for item in params if id(item[1]) in picked]
        if cfg.exclude:
            chosen = [(n, p) for n, p in chosen
                      if not any(match_name(x, n) or match_name(x, _owner_and_attr(n)[0]) for x in cfg.exclude)]
        if cfg.layers is not None:
            wanted = resolve_layers(cfg.layers, count_layers(n for n, _ in params))
            chosen = [(n, p) for n, p in chosen if layer_index(n) in wanted]
    if not chosen:
        raise DeltatuneError("id3 targets no parameter: widen targets / layers or exclude less")
    chosen.sort(key=lambda item: _owner_and_attr(item[0])[1] == "weight")
    return chosen


def resolve_budget(cfg: Id3Config, n_targeted: int) -> int:
    if cfg.budget is not None:
        budget = cfg.budget
    else:
        density = cfg.density if cfg.density is not None else DEFAULT_DENSITY
        budget = int(density * n_targeted)
        if budget < 1:
            raise DeltatuneError(f"id3: density {density} of the {n_targeted} targeted entries is no entry at all: "
                                 "raise density, give budget, or widen targets")
    if budget > n_targeted:
        raise DeltatuneError(f"id3: budget={budget} exceeds the {n_targeted} targeted entries: "
                             "lower budget or widen targets")
    return budget


# why it cannot train on a quantized base (deltatune.core.quantized): said in its one-line refusal
QUANTIZED_BASE = (
    "it scores entries by the full-precision base weights at every step"
)


@register("id3", Id3Config, "ID3: unmask the top-D³ entries step by step up to a budget (sparse, composable)",
          traits=Traits(quantized_base=QUANTIZED_BASE), family="sparse")
def build(model: nn.Module, cfg: Id3Config, *, loading: bool = False) -> Built:
    params = target_parameters(model, cfg)
    forms: dict[str, WeightDelta] = {}
    for name, p in params:
        sites = sites_of(model, p)
        # loading: empty sparse forms take the stored support (dense-phase artifacts store the same names)
        forms[name] = (Sparse(sites, name, 0, dtype=delta_dtype(p)) if loading
                       else MaskedDense(sites, name, dtype=delta_dtype(p)))
    if loading:
        return Built(forms)
    budget = resolve_budget(cfg, sum(p.numel() for _, p in params))
    return Built(forms, Id3Policy(cfg, list(forms), budget))
