"""IncreLoRA (Zhang et al., 2023, arXiv 2308.12043): incremental rank allocation over SVD-form deltas.

Every targeted matrix starts as AdaLoRA's triplet form (``_svd_triplet.SVDTriplet``) of rank ``init_r`` with
λ = 0, so training starts at the base model. The policy (official FeiyuZhang98/IncreLoRA ``RankAllocator``):

1. step 0: every matrix gets ``incre_rank_num`` rank-1 *reserve* components (A, B ~ N(0, 0.02²), λ fixed at
   1e-5): in the forward pass but not in ``ranknum``, their A and B train ahead of time (advance learning);
2. every step while the total rank is below the budget: the module score Σ|ΔW ⊙ ∂L/∂ΔW| / √numel(ΔW),
   taken in backward from the layer's input and output gradient (ΔW is never kept), smoothed with AdaLoRA's
   estimator (``_importance.SmoothedImportance``, the one AdaLoRA uses);
3. if step > init_warmup and step % incre_interval == 0: the top_h modules by score each activate their
   reserves (λ trainable from 1e-5, ranknum += incre_rank_num, which rescales all components α/ranknum as
   the official code does) and get fresh reserves;
4. at the budget (target_rank × #modules): scoring stops and the last reserves get λ = 0, frozen.

The scale is alpha / (ranknum + 1e-5) with ranknum = the active rank; the regulariser is AdaLoRA's
orthogonality term over every stored chunk (``orth_concat`` = True: over each module's concatenated factors).

Where the official code goes wrong, this does not: exactly min(top_h, ⌈left / incre_rank_num⌉) modules grow
per round (ties broken by module order, no ``>=`` overshoot) and the last round gives only the rank left,
so the total never passes the budget and the final clean-up always runs.

Structure. The new components live in one extra form, ``increlora.chunks`` (a ``ChunkStore``: parameters
only, no effect of its own), in creation order; each matrix's form holds references to its chunks. So
``tuned.deltas.parameters()`` lists new tensors in the order the training loop's ``sync_optimizer`` appended
them to the optimizer, and a resumed run — whose policy re-creates the chunks (``load_state_dict``, before
the delta tensors load) — builds an optimizer whose state lines up with the checkpoint's. Existing tensors
keep their Adam moments when others are added (as the official code's extra param groups do).

Artifact: per matrix the components with λ ≠ 0 (active ones, plus reserves while their λ is 1e-5, so a
mid-run artifact is exact too) and ``ranknum``; the loaded form knows each matrix's final rank.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from deltatune.core.forms.base import Form
from deltatune.core.policy import Policy
from deltatune.core.registry import Built, Traits, register
from deltatune.core.targeting import sites_of
from deltatune.core.tuned import Tuned
from deltatune.errors import DeltatuneError
from deltatune.methods._importance import SmoothedImportance, orthogonality
from deltatune.methods._svd_triplet import SVDTriplet, svd_targets

RESERVE_LAMBDA = 1e-5  # λ of a reserve component under advance learning (official add_reserve_param)
STORE = "increlora.chunks"  # the name of the form holding the grown components


@dataclass
class IncreLoraConfig:
    # Defaults: the official GLUE scripts (NLU/scripts/rank=2, MNLI) unless said otherwise.
    init_r: int = 1  # lora_r: initial rank of every matrix
    target_rank: int = 2  # average final rank; the budget is target_rank × #matrices
    budget: int | None = None  # target_total_rank: the total rank instead
    incre_rank_num: int | None = None  # rank added per chosen module; None: {2:1, 4:2, 6:3, 8:4}[target_rank]
    top_h: int = 2  # modules that grow per round (MNLI 2, SST-2 5, CoLA 3, QNLI 12)
    # Steps before the first round and between rounds (MNLI: 1000 / 1000). None: equal values such that
    # allocation ends a third into the run, as the GLUE scripts' allocation does (~1/3) [inferred].
    init_warmup: int | None = None
    incre_interval: int | None = None  # steps between rounds that add rank (None: see init_warmup)
    alpha: float = 16.0  # numerator of alpha / (ranknum + 1e-5) (scripts: 16-32)
    beta1: float = 0.85  # sensitivity EMA
    beta2: float = 0.85  # uncertainty EMA
    orth_reg_weight: float = 0.1  # γ of the orthogonality regulariser
    orth_concat: bool = False  # False: per stored chunk, as the official code; True: per matrix, concatenated
    advance_learn: bool = True  # reserves train their A, B ahead of activation
    dropout: float = 0.0  # on the adapter branch (scripts: 0-0.2)
    seed: int = 0  # draws of the reserve components (a generator saved with the policy)
    # The paper adapts query, key, value, both FFN matrices and the attention output; None: every
    # Linear / GPT-2 Conv1D in the numbered blocks.
    targets: list[str] | None = None
    layers: list[int] | str | None = None  # blocks: an index, a list, or 'start:stop' (None: all)
    exclude: list[str] | None = None  # name patterns left out (as in targets)

    def __post_init__(self) -> None:
        if self.init_r < 1:
            raise ValueError(f"init_r={self.init_r} must be >= 1")
        if self.target_rank < 1 or (self.budget is not None and self.budget < 1):
            raise ValueError("target_rank and budget must be >= 1")
        if self.incre_rank_num is not None and self.incre_rank_num < 1:
            raise ValueError(f"incre_rank_num={self.incre_rank_num} must be >= 1")
        if self.top_h < 1:
            raise ValueError(f"top_h={self.top_h} must be >= 1")
        for name in ("init_warmup", "incre_interval"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "init_warmup" else 1):
                raise ValueError(f"{name}={value} is out of range")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight={self.orth_reg_weight} must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")

    @property
    def incre(self) -> int:
        # the official table {2:1, 4:2, 6:3, 8:4} is target_rank // 2; other ranks extend it the same way
        return self.incre_rank_num or max(1, self.target_rank // 2)


# -- forms ------------------------------------------------------------------------------------------
class ChunkStore(Form):
    """The components added during training, in creation order. It has no effect of its own (the matrices'
    forms use its tensors) and stores nothing in the artifact (those forms store their components)."""

    kind = "chunk-store"

    def __init__(self) -> None:
        super().__init__()
        self.chunks = nn.ParameterList()

    def attach(self) -> None:
        self.attached = True

    def detach(self) -> None:
        self.attached = False

    def merge(self) -> None:
        self.merged = True

    def unmerge(self) -> None:
        self.merged = False

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def stored_tensors_names(self) -> list[str]:
        return []


class IncreTriplet(SVDTriplet):
    """An SVD triplet of rank init_r plus rank-1 chunks (A, E, B) held in the ``ChunkStore``: the first
    ``n_active`` of them are active, the rest reserves. ranknum = init_r + active chunks."""

    kind = "incre-triplet"

    def __init__(self, module: nn.Module, r: int, alpha: float, *, dropout: float = 0.0,
                 tied: list[tuple[nn.Module, str]] | None = None) -> None:
        super().__init__(module, r, alpha, dropout=dropout, tied=tied)
        self._chunks: list[tuple[nn.Parameter, nn.Parameter, nn.Parameter]] = []  # references, not registered
        self.n_active = 0
        self._probe: dict[str, Any] | None = None  # set while the policy scores this matrix

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self._chunks:
            return self.A, self.E, self.B
        return (torch.cat([self.A, *(a for a, _, _ in self._chunks)], 0),
                torch.cat([self.E, *(e for _, e, _ in self._chunks)], 0),
                torch.cat([self.B, *(b for _, _, b in self._chunks)], 1))

    @property
    def reserves(self) -> list[tuple[nn.Parameter, nn.Parameter, nn.Parameter]]:
        return self._chunks[self.n_active:]

    def all_chunks(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return [(self.A, self.E, self.B), *self._chunks]

    # -- scoring: Σ|ΔW ⊙ G| / √numel with G = ∂L/∂ΔW = gᵀx, formed in backward one layer at a time -----
    def start_scoring(self) -> None:
        self._probe = {"sum": 0.0, "n": 0}

    def stop_scoring(self) -> None:
        self._probe = None

    def take_score(self) -> float | None:
        """The mean score over this step's backward passes (micro-batches); None if there was none."""
        if self._probe is None or self._probe["n"] == 0:
            return None
        score = self._probe["sum"] / self._probe["n"]
        self._probe = {"sum": 0.0, "n": 0}
        return score

    def output_delta(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        a, e, b = self.factors()
        xd = self.dropout(x.to(a.dtype))
        out = (xd @ (a * e).T @ b.T) * self.scale
        if self._probe is not None and out.requires_grad and module.training:
            saved = xd.detach()
            out.register_hook(lambda g: self._score_hook(g, saved))
        return out

    def _score_hook(self, grad: torch.Tensor, x: torch.Tensor) -> None:
        if self._probe is None:
            return
        with torch.no_grad():
            g = grad.reshape(-1, grad.shape[-1]).float()
            gw = g.T @ x.reshape(-1, x.shape[-1]).float()  # ∂L/∂ΔW in (out, in)
            a, e, b = self.factors()
            dw = (b @ (a * e)).float() * self.scale
            self._probe["sum"] += float((dw * gw).abs().sum()) / math.sqrt(dw.numel())
            self._probe["n"] += 1

    # -- artifact: components with λ ≠ 0, and ranknum -------------------------------------------
    def kept(self) -> torch.Tensor:
        return self.factors()[1].detach().reshape(-1) != 0

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        a, e, b = (t.detach() for t in self.factors())
        keep = self.kept()
        return {"A": a[keep], "E": e[keep], "B": b[:, keep],
                "ranknum": torch.tensor([self.ranknum], dtype=torch.float32)}

    def stored_tensors_names(self) -> list[str]:
        return ["A", "E", "B", "ranknum"]

    def load_stored(self, tensors: dict[str, torch.Tensor]) -> None:
        if self._chunks:
            raise DeltatuneError("load an IncreLoRA artifact into a freshly attached model (dt.load)")
        super().load_stored({k: tensors[k] for k in ("A", "E", "B")})
        self.ranknum = float(tensors["ranknum"].reshape(-1)[0])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", chunks={len(self._chunks)}, active={self.n_active}"


# -- the schedule -----------------------------------------------------------------------------------
def rounds_needed(initial: int, budget: int, top_h: int, incre: int) -> int:
    """⌈(budget − initial) / (top_h · incre)⌉ (official ``set_total_step``)."""
    return max(0, math.ceil((budget - initial) / (top_h * incre)))


def growth_schedule(initial: int, budget: int, top_h: int, incre: int, warmup: int, interval: int,
                    n_modules: int) -> list[tuple[int, int]]:
    """(step, total rank after it) of every growth round: steps s > warmup with s % interval == 0."""
    out, total = [], initial
    step = (warmup // interval + 1) * interval
    while total < budget:
        left = budget - total
        h = min(top_h, n_modules, math.ceil(left / incre))
        total += min(h * incre, left)
        out.append((step, total))
        step += interval
    return out


# -- the policy -------------------------------------------------------------------------------------
class IncreLoraPolicy(Policy):
    """Reserves at step 0, module scores each step, rank growth every interval, clean-up at the budget."""

    name = "increlora"

    def __init__(self, cfg: IncreLoraConfig, names: list[str]) -> None:
        self.cfg = cfg
        self.names = names
        self.importance = SmoothedImportance(cfg.beta1, cfg.beta2)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.owners: list[int] = []  # module index of every chunk, in creation order
        self.started = False  # reserves added (step 0 ran)
        self.done = False  # budget reached
        self.timing: tuple[int, int] | None = None  # (init_warmup, incre_interval)
        self._restored = False
        self._tuned: Tuned | None = None

    def setup(self, tuned: Tuned) -> None:
        self._tuned = tuned
        self.setup_scoring()  # the official backward hook scores from the first step

    def _forms(self) -> dict[str, IncreTriplet]:
        if self._tuned is None:
            raise DeltatuneError("increlora: the policy has no model yet; attach it with dt.attach")
        forms = self._tuned.forms()
        return {n: forms[n] for n in self.names}

    def _store(self) -> ChunkStore:
        assert self._tuned is not None
        return self._tuned.forms()[STORE]

    @property
    def budget(self) -> int:
        return self.cfg.budget if self.cfg.budget is not None else self.cfg.target_rank * len(self.names)

    @property
    def initial(self) -> int:
        return self.cfg.init_r * len(self.names)

    def total_rank(self) -> int:
        return int(sum(f.ranknum for f in self._forms().values()))

    def plan(self, total_steps: int, grad_accum: int) -> None:
        if self.budget < self.initial:
            raise DeltatuneError(f"increlora: the budget {self.budget} is below the initial total rank "
                                 f"{self.initial}: raise target_rank / budget or lower init_r")
        if self._restored:
            return
        rounds = rounds_needed(self.initial, self.budget, self.cfg.top_h, self.cfg.incre)
        derived = max(1, total_steps // (3 * (rounds + 1)))
        warmup = self.cfg.init_warmup if self.cfg.init_warmup is not None else derived
        interval = self.cfg.incre_interval if self.cfg.incre_interval is not None else derived
        self.timing = (warmup, interval)
        schedule = growth_schedule(self.initial, self.budget, self.cfg.top_h, self.cfg.incre, warmup, interval,
                                   len(self.names))
        if schedule and schedule[-1][0] >= total_steps:
            warnings.warn(f"increlora: allocation would end at step {schedule[-1][0]} of a {total_steps}-step run; "
                          "the run ends below the rank budget (lower init_warmup / incre_interval or raise top_h)",
                          stacklevel=2)

    def _timing(self) -> tuple[int, int]:
        if self.timing is None:
            raise DeltatuneError("increlora: call tuned.policy.plan(total_steps, grad_accum) before training "
                                 "(dt.train and the Trainer bridge do it)")
        return self.timing

    # -- the steps ------------------------------------------------------------------------------
    def setup_scoring(self) -> None:
        for form in self._forms().values():
            if self.done:
                form.stop_scoring()
            elif form._probe is None:
                form.start_scoring()

    def after_optimizer_step(self, step: int, tuned: Tuned, optimizer: torch.optim.Optimizer) -> None:
        """The official ``update_and_increase(step)``. It runs before the optimizer step there; here after it,
        which changes nothing: new tensors had no gradient in this step either way."""
        warmup, interval = self._timing()
        if not self.started:
            self.add_reserves(list(range(len(self.names))), self.cfg.incre)
            self.started = True
        if self.done:
            return
        self.update_importance()
        if step > warmup and step % interval == 0:
            self.grow()
        self.setup_scoring()

    def update_importance(self) -> None:
        forms = self._forms()
        raw = [forms[n].take_score() for n in self.names]
        if any(s is None for s in raw):
            self.setup_scoring()
            return  # no backward with scoring on yet (the first step, a skipped step)
        scores = torch.tensor(raw, dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():  # every rank must grow the same modules
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
            t = scores.to(device) if device else scores
            dist.all_reduce(t)
            scores = t.cpu() / dist.get_world_size()
        for name, s in zip(self.names, scores, strict=True):
            self.importance.update(name, s)

    def module_scores(self) -> torch.Tensor:
        return torch.stack([self.importance.score(n) if n in self.importance else torch.tensor(0.0, dtype=torch.float64)
                            for n in self.names])

    def grow(self) -> list[str]:
        """One round: the top modules by smoothed score gain rank (never past the budget)."""
        left = self.budget - self.total_rank()
        if left <= 0:
            return []
        incre = self.cfg.incre
        h = min(self.cfg.top_h, len(self.names), math.ceil(left / incre))
        scores = self.module_scores()
        order = sorted(range(len(self.names)), key=lambda i: (-float(scores[i]), i))  # ties: module order
        chosen = sorted(order[:h])
        forms = self._forms()
        grown = []
        for i in chosen:
            g = min(incre, left)
            if g <= 0:
                break
            self.activate(forms[self.names[i]], g)
            self.add_reserves([i], g)
            left -= g
            grown.append(self.names[i])
        if self.total_rank() >= self.budget:
            self.finish()
        return grown

    def activate(self, form: IncreTriplet, g: int) -> None:
        """The first ``g`` reserves become active components: their λ trains from its reserve value."""
        for a, e, b in form.reserves[:g]:
            e.requires_grad_(True)
            a.requires_grad_(True)
            b.requires_grad_(True)
        form.n_active += g
        form.ranknum += g

    def add_reserves(self, modules: list[int], n: int) -> None:
        """``n`` new rank-1 reserves for each module (official ``add_reserve_param``), drawn from the policy's
        generator and put in the chunk store in creation order."""
        forms = self._forms()
        for i in modules:
            for _ in range(n):
                self._new_chunk(forms[self.names[i]], init=True)
                self.owners.append(i)

    def _new_chunk(self, form: IncreTriplet, init: bool) -> None:
        dev, dtype = form.A.device, form.dtype
        a = torch.zeros(1, form.d_in, dtype=dtype)
        b = torch.zeros(form.d_out, 1, dtype=dtype)
        if init:
            a.normal_(0.0, 0.02, generator=self.generator)
            b.normal_(0.0, 0.02, generator=self.generator)
        learn = self.cfg.advance_learn
        pa = nn.Parameter(a.to(dev), requires_grad=learn)
        pb = nn.Parameter(b.to(dev), requires_grad=learn)
        pe = nn.Parameter(torch.full((1, 1), RESERVE_LAMBDA if learn else 0.0, dtype=dtype, device=dev),
                          requires_grad=False)
        store = self._store()
        store.chunks.extend([pa, pe, pb])
        form._chunks.append((pa, pe, pb))

    def finish(self) -> None:
        """At the budget: scoring stops; the last reserves get λ = 0 and stop training (they no longer act)."""
        self.done = True
        with torch.no_grad():
            for form in self._forms().values():
                form.stop_scoring()
                for a, e, b in form.reserves:
                    e.zero_()
                    for p in (a, e, b):
                        p.requires_grad_(False)
                        p.grad = None

    def ranks(self) -> dict[str, int]:
        return {n: int(f.ranknum) for n, f in self._forms().items()}

    # -- the regulariser ------------------------------------------------------------------------
    def extra_loss(self, tuned: Tuned) -> torch.Tensor | None:
        if self.cfg.orth_reg_weight == 0:
            return None
        forms = self._forms().values()
        if self.cfg.orth_concat:
            parts = [f.factors() for f in forms]
            qs, ps = [a for a, _, _ in parts], [b for _, _, b in parts]
        else:
            qs = [a for f in forms for a, _, _ in f.all_chunks()]
            ps = [b for f in forms for _, _, b in f.all_chunks()]
        penalty = orthogonality(qs, ps)
        return None if penalty is None else self.cfg.orth_reg_weight * penalty

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        forms = self._forms()
        return {
            "started": self.started, "done": self.done, "timing": list(self.timing) if self.timing else None,
            "owners": list(self.owners), "n_active": [forms[n].n_active for n in self.names],
            "ranknum": [forms[n].ranknum for n in self.names], "generator": self.generator.get_state(),
            "importance": self.importance.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Re-create the chunks in their creation order (the loop loads their values next)."""
        forms = self._forms()
        if self.owners or any(f._chunks for f in forms.values()):
            raise DeltatuneError("increlora: load the policy state into a freshly attached model")
        self.started, self.done = bool(state["started"]), bool(state["done"])
        self.timing = tuple(int(v) for v in state["timing"]) if state.get("timing") else None  # type: ignore[assignment]
        self._restored = self.timing is not None
        for i in state["owners"]:
            self._new_chunk(forms[self.names[int(i)]], init=False)
            self.owners.append(int(i))
        for name, n_active, ranknum in zip(self.names, state["n_active"], state["ranknum"], strict=True):
            forms[name].n_active, forms[name].ranknum = int(n_active), float(ranknum)
        self.generator.set_state(state["generator"])
        self.importance.load_state_dict(state.get("importance", {}))
        self.setup_scoring()


# -- the method -------------------------------------------------------------------------------------
@register("increlora", IncreLoraConfig,
          "IncreLoRA: SVD-form ΔW starting at rank 1, rank added to the most important modules up to a budget",
          traits=Traits(quantized_base=True), family="low-rank")
def build(model: nn.Module, cfg: IncreLoraConfig, *, loading: bool = False) -> Built:
    forms: dict[str, Form] = {}
    for name, module in svd_targets(model, cfg.targets, cfg.layers, cfg.exclude):
        form = IncreTriplet(module, cfg.init_r, cfg.alpha, dropout=cfg.dropout,
                            tied=[s for s in sites_of(model, module.weight) if s[0] is not module])
        if not loading:  # official SVDLinear.reset_parameters: E = 0, A, B ~ N(0, 0.02²)
            with torch.no_grad():
                form.A.normal_(0.0, 0.02)
                form.B.normal_(0.0, 0.02)
        forms[f"{name}.weight"] = form
    if loading:  # each form takes its final rank and ranknum from the artifact
        return Built(forms)
    names = list(forms)
    forms[STORE] = ChunkStore()
    return Built(forms, IncreLoraPolicy(cfg, names))
