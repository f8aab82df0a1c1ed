"""SpIEL (Ansell et al., 2024, arXiv 2401.16405): sparse fine-tuning with prune-and-regrow.

Every target matrix holds k (index, value) pairs (the sparse form). Training alternates ordinary
optimizer steps on the values with periodic reselection: drop the slots whose values changed least,
regrow as many new indices, chosen either from the accumulated gradients of a candidate set
(``regrow="grad"``, SpIEL-AG) or from SM3's row/column accumulators (``regrow="sm3"``, SpIEL-MA, no
dense gradient at all). The schedule, the drop/grow rules, the optimizer seeding of regrown slots and
the per-element bias correction follow the official code (AlanAnsell/peft ``tuners/sft``).

On a quantized base (``deltatune.data.models.load(name, quantize="nf4")``), as the paper's quantized variant:
the sparse values are added to the dequantized weight inside each layer's forward and backward
(``deltatune.core.forms.sparse``), and the density counts every quantized weight as the matrix it stands for.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn as nn

from deltatune.core import quantized
from deltatune.core.forms.sparse import Sparse, split_budget
from deltatune.core.optim import SM3, ElementAdamW
from deltatune.core.policy import Policy
from deltatune.core.registry import Built, Traits, register
from deltatune.core.targeting import sites_of
from deltatune.core.tuned import Tuned
from deltatune.errors import DeltatuneError
from deltatune.methods._common import block_matrices

_MATCH = re.compile(r"^lora:r=(\d+)$")


@dataclass
class SpielConfig:
    density: float = 0.01  # K = density × all model parameters (SftConfig default)
    k: int | None = None  # or an explicit total number of trainable entries
    match: str | None = None  # or "lora:r=8": exactly the trainable count of that LoRA on the same targets
    targets: list[str] | None = None  # None: every Linear / Conv1D in the blocks (sft-llm: q,k,v,o,gate,up,down)
    layers: list[int] | str | None = None  # blocks: an index, a list, or 'start:stop' (None: all)
    exclude: list[str] | None = None  # name patterns left out (as in targets)
    regrow: Literal["grad", "sm3"] = "grad"  # SpIEL-AG ("rigl" in the code) or SpIEL-MA
    reselection_steps: int = 20  # S: SftConfig and finetune.py (args.py says 100)
    selection_accumulation_steps: int = 5  # γ: backward passes whose gradients rank the candidates
    initial_reselection_rate: float = 0.2  # ξ: fraction of slots swapped at the first scheduled reselection
    reselection_policy: Literal["linear", "cosine"] = "linear"  # how p_t decays to 0 over the run
    betas: tuple[float, float] = (0.9, 0.999)  # SftAdamW
    eps: float = 1e-6  # SftAdamW

    def __post_init__(self) -> None:
        if self.match is not None and not _MATCH.match(self.match):
            raise ValueError(f"match={self.match!r}: write it as 'lora:r=<rank>', e.g. 'lora:r=8'")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density={self.density} must be in (0, 1]")
        if self.reselection_steps < 1 or not 0 <= self.selection_accumulation_steps < self.reselection_steps:
            raise ValueError("need reselection_steps >= 1 and 0 <= selection_accumulation_steps < reselection_steps")
        self.betas = tuple(self.betas)  # YAML gives a list


def _in_out(module: nn.Module) -> tuple[int, int]:
    if quantized.is_quantized(module):  # packed storage: its (out, in) is on the layer
        out, inp = quantized.features(module)
        return inp, out
    w = module.weight
    return (w.shape[0], w.shape[1]) if type(module).__name__ == "Conv1D" else (w.shape[1], w.shape[0])


def budget(model: nn.Module, modules: list[tuple[str, nn.Module]], cfg: SpielConfig) -> int:
    """The total number of trainable entries K."""
    if cfg.match is not None:
        r = int(_MATCH.match(cfg.match).group(1))
        return sum(r * sum(_in_out(m)) for _, m in modules)
    if cfg.k is not None:
        return int(cfg.k)
    return int(cfg.density * quantized.num_parameters(model))  # a packed 4-bit weight counts as its matrix


@register("spiel", SpielConfig, "SpIEL: sparse fine-tuning with prune-and-regrow by gradients or SM3 (Ansell et al., 2024)",
          traits=Traits(quantized_base=True), family="sparse")
def build(model: nn.Module, cfg: SpielConfig, *, loading: bool = False) -> Built:
    modules = block_matrices(model, cfg.targets, cfg.layers, cfg.exclude)
    total = budget(model, modules, cfg)
    sizes = [quantized.weight_numel(m) for _, m in modules]
    room = sum(sizes)
    if total > room:
        raise DeltatuneError(f"SpIEL budget {total:,} exceeds the {room:,} entries of its targets: lower density/k")
    shares = split_budget(total, sizes)
    forms = {f"{name}.weight": Sparse(sites_of(model, m.weight), "weight", k) for (name, m), k in zip(modules, shares, strict=True)}
    return Built(dict(forms), SpielPolicy(cfg))


class SpielPolicy(Policy):
    """The reselection schedule (t = completed optimizer steps, S = reselection_steps, γ = accumulation):
    a selection phase is open from t = 0 and from every t with (t+1) mod S = 0; it closes when
    t mod S = γ, and the reselection runs then, with p = 1 the first time and p_t after."""

    name = "spiel"

    def __init__(self, cfg: SpielConfig) -> None:
        self.cfg = cfg
        self.total_steps: int | None = None
        self.grad_accum = 1
        self.completed = 0
        self.phase_open = True
        self.selections = 0
        self.candidates: dict[str, dict[str, torch.Tensor]] = {}
        self.forms: dict[str, Sparse] = {}

    # -- wiring ---------------------------------------------------------------------------
    def setup(self, tuned: Tuned) -> None:
        self.forms = {n: f for n, f in tuned.forms().items() if isinstance(f, Sparse)}
        self._names = {id(f): n for n, f in self.forms.items()}
        self._by_values = {id(f.values): f for f in self.forms.values()}  # SM3 asks for every tensor, every step
        self._observe(self.phase_open)

    def plan(self, total_steps: int, grad_accum: int) -> None:
        self.total_steps, self.grad_accum = total_steps, grad_accum

    def make_optimizer(self, params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
        if self.cfg.regrow == "sm3":
            return SM3(params, lr=lr, weight_decay=weight_decay, layout=self._layout)
        return ElementAdamW(params, lr=lr, betas=self.cfg.betas, eps=self.cfg.eps, weight_decay=weight_decay)

    def _layout(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
        form = self._by_values.get(id(p))
        if form is None or len(form.shape) != 2:
            return None
        rows, cols = form.rows_cols()
        return rows, cols, form.shape[0], form.shape[1]

    def _observe(self, on: bool) -> None:
        """Candidate statistics come from the dense gradient each sparse layer computes in backward."""
        wanted = on and self.cfg.regrow == "grad"
        for form in self.forms.values():
            form.grad_observer = self._accumulate if wanted else None

    def _accumulate(self, form: Sparse, grad: torch.Tensor) -> None:
        """Data parallel (DDP, FSDP2): the statistics are the global batch's, averaged over the ranks (a collective
        in backward, where every rank observes the same layers in the same order), so every rank ranks the same
        candidates and a sharded run regrows as one process with the global batch would."""
        name = self._names[id(form)]
        flat = grad.detach().reshape(-1).float()
        c = self.candidates.get(name)
        if c is None:  # the phase's first backward fixes the candidate set: the top-k |G|
            flat = _mean_over_ranks(flat)  # the whole gradient once per phase; after it, the k candidates only
            idx = torch.topk(flat.abs(), min(form.k, flat.numel())).indices
            g = flat[idx]
            self.candidates[name] = {"idx": idx, "sum": g.clone(), "sum_sq": g * g, "count": torch.ones((), dtype=torch.long)}
        else:
            g = _mean_over_ranks(flat[c["idx"]])
            c["sum"] += g
            c["sum_sq"] += g * g
            c["count"] += 1

    # -- the schedule -----------------------------------------------------------------------
    def rate(self, t: int) -> float:
        """p_t: the fraction of slots swapped at reselection t (1 at the first)."""
        if self.selections == 0:
            return 1.0
        if self.total_steps is None or t > self.total_steps:
            return 0.0
        xi = self.cfg.initial_reselection_rate
        if self.cfg.reselection_policy == "linear":
            return xi * (1 - t / self.total_steps)
        return xi * (1 + math.cos(math.pi * t / self.total_steps)) / 2

    def after_optimizer_step(self, step: int, tuned: Tuned, optimizer: torch.optim.Optimizer) -> None:
        S, gamma = self.cfg.reselection_steps, self.cfg.selection_accumulation_steps
        t = self.completed = step + 1
        if self.phase_open and t % S == gamma:
            self.reselect(self.rate(t), optimizer)
            self.phase_open = False
            self.candidates = {}
            self._observe(False)
        if (t + 1) % S == 0 and (self.total_steps is None or t < self.total_steps):
            self.phase_open = True
            self._observe(True)

    # -- one reselection --------------------------------------------------------------------
    def reselect(self, p: float, optimizer: torch.optim.Optimizer | None) -> None:
        for name, form in self.forms.items():
            n = math.floor(form.k * p)
            with _whole(form, optimizer):  # FSDP2: the swap on whole copies of the sharded values and state
                if n > 0:
                    self._swap(name, form, n, optimizer)
                if dist.is_available() and dist.is_initialized():
                    _broadcast_form(form, optimizer)  # rank 0's decision is every rank's (already the same)
        self.selections += 1

    def _grow_scores(self, name: str, form: Sparse, optimizer: torch.optim.Optimizer | None
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(candidate flat indices, score) for regrowth."""
        if self.cfg.regrow == "grad":
            c = self.candidates.get(name)
            return None if c is None else (c["idx"], c["sum"].abs())
        state = optimizer.state.get(form.values, {}) if optimizer is not None else {}
        if "row" not in state:
            return None
        score = torch.outer(state["row"], state["col"]).reshape(-1)  # r_i·c_j for every entry (code; SM3 would take min)
        return torch.arange(score.numel(), device=score.device), score

    def _swap(self, name: str, form: Sparse, n: int, optimizer: torch.optim.Optimizer | None) -> None:
        found = self._grow_scores(name, form, optimizer)
        if found is None:
            return  # no statistics yet (no backward in this phase): nothing to grow from
        cand, score = found
        idx = form.indices.long()
        values = form.values.detach()
        dropped = torch.topk(values.abs(), n, largest=False).indices  # the n slots that changed least
        keep = torch.ones(form.k, dtype=torch.bool, device=idx.device)
        keep[dropped] = False
        # candidates that are still active after the drop cannot grow again
        score = score.clone().float()
        score[torch.isin(cand, idx[keep])] = -math.inf
        n_grow = min(n, int(torch.isfinite(score).sum()))
        if n_grow < n:  # too few candidates: drop only as many as can be regrown
            dropped = torch.topk(values.abs(), n_grow, largest=False).indices
            keep = torch.ones(form.k, dtype=torch.bool, device=idx.device)
            keep[dropped] = False
        order = torch.topk(score, n_grow).indices
        grown = cand[order]
        # a position both dropped and regrown keeps its slot, value and optimizer state
        stays = torch.isin(idx[dropped], grown)
        slots = dropped[~stays]
        new = grown[~torch.isin(grown, idx[dropped])]
        new_order = order[~torch.isin(grown, idx[dropped])]
        with torch.no_grad():
            idx[slots] = new
            form.indices.copy_(idx.to(form.indices.dtype))
            form.values[slots] = 0
        if torch.unique(form.indices).numel() != form.k:
            raise AssertionError("SpIEL reselection produced a repeated index")  # cannot happen: guards the invariant
        self._seed_optimizer(name, form, slots, new_order, optimizer)

    def _seed_optimizer(self, name: str, form: Sparse, slots: torch.Tensor, picked: torch.Tensor,
                        optimizer: torch.optim.Optimizer | None) -> None:
        """Regrown slots start with moments estimated from the phase's gradients (AG) or empty."""
        if optimizer is None:
            return
        state = optimizer.state.get(form.values)
        if not state or "exp_avg" not in state:
            return
        with torch.no_grad():
            state["exp_avg"][slots] = 0
            state["exp_avg_sq"][slots] = 0
            if "age" in state:
                state["age"][slots] = 0
            c = self.candidates.get(name)
            if self.cfg.regrow != "grad" or c is None or "age" not in state:
                return
            b1, b2 = self.cfg.betas
            count = c["count"].float()
            # each observed gradient carries the loss's 1/grad_accum: × grad_accum gives a per-step gradient
            mean_g = c["sum"][picked] / count * self.grad_accum
            mean_g2 = c["sum_sq"][picked] / count * self.grad_accum**2
            age = count / self.grad_accum
            state["exp_avg"][slots] = (mean_g * (1 - b1**age)).to(state["exp_avg"].dtype)
            state["exp_avg_sq"][slots] = (mean_g2 * (1 - b2**age)).to(state["exp_avg_sq"].dtype)
            state["age"][slots] = age

    # -- checkpoint ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"completed": self.completed, "phase_open": self.phase_open, "selections": self.selections,
                "candidates": {n: dict(c) for n, c in self.candidates.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.completed = int(state["completed"])
        self.phase_open = bool(state["phase_open"])
        self.selections = int(state["selections"])
        self.candidates = {n: {k: v.clone() for k, v in c.items()} for n, c in state["candidates"].items()}
        self._observe(self.phase_open)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over the ranks (a new tensor; ``t`` itself when not distributed)."""
    if not _distributed():
        return t
    out = t.clone()
    dist.all_reduce(out)
    return out.div_(dist.get_world_size())


def _is_dtensor(t: Any) -> bool:
    if not _distributed():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _put(shard: torch.Tensor, whole: torch.Tensor) -> None:
    """Write this rank's part of ``whole`` into the DTensor ``shard`` in place (the optimizer keeps holding it)."""
    from torch.distributed.tensor import distribute_tensor

    piece = distribute_tensor(whole.detach().to(shard.device_mesh.device_type), shard.device_mesh, shard.placements)
    with torch.no_grad():
        shard.to_local().copy_(piece.to_local())


@contextlib.contextmanager
def _whole(form: Sparse, optimizer: torch.optim.Optimizer | None) -> Iterator[None]:
    """Under FSDP2 (``train/distributed_fsdp.py``) the values and their optimizer state are this rank's shards
    (DTensors) outside the forward: inside, ``form.values`` and its state are whole copies (gathered: a collective,
    every rank enters it for every form), written back into the shards on exit. Anything else: a no-op."""
    shard = form.values
    if not _is_dtensor(shard):
        yield
        return
    whole = nn.Parameter(shard.full_tensor().detach().clone(), requires_grad=shard.requires_grad)
    state = optimizer.state.get(shard) if optimizer is not None else None
    sharded = {k: v for k, v in (state or {}).items() if _is_dtensor(v)}
    whole_state = {**(state or {}), **{k: v.full_tensor() for k, v in sharded.items()}}
    form._parameters["values"] = whole
    if state:
        optimizer.state[whole] = whole_state
    try:
        yield
    finally:
        form._parameters["values"] = shard
        if state:
            optimizer.state.pop(whole, None)
    _put(shard, whole)
    for k, v in sharded.items():
        _put(v, whole_state[k])


def _broadcast_form(form: Sparse, optimizer: torch.optim.Optimizer | None) -> None:
    dist.broadcast(form.indices, 0)
    dist.broadcast(form.values.data, 0)
    state = optimizer.state.get(form.values, {}) if optimizer is not None else {}
    for key in ("exp_avg", "exp_avg_sq", "age"):
        if key in state:
            dist.broadcast(state[key], 0)
