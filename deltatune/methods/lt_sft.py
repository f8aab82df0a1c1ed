"""LT-SFT (Ansell et al., ACL 2022, arXiv 2110.07560): Lottery-Ticket Sparse Fine-Tuning.

The delta φ = θ − θ0 ends K-sparse. Each of ``n_iterations`` iterations has two phases:

1. *full*: every maskable tensor trains as a dense delta (``DenseAsSparse``), the head as well;
2. at the switch the K/n entries that moved most (global top-k of |Δ| over the maskable entries not
   yet chosen, exactly that many: ``top_k_entries``) join the mask, every delta is reset to its
   value at the start of the iteration (the head too), the dense deltas become ``Sparse`` forms
   on the mask, and the optimizer state and learning-rate schedule start afresh;
3. *sparse*: only the mask's values (and the head) train until the iteration ends; a later
   iteration starts its full phase from this sparse result.

Masked-out entries cannot move in the sparse phase because they are not parameters at all: no
stale Adam moments, no decoupled weight decay on them (both leak in a dense + gradient-mask
implementation, the spec's pitfalls). An L1 penalty λ·Σ|θ − θ0| / N_all (N_all: every parameter
of the model) pulls the delta toward zero in either phase.

The artifact has the same tensor names in both phases: per maskable tensor ``indices`` + ``values``
(entries with |Δ| > 1e-7 in the full phase, the mask in the sparse phase), per head tensor a
dense ``delta``. ``dt.load`` builds empty ``Sparse`` forms that take the stored size.
Defaults are the official library's (cambridgeltl/composable-sft ``SftArguments``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from deltatune.core.forms.base import WeightDelta
from deltatune.core.forms.sparse import Sparse, sparse_sum
from deltatune.core.policy import Policy, release_state
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
from deltatune.methods._common import dense_forms
from deltatune.methods._sparse_selection import DenseAsSparse, delta_dtype, top_k_entries


@dataclass
class LtSftConfig:
    density: float | None = None  # ft_params_proportion: share of the maskable entries in the delta (None: 0.01)
    k: int | None = None  # ft_params_num: the number of entries instead (give density or k, not both)
    full_steps: int | None = None  # steps of each full phase; None: the first half of each iteration (rounded up)
    n_iterations: int = 1  # n_ft_iterations; each iteration adds k / n_iterations entries
    l1_full: float = 0.0  # full_l1_reg (library default 0; the language SFTs of the paper use 0.1)
    l1_sparse: float = 0.0  # sparse_l1_reg
    l1_maskable_only: bool = False  # apply_reg_to_sparse_only: False penalises the head's delta too, as the library
    targets: list[str] | None = None  # maskable parameter or module patterns; None: every base-model parameter
    layers: list[int] | str | None = None  # blocks: an index, a list, or 'start:stop' (None: all)
    exclude: list[str] | None = None  # name patterns left out (as in targets)
    freeze_layer_norm: bool = False  # the library's default; the paper's language SFTs freeze them
    head: list[str] | None = None  # parameter/module patterns trained densely; None: the classifier/score head

    def __post_init__(self) -> None:
        if self.density is not None and self.k is not None:
            raise ValueError("give density or k, not both (k is an entry count, density a share of the maskable entries)")
        if self.density is not None and not 0.0 < self.density <= 1.0:
            raise ValueError(f"density={self.density} must be in (0, 1]")
        if self.k is not None and self.k < 1:
            raise ValueError(f"k={self.k} must be a positive number of entries")
        if self.full_steps is not None and self.full_steps < 1:
            raise ValueError(f"full_steps={self.full_steps} must be >= 1")
        if self.n_iterations < 1:
            raise ValueError(f"n_iterations={self.n_iterations} must be >= 1")
        if self.l1_full < 0 or self.l1_sparse < 0:
            raise ValueError("l1_full and l1_sparse must be >= 0")


# -- what is maskable, what is head ---------------------------------------------------------------
def _base_model(model: nn.Module) -> nn.Module | None:
    """The transformers base model inside a model with a head (``model.model``, ``model.bert``), if any."""
    prefix = getattr(model, "base_model_prefix", None)
    base = getattr(model, prefix, None) if isinstance(prefix, str) and prefix else None
    return base if isinstance(base, nn.Module) and base is not model else None


def _output_embedding_ids(model: nn.Module) -> set[int]:
    out = getattr(model, "get_output_embeddings", lambda: None)()
    return {id(p) for p in out.parameters()} if isinstance(out, nn.Module) else set()


def _named_floating(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]


def head_parameters(model: nn.Module, patterns: list[str] | None) -> list[tuple[str, nn.Parameter]]:
    """Parameters trained densely in both phases. A pattern matches a parameter name or the name of
    any module that holds it. Default: what lies outside the base model except the output embedding
    (BERT's ``classifier``, ``score`` of a sequence-classification LM; nothing for a causal LM, whose
    ``lm_head`` is tied to the embedding or frozen)."""
    params = _named_floating(model)
    if patterns is None:
        base = _base_model(model)
        if base is None:
            return []
        inside = {id(p) for p in base.parameters()} | _output_embedding_ids(model)
        return [(n, p) for n, p in params if id(p) not in inside]
    return _pick(params, patterns, "head")


def _matches(pattern: str, name: str) -> bool:
    """A parameter name or the name of a module holding it (any dotted prefix) matches the pattern."""
    parts = name.split(".")
    return any(match_name(pattern, ".".join(parts[:i])) for i in range(1, len(parts) + 1))


def _pick(params: list[tuple[str, nn.Parameter]], patterns: list[str], what: str) -> list[tuple[str, nn.Parameter]]:
    chosen: dict[int, tuple[str, nn.Parameter]] = {}
    for pattern in patterns:
        hits = [(n, p) for n, p in params if _matches(pattern, n)]
        if not hits:
            near = ", ".join(nearest_names(pattern, [n for n, _ in params]))
            raise DeltatuneError(f"{what} pattern {pattern!r} matches no parameter or module. Nearest names: {near}")
        chosen.update({id(p): (n, p) for n, p in hits})
    return [item for item in params if id(item[1]) in chosen]  # model order


def _is_norm(model: nn.Module, name: str) -> bool:
    owner = dict(model.named_modules()).get(name.rsplit(".", 1)[0] if "." in name else "")
    return owner is not None and (isinstance(owner, nn.LayerNorm) or "norm" in type(owner).__name__.lower())


def _body_ids(model: nn.Module) -> set[int]:
    """Parameters of the base model; without one, all but an untied output embedding."""
    base = _base_model(model)
    if base is not None:
        return {id(p) for p in base.parameters()}  # a tied output embedding is the input embedding: inside
    try:
        inp = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except NotImplementedError:
        inp = None
    tied = {id(p) for p in inp.parameters()} if isinstance(inp, nn.Module) else set()
    return {id(p) for p in model.parameters()} - (_output_embedding_ids(model) - tied)


def maskable_parameters(model: nn.Module, cfg: LtSftConfig, head: list[tuple[str, nn.Parameter]]
                        ) -> list[tuple[str, nn.Parameter]]:
    """The tensors whose entries compete for the mask: the targets, or by default every floating
    parameter of the base model (the library's ``maskable_params``), never the head or an untied
    output embedding; norms too unless ``freeze_layer_norm``."""
    head_ids = {id(p) for _, p in head}
    params = _named_floating(model)
    if cfg.targets:
        chosen = _pick(params, cfg.targets, "target")
        clash = [n for n, p in chosen if id(p) in head_ids]
        if clash:
            raise DeltatuneError(f"{clash[0]} is both a target and head: drop it from one of them")
    else:
        body = _body_ids(model)
        chosen = [(n, p) for n, p in params if id(p) in body and id(p) not in head_ids]
    if cfg.exclude:
        chosen = [(n, p) for n, p in chosen if not any(_matches(x, n) for x in cfg.exclude)]
    if cfg.layers is not None:
        wanted = resolve_layers(cfg.layers, count_layers(n for n, _ in params))
        chosen = [(n, p) for n, p in chosen if layer_index(n) in wanted]
    if cfg.freeze_layer_norm:
        chosen = [(n, p) for n, p in chosen if not _is_norm(model, n)]
    # tensors a sparse delta parametrises (biases) before the weights it patches the forward of: a
    # parametrised GPT-2 Conv1D changes its class name, which the sparse forward must see when it attaches
    chosen.sort(key=lambda item: sites_of(model, item[1])[0][1] == "weight")
    if not chosen:
        raise DeltatuneError("lt-sft found no maskable parameter: widen targets / layers / exclude or freeze fewer parts")
    return chosen


def _dense_from(form: WeightDelta, init: torch.Tensor | None = None) -> DenseAsSparse:
    dense = DenseAsSparse(form.sites, form.param_name, dtype=delta_dtype(form.base))
    if init is not None:
        with torch.no_grad():
            dense.delta.copy_(init)
    return dense


def _empty_sparse(form: WeightDelta) -> Sparse:
    return Sparse(form.sites, form.param_name, 0, dtype=delta_dtype(form.base))


# -- the policy ---------------------------------------------------------------------------------
class LtSftPolicy(Policy):
    """Two phases per iteration (full, then sparse on the chosen mask); see the module docstring.

    State (checkpointed): the iteration, the phase, the step boundaries, and in the full phase of a
    later iteration its starting point (the previous sparse delta and head), which the switch resets to.
    """

    name = "lt-sft"

    def __init__(self, cfg: LtSftConfig, maskable: list[str], head: list[str], k_total: int) -> None:
        self.cfg = cfg
        self.maskable, self.head = maskable, head
        self.k_total = k_total
        self.k_iteration = k_total // cfg.n_iterations  # the library's n_tunable_params // n_ft_iterations
        self.iteration = 0
        self.phase = "full"
        self.bounds: list[list[int]] | None = None  # per iteration [start, end of full phase, end]
        self._restored = False
        self._start: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # iteration start: sparse delta (0 if absent)
        self._head_start: dict[str, torch.Tensor] = {}  # iteration start of the head deltas (0 if absent)
        self._tuned: Tuned | None = None
        self._n_all = 1

    def setup(self, tuned: Tuned) -> None:
        self._tuned = tuned
        self._n_all = sum(p.numel() for p in tuned.model.parameters())  # N_all of the library's penalty

    # -- schedule ---------------------------------------------------------------------------------
    def schedule(self, total_steps: int) -> list[list[int]]:
        n, out = self.cfg.n_iterations, []
        for j in range(n):
            start, end = j * total_steps // n, (j + 1) * total_steps // n
            full = self.cfg.full_steps if self.cfg.full_steps is not None else math.ceil((end - start) / 2)
            if n > 1 and start + full >= end:
                raise DeltatuneError(
                    f"lt-sft: {total_steps} steps give iteration {j + 1} of {n} only {end - start} steps, too few for a "
                    f"full phase of {full} and a sparse phase: raise train.steps, lower n_iterations or full_steps"
                )
            out.append([start, start + full, end])
        return out

    def plan(self, total_steps: int, grad_accum: int) -> None:
        if not self._restored:  # a resumed run keeps the boundaries it started with (train.steps may grow)
            self.bounds = self.schedule(total_steps)

    def lr_restarts(self, total_steps: int) -> list[int]:
        bounds = self.bounds or self.schedule(total_steps)
        cuts = {f for _, f, e in bounds if f < e} | {s for s, _, _ in bounds[1:]}
        return sorted(c for c in cuts if 0 < c < total_steps)

    def after_optimizer_step(self, step: int, tuned: Tuned, optimizer: torch.optim.Optimizer) -> None:
        if self.bounds is None:
            raise DeltatuneError("lt-sft: call tuned.policy.plan(total_steps, grad_accum) before training "
                                 "(dt.train and the Trainer bridge do it)")
        done = step + 1
        _, full_end, end = self.bounds[self.iteration]
        if self.phase == "full" and done == full_end and full_end < end:
            self.to_sparse(tuned, optimizer)
        elif self.phase == "sparse" and done == end and self.iteration + 1 < len(self.bounds):
            self.next_iteration(tuned, optimizer)

    # -- transitions ------------------------------------------------------------------------------
    def to_sparse(self, tuned: Tuned, optimizer: torch.optim.Optimizer | None = None) -> dict[str, torch.Tensor]:
        """Choose the new mask entries, reset every delta to the iteration's start and train the mask
        only from now on. Returns the entries chosen in this iteration (flat indices per tensor)."""
        forms = tuned.forms()
        dense = {n: forms[n] for n in self.maskable}
        chosen = top_k_entries({n: f.delta for n, f in dense.items()}, self.k_iteration,
                               {n: idx for n, (idx, _) in self._start.items()})
        new: dict[str, Sparse] = {}
        for name, form in dense.items():
            sparse = _empty_sparse(form)
            device = form.delta.device
            old_idx, old_val = self._start.get(name, (sparse.indices, sparse.values.detach()))
            # the mask so far keeps its iteration-start values, the new entries start at zero
            idx, val = sparse_sum(old_idx.to(device, sparse.indices.dtype), old_val.to(device, sparse.values.dtype),
                                  chosen[name], torch.zeros(chosen[name].numel(), dtype=sparse.values.dtype, device=device))
            sparse.set_support(idx, val)
            new[name] = sparse
        self._reset_head(forms)
        if optimizer is not None:  # a fresh optimizer: no moments of the full phase survive
            release_state(optimizer, list(tuned.deltas.parameters()))
        tuned.replace_forms(new)
        self.phase, self._start, self._head_start = "sparse", {}, {}
        return chosen

    def _reset_head(self, forms: dict) -> None:
        with torch.no_grad():
            for name in self.head:
                delta = forms[name].delta
                start = self._head_start.get(name)
                if start is None:
                    delta.zero_()
                else:
                    delta.copy_(start)

    def next_iteration(self, tuned: Tuned, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Start the next full phase from the sparse result (it is also what the next switch resets to)."""
        forms = tuned.forms()
        self._start = {n: (forms[n].indices.detach().clone(), forms[n].values.detach().clone()) for n in self.maskable}
        self._head_start = {n: forms[n].delta.detach().clone() for n in self.head}
        new = {n: _dense_from(forms[n], forms[n].delta_weight().detach()) for n in self.maskable}
        if optimizer is not None:
            release_state(optimizer, list(tuned.deltas.parameters()))
        tuned.replace_forms(new)
        self.iteration += 1
        self.phase = "full"

    # -- regulariser ------------------------------------------------------------------------------
    def extra_loss(self, tuned: Tuned) -> torch.Tensor | None:
        lam = self.cfg.l1_full if self.phase == "full" else self.cfg.l1_sparse
        if lam == 0:
            return None
        forms = tuned.forms()
        names = self.maskable if self.cfg.l1_maskable_only else self.maskable + self.head
        # |θ − θ0| is |Δ|: the dense delta, or the sparse values (zero off the mask)
        total = sum(_trained(forms[n]).abs().sum() for n in names)
        return lam * total / self._n_all

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"iteration": self.iteration, "phase": self.phase, "bounds": self.bounds}
        if self._start:
            state["start"] = {n: {"indices": i, "values": v} for n, (i, v) in self._start.items()}
        if self._head_start:
            state["head_start"] = dict(self._head_start)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the phase and rebuild the forms it had (the loop loads the delta tensors next)."""
        if self._tuned is None:
            raise DeltatuneError("lt-sft: the policy has no model yet; attach it (dt.attach) before loading its state")
        self.iteration, self.phase = int(state["iteration"]), str(state["phase"])
        self.bounds = [list(map(int, b)) for b in state["bounds"]] if state.get("bounds") is not None else None
        self._restored = self.bounds is not None
        self._start = {n: (d["indices"], d["values"]) for n, d in state.get("start", {}).items()}
        self._head_start = dict(state.get("head_start", {}))
        forms = self._tuned.forms()
        if self.phase == "sparse":  # sized by the loaded indices (Sparse resizes on load)
            self._tuned.replace_forms({n: _empty_sparse(forms[n]) for n in self.maskable})
        elif self.iteration > 0:  # a later full phase: same forms as the switch made, in the same order
            self._tuned.replace_forms({n: _dense_from(forms[n]) for n in self.maskable})


def _trained(form: WeightDelta) -> torch.Tensor:
    return form.values if isinstance(form, Sparse) else form.delta


# -- the method ---------------------------------------------------------------------------------
# why it cannot train on a quantized base (deltatune.core.quantized): said in its one-line refusal
QUANTIZED_BASE = (
    "its first phase trains every target weight as a dense delta"
)


@register("lt-sft", LtSftConfig, "LT-SFT: full phase, keep the K entries that moved most, retrain them only (composable)",
          traits=Traits(quantized_base=QUANTIZED_BASE), family="sparse")
def build(model: nn.Module, cfg: LtSftConfig, *, loading: bool = False) -> Built:
    head = head_parameters(model, cfg.head)
    maskable = maskable_parameters(model, cfg, head)
    forms: dict[str, WeightDelta] = {}
    for name, p in maskable:
        sites = sites_of(model, p)
        # loading: empty sparse forms take the stored support (full-phase artifacts store the same names)
        forms[name] = (Sparse(sites, name, 0, dtype=delta_dtype(p)) if loading
                       else DenseAsSparse(sites, name, dtype=delta_dtype(p)))
    head_forms = dense_forms(model, head)
    forms.update(head_forms)
    if loading:
        return Built(forms)
    n_maskable = sum(p.numel() for _, p in maskable)
    k_total = cfg.k if cfg.k is not None else int((cfg.density if cfg.density is not None else 0.01) * n_maskable)
    if k_total > n_maskable:
        raise DeltatuneError(f"k={k_total} exceeds the {n_maskable} maskable entries: lower k or widen targets")
    if k_total < cfg.n_iterations:
        raise DeltatuneError(
            f"lt-sft would keep {k_total} entries of {n_maskable}, fewer than one per iteration "
            f"(n_iterations={cfg.n_iterations}): raise density or k"
        )
    return Built(forms, LtSftPolicy(cfg, [n for n, _ in maskable], list(head_forms), k_total))
