"""DSEE: Dually Sparsity-Embedded Efficient tuning (Chen et al., ACL 2023, arXiv 2111.00160).

Two kinds of sparsity on top of LoRA-style tuning (official code: VITA-Group/DSEE@61844c3):

1. *Sparse update.* On each adapted weight ΔW = (α/r)(B·A + S): a low-rank part plus a sparse part S
   whose support Ω (N entries per matrix) is fixed before training from a GreBsmo-like low-rank +
   sparse decomposition of the *pretrained* weight. Here that is a sum of two forms on one weight:
   ``<module>.weight.lowrank`` (LowRank, a forward hook) and ``<module>.weight.sparse``
   (:class:`MaskedSparse`, which replaces the module's forward); they compose.
2. *Sparse backbone.* After stage 1 the model is pruned — unstructured global magnitude pruning
   (the adapted matrices scored by |ΔW| "ABS" or |W + ΔW| "WABS", the other matrices by |W|) or
   removal of whole attention heads — and the update trains on (stage 2). A pruning mask is fixed:
   a pruned entry of W stays zero for good. It lives in the same :class:`MaskedSparse` form (the
   adapted matrices) or in a mask-only one, ``<module>.weight.pruned``; merged, the weight is
   W' = M⊙W + ΔW (spec step 8).

``DseePolicy`` runs stage 2 inside one training run: after ``prune_at`` of the optimizer steps it
prunes, drops the optimizer's moments and restarts the LR schedule (the official stage 2 is a new
run from the stage-1 update). The same steps are plain functions here (:func:`prune_unstructured`,
:func:`prune_heads`) for use outside the loop.

Deviations from the official code (each a bug or a crash there): the decomposition runs on any
device without a process group; Ω holds exactly N entries (no ``>=`` ties); the rank of the
decomposition stops growing below min(d_out, d_in) (see ``max_rank_fraction``); WABS scales both
terms of ΔW by α/r; head counts come from the model; S is stored as values on Ω, not a dense matrix.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn

from deltatune.core.forms.base import Form, WeightDelta
from deltatune.core.forms.lowrank import LowRank
from deltatune.core.policy import Policy, release_state
from deltatune.core.registry import Built, Traits, register
from deltatune.core.targeting import select_modules
from deltatune.errors import DeltatuneError
from deltatune.methods._attention_heads import attention_blocks, cut_heads, original_ids, remap_positions
from deltatune.methods._common import block_matrices, dense_forms
from deltatune.methods._lowrank import check_alpha, default_targets
from deltatune.methods._masked_sparse import MaskedSparse

if TYPE_CHECKING:
    from deltatune.core.tuned import Tuned

HEADS = ("classifier", "score")  # the task head of transformers' *ForSequenceClassification models


@dataclass
class DseeConfig:
    # -- the update ΔW = (α/r)(BA + S) on each adapted matrix ------------------------------------------
    r: int = 16  # scripts/*.sh use lora_r 16 in every run (run_glue.py's argument default is 4)
    alpha: float = 32.0  # lora_alpha 32 (code and scripts); α/r scales both B·A and S
    # N entries of S per matrix: 16 as in every shipped script (scripts/*.sh); the argument defaults are 128
    # (run_glue.py) and 64 (run_glue_prune_with_WAB*.py)
    num_sparse: int = 16
    targets: list[str] | None = None  # None: the architecture's q and v projections (official: W_q, W_v)
    layers: list[int] | str | None = None  # blocks: an index, a list, or 'start:stop' (None: all)
    exclude: list[str] | None = None  # name patterns left out (as in targets)
    # modules trained fully (the official code trains the classifier head); "auto": the model's
    # sequence-classification head (``classifier`` / ``score``) if it has one, nothing for causal LMs
    modules_to_save: list[str] | str | None = "auto"
    # -- the decomposition W ≈ U·V + S that picks Ω (run_glue.py, sparse_method "grebsmo") ------------
    outer_iters: int = 100  # rank-growth rounds
    inner_iters: int = 2  # alternating U / V / S updates per round
    rank_step: int = 5  # rows of the residual's R factor appended to V per round
    threshold: float = 0.01  # |S_ij| below this is set to 0 (absolute, tuned to BERT's weight scale)
    # [inferred] the official loop ends at rank 1 + 5·99 = 496 on BERT-base's 768-wide matrices (≈ 0.65·d);
    # at full rank U·V absorbs all of W and S is 0 everywhere, so the rank stops at this share of min(d_out, d_in)
    max_rank_fraction: float = 0.65
    seed: int = 0  # the decomposition's random start (one seeded generator: the same Ω on every rank)
    decompose_device: str = "auto"  # "auto": CUDA when available (100 rounds cost seconds per matrix on a CPU)
    # -- stage 2: pruning (run_glue_prune_with_WAB*.py, scripts/*_unstructured_0.2.sh, *_structured_3.sh) --
    prune_ratio: float = 0.2  # p1: global magnitude pruning of the other matrices (score |W|); scripts 0.2
    prune_ratio_qv: float = 0.2  # p2: global pruning of the adapted matrices (score below); scripts 0.2
    prune_mode: Literal["abs", "wabs"] = "abs"  # ABS |ΔW| (the scripts) or WABS |W + ΔW| (the code's default)
    prune_heads: int = 0  # attention heads removed per layer (structured script: 3 of BERT-base's 12)
    prune_targets: list[str] | None = None  # the "other" matrices; None: every block matrix not adapted + pooler
    prune_at: float = 0.5  # share of the run trained before pruning (SST-2 scripts: 5 + 5 epochs; RTE 5 + 10)
    # heads removed so far, by layer, as indices of the original heads: written by head pruning so that an
    # artifact rebuilds the pruned model when it loads (like transformers' old ``config.pruned_heads``)
    pruned_heads: dict[str, list[int]] | None = field(default=None)

    def __post_init__(self) -> None:
        checks = [
            (self.r > 0, f"r={self.r} must be a positive integer"),
            (self.num_sparse >= 0, f"num_sparse={self.num_sparse} must be >= 0"),
            (self.outer_iters >= 1 and self.inner_iters >= 1 and self.rank_step >= 0,
             "outer_iters and inner_iters must be >= 1 and rank_step >= 0"),
            (0.0 < self.max_rank_fraction <= 1.0, f"max_rank_fraction={self.max_rank_fraction} must be in (0, 1]"),
            (0.0 <= self.prune_ratio < 1.0 and 0.0 <= self.prune_ratio_qv < 1.0,
             f"prune_ratio={self.prune_ratio} and prune_ratio_qv={self.prune_ratio_qv} must be in [0, 1)"),
            (self.prune_heads >= 0, f"prune_heads={self.prune_heads} must be >= 0"),
            (0.0 < self.prune_at <= 1.0, f"prune_at={self.prune_at} must be in (0, 1] (share of the run before pruning)"),
            (not isinstance(self.modules_to_save, str) or self.modules_to_save == "auto",
             f"modules_to_save={self.modules_to_save!r}: give a list of module names, 'auto' or null"),
        ]
        problems = [msg for ok, msg in checks if not ok]
        if problems:
            raise ValueError("; ".join(problems))
        check_alpha(self.alpha)

    @property
    def prunes(self) -> bool:
        return self.prune_ratio > 0 or self.prune_ratio_qv > 0 or self.prune_heads > 0


# -- the decomposition ------------------------------------------------------------------------------
@dataclass
class Decomposition:
    U: torch.Tensor  # (d_out, rank), orthonormal columns
    V: torch.Tensor  # (rank, d_in)
    S: torch.Tensor  # the sparse part (entries below the threshold are 0)
    residual: torch.Tensor  # W − U·V of the last update, before thresholding (|S| where S is non-zero)


def _leading_r_rows(E: torch.Tensor, k: int) -> torch.Tensor:
    """The first k rows of the R factor of QR(E), without factorising all of E: Householder QR treats
    columns in order, so Q's first k columns come from E's first k columns alone, and R[:k] = Q[:, :k]ᵀ E."""
    k = min(k, E.shape[0], E.shape[1])
    q = torch.linalg.qr(E[:, :k]).Q
    return q.T @ E


def decompose(
    weight: torch.Tensor,
    *,
    outer_iters: int = 100,
    inner_iters: int = 2,
    rank_step: int = 5,
    threshold: float = 0.01,
    max_rank: int | None = None,
    generator: torch.Generator | None = None,
) -> Decomposition:
    """DSEE's GreBsmo-like split W ≈ U·V + S (run_glue.py): each round restarts S at 0, alternates
    U = Q of QR((W − S)Vᵀ), V = Uᵀ(W − S), S = hard-threshold(W − U·V), then grows the rank with the
    first ``rank_step`` rows of the R factor of the residual W − U·V − S."""
    w = weight.detach().float()
    m, n = w.shape
    cap = max(1, min(max_rank or min(m, n), m, n))
    U = torch.randn(m, 1, generator=generator).to(w.device)
    V = torch.randn(1, n, generator=generator).to(w.device)
    S = residual = torch.zeros_like(w)
    for it in range(outer_iters):
        S = torch.zeros_like(w)
        for _ in range(inner_iters):
            low = w - S
            U = torch.linalg.qr(low @ V.T).Q
            V = U.T @ low
            residual = w - U @ V
            S = torch.where(residual.abs() < threshold, torch.zeros_like(residual), residual)
        grow = min(rank_step, cap - V.shape[0])
        if it < outer_iters - 1 and grow > 0:  # the official last round grows V and never uses it
            V = torch.cat([V, _leading_r_rows(w - U @ V - S, grow)])
    return Decomposition(U, V, S, residual)


def top_entries(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Flat positions of the n largest scores, sorted: exactly n (the official ``>=`` on a kthvalue keeps ties)."""
    if n > scores.numel():
        raise DeltatuneError(f"num_sparse={n} is more than the {scores.numel()} entries of the matrix; lower it")
    return torch.topk(scores.reshape(-1), n, sorted=False).indices.sort().values


def sparse_support(weight: torch.Tensor, n: int, cfg: DseeConfig, generator: torch.Generator) -> torch.Tensor:
    """Ω for one pretrained weight (2-d, in its own layout): the N largest |S| of its decomposition.
    Ranked by the residual before thresholding, which equals |S| wherever S is non-zero and still
    orders the rest when fewer than N entries pass the threshold."""
    device = weight.device
    if cfg.decompose_device == "auto":
        device = torch.device("cuda") if torch.cuda.is_available() else weight.device
    elif cfg.decompose_device:
        device = torch.device(cfg.decompose_device)
    rank_cap = max(1, int(cfg.max_rank_fraction * min(weight.shape)))
    dec = decompose(weight.to(device), outer_iters=cfg.outer_iters, inner_iters=cfg.inner_iters,
                    rank_step=cfg.rank_step, threshold=cfg.threshold, max_rank=rank_cap, generator=generator)
    return top_entries(dec.residual.abs(), n).to(weight.device)


# -- the parts of the delta on one matrix ------------------------------------------------------------
LOWRANK, SPARSE, PRUNED = "lowrank", "sparse", "pruned"


@dataclass
class Parts:
    """The DSEE forms on one base matrix (module name -> parts)."""

    module: nn.Module
    lowrank: LowRank | None = None
    sparse: MaskedSparse | None = None  # an adapted matrix: Ω values + mask
    pruned: MaskedSparse | None = None  # another matrix: mask only

    @property
    def masked(self) -> MaskedSparse | None:
        return self.sparse or self.pruned


def parts_of(tuned: Tuned) -> dict[str, Parts]:
    out: dict[str, Parts] = {}
    for name, form in tuned.forms().items():
        module_name, _, part = name.rpartition(".weight.")
        if part in (LOWRANK, SPARSE, PRUNED) and isinstance(form, LowRank | MaskedSparse):
            parts = out.setdefault(module_name, Parts(form.sites[0][0]))
            setattr(parts, part, form)
    return out


def update_of(parts: Parts) -> torch.Tensor:
    """ΔW = (α/r)(B·A + S) in the base layout (no pruning mask); zero for a matrix DSEE does not adapt."""
    with torch.no_grad():
        w = parts.module.weight
        delta = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        if parts.lowrank is not None:
            delta += parts.lowrank.delta_weight().float()
        if parts.sparse is not None:
            delta += parts.sparse.support_delta().float()
        return delta


def masked_base(parts: Parts, magnitude: bool = False) -> torch.Tensor:
    """M⊙W0 (or |M⊙W0|): the base weight with the current pruning mask applied, in fp32."""
    with torch.no_grad():
        w = parts.module.weight.detach().float()
        w = w.abs() if magnitude else w.clone()
        if parts.masked is not None and parts.masked.num_pruned:
            w.view(-1).index_fill_(0, parts.masked.pruned.long(), 0)
        return w


# -- stage 2a: unstructured pruning --------------------------------------------------------------------
def global_smallest(scores: list[torch.Tensor], ratio: float) -> list[torch.Tensor]:
    """Global magnitude pruning: the round(ratio·total) smallest scores over all tensors together,
    exactly that many (ties at the threshold go to the earliest positions), as flat positions per tensor."""
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    k = round(ratio * flat.numel())
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        threshold = torch.kthvalue(flat, k).values
        chosen = flat < threshold
        ties = (flat == threshold).nonzero().view(-1)
        chosen[ties[: k - int(chosen.sum())]] = True
    out, start = [], 0
    for s in scores:
        out.append(chosen[start:start + s.numel()].nonzero().view(-1).to(s.device))
        start += s.numel()
    return out


def prune_unstructured(tuned: Tuned, ratio: float, ratio_qv: float, mode: str = "abs") -> None:
    """Stage 2a: fix pruning masks. The adapted matrices are pruned together at ``ratio_qv`` by |ΔW| (ABS)
    or |M⊙W + ΔW| (WABS, α/r on both terms of ΔW); the other matrices at ``ratio`` by |M⊙W|. Earlier
    masks score 0 there, so pruning again only adds to them."""
    if mode not in ("abs", "wabs"):
        raise DeltatuneError(f"prune_mode={mode!r} is not a DSEE score: use 'abs' or 'wabs'")
    parts = list(parts_of(tuned).values())
    adapted = [p for p in parts if p.sparse is not None]
    others = [p for p in parts if p.pruned is not None]
    if ratio_qv > 0 and adapted:
        scores = [update_of(p) + (masked_base(p) if mode == "wabs" else 0) for p in adapted]
        for p, idx in zip(adapted, global_smallest([s.abs() for s in scores], ratio_qv), strict=True):
            p.sparse.set_pruned(idx)
    if ratio > 0:
        if not others:
            raise DeltatuneError("prune_ratio > 0 but this DSEE delta has no mask-only forms: build it with prune_ratio > 0")
        scores = [masked_base(p, magnitude=True) for p in others]
        for p, idx in zip(others, global_smallest(scores, ratio), strict=True):
            p.pruned.set_pruned(idx)


# -- stage 2b: structured pruning of attention heads ---------------------------------------------------
def _moved_form(form: Form, new: nn.Module, dim: int, keep: torch.Tensor) -> Form:
    """The same delta on a matrix that lost rows (dim 0) or columns (dim 1)."""
    if isinstance(form, LowRank) and form.layout == "linear":
        cuda = [new.weight.device] if new.weight.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # its init is overwritten: leave the global RNG as it was
            moved = LowRank(new, form.r, form.alpha, use_rslora=form.use_rslora)
        with torch.no_grad():
            moved.A.copy_(form.A if dim == 0 else form.A[:, keep.to(form.A.device)])
            moved.B.copy_(form.B[keep.to(form.B.device)] if dim == 0 else form.B)
        moved.A.requires_grad_(form.A.requires_grad)
        moved.B.requires_grad_(form.B.requires_grad)
        return moved
    if isinstance(form, MaskedSparse):
        shape = (form.shape[0], form.shape[1])
        idx, alive = remap_positions(form.indices, shape, dim, keep)
        moved = MaskedSparse([(new, "weight")], "weight", idx, scale=form.scale, trainable=form.trainable)
        with torch.no_grad():
            moved.values.copy_(form.values.detach()[alive.to(form.values.device)])
        pruned, _ = remap_positions(form.pruned, shape, dim, keep)
        moved.set_pruned(pruned)
        return moved
    raise DeltatuneError(
        f"head pruning cannot move a {form.kind} delta off an attention matrix; drop that module from "
        "modules_to_save / targets or set prune_heads=0"
    )


def remove_heads(tuned: Tuned, heads: dict[int, list[int]]) -> None:
    """Remove heads given by *original* index per layer (those already removed are skipped) and move the
    delta onto the smaller matrices: B's rows, Ω and masks of the removed heads go with them."""
    if tuned.merged:
        raise DeltatuneError("cannot prune heads of a merged model; unmerge first")
    cfg = tuned.method_config
    done = {int(k): list(v) for k, v in (cfg.pruned_heads or {}).items()}
    positions: dict[int, list[int]] = {}
    for att in attention_blocks(tuned.model):
        present = original_ids(done.get(att.layer, []), att.core.num_attention_heads)
        wanted = [h for h in heads.get(att.layer, []) if h in present]
        if wanted:
            positions[att.layer] = [present.index(h) for h in wanted]
            done[att.layer] = sorted(done.get(att.layer, []) + wanted)
    if not positions:
        return
    replaced = cut_heads(tuned.model, positions)
    moved: dict[str, Form] = {}
    for name, form in tuned.forms().items():
        if isinstance(form, WeightDelta) and id(form.sites[0][0]) in replaced:
            new, dim, keep = replaced[id(form.sites[0][0])]
            moved[name] = _moved_form(form, new, dim, keep)
    tuned.replace_forms(moved)
    cfg.pruned_heads = {str(k): v for k, v in sorted(done.items())}


def head_scores(tuned: Tuned, mode: str = "abs") -> dict[int, torch.Tensor]:
    """Per layer, one score per present head: Σ over the head's rows of |ΔW_q| + |ΔW_v| (ABS);
    WABS adds |M⊙W_q| + |M⊙W_v|. Head count and size come from each attention module."""
    by_module = {id(p.module): p for p in parts_of(tuned).values()}
    out = {}
    for att in attention_blocks(tuned.model):
        heads = att.core.num_attention_heads
        score = torch.zeros(heads)
        for attr in ("query", "value"):
            module = getattr(att.core, attr)
            parts = by_module.get(id(module), Parts(module))
            s = update_of(parts).abs()
            if mode == "wabs":
                s = s + masked_base(parts, magnitude=True)
            score += s.view(heads, -1).sum(1).cpu()
        out[att.layer] = score
    return out


def prune_heads(tuned: Tuned, per_layer: int, mode: str = "abs") -> dict[int, list[int]]:
    """Stage 2b: remove the ``per_layer`` lowest-scoring heads of every layer; returns them (original indices)."""
    if mode not in ("abs", "wabs"):
        raise DeltatuneError(f"prune_mode={mode!r} is not a DSEE score: use 'abs' or 'wabs'")
    done = {int(k): v for k, v in (tuned.method_config.pruned_heads or {}).items()}
    chosen: dict[int, list[int]] = {}
    blocks = {a.layer: a for a in attention_blocks(tuned.model)}
    for layer, score in head_scores(tuned, mode).items():
        if per_layer >= score.numel():
            raise DeltatuneError(f"prune_heads={per_layer} would remove every head of layer {layer} ({score.numel()})")
        present = original_ids(done.get(layer, []), blocks[layer].core.num_attention_heads)
        lowest = torch.sort(score, stable=True).indices[:per_layer].tolist()
        chosen[layer] = sorted(present[i] for i in lowest)
    remove_heads(tuned, chosen)
    return chosen


# -- the policy: stage 1, prune, stage 2 ---------------------------------------------------------------
class DseePolicy(Policy):
    """Trains the update for ``prune_at`` of the run, then prunes (heads, then unstructured) once,
    drops the optimizer's moments and restarts the LR schedule: the official stage 2 starts a new run
    from the stage-1 update."""

    name = "dsee"

    def __init__(self, cfg: DseeConfig) -> None:
        self.cfg = cfg
        self.tuned: Tuned | None = None
        self.prune_step: int | None = None  # optimizer steps completed when pruning happens
        self.done = False

    def setup(self, tuned: Tuned) -> None:
        self.tuned = tuned

    def stage1_steps(self, total_steps: int) -> int:
        return min(total_steps, max(1, round(self.cfg.prune_at * total_steps)))

    def plan(self, total_steps: int, grad_accum: int) -> None:
        self.prune_step = self.stage1_steps(total_steps) if self.cfg.prunes else None

    def lr_restarts(self, total_steps: int) -> list[int]:
        return [self.stage1_steps(total_steps)] if self.cfg.prunes else []

    def after_optimizer_step(self, step: int, tuned: Tuned, optimizer: torch.optim.Optimizer) -> None:
        if self.done or self.prune_step is None or step + 1 != self.prune_step:
            return
        prune(tuned)
        # fresh moments for stage 2, also for tensors head pruning replaced (the loop drops those from the groups)
        held = [p for group in optimizer.param_groups for p in group["params"]]
        release_state(optimizer, held + list(tuned.deltas.parameters()))
        self.done = True

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "pruned_heads": dict(self.cfg.pruned_heads or {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done = bool(state.get("done", False))
        heads = {int(k): list(v) for k, v in (state.get("pruned_heads") or {}).items()}
        if heads and self.tuned is not None:  # rebuild the pruned structure before the delta's tensors load
            remove_heads(self.tuned, heads)


def prune(tuned: Tuned) -> None:
    """Stage 2 as the config says: heads first (structure), then unstructured masks on what is left."""
    cfg: DseeConfig = tuned.method_config
    if cfg.prune_heads:
        prune_heads(tuned, cfg.prune_heads, cfg.prune_mode)
    if cfg.prune_ratio or cfg.prune_ratio_qv:
        prune_unstructured(tuned, cfg.prune_ratio, cfg.prune_ratio_qv, cfg.prune_mode)


# -- the builder -----------------------------------------------------------------------------------------
def _adapted(model: nn.Module, cfg: DseeConfig) -> list[tuple[str, nn.Module]]:
    targets = cfg.targets or default_targets(model)
    return select_modules(model, targets, layers=cfg.layers, types=["linear", "conv1d"], exclude=cfg.exclude)


def _prune_group(model: nn.Module, cfg: DseeConfig, adapted: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """The matrices pruned by |W|: official "key / attention output / FFN / pooler", i.e. every block
    matrix DSEE does not adapt, plus BERT's pooler."""
    skip = set(adapted)
    if cfg.prune_targets:
        chosen = block_matrices(model, cfg.prune_targets)
    else:
        chosen = block_matrices(model, None) + [
            (n, m) for n, m in model.named_modules() if n.endswith("pooler.dense") and isinstance(m, nn.Linear)
        ]
    return [(n, m) for n, m in chosen if n not in skip]


def _saved_modules(model: nn.Module, cfg: DseeConfig) -> list[tuple[str, nn.Module]]:
    if cfg.modules_to_save == "auto":
        return [(n, m) for n in HEADS if isinstance(m := getattr(model, n, None), nn.Module)
                and any(True for _ in m.parameters())]
    return select_modules(model, cfg.modules_to_save) if cfg.modules_to_save else []


# why it cannot train on a quantized base (deltatune.core.quantized): said in its one-line refusal
QUANTIZED_BASE = (
    "it splits every base weight into low-rank and sparse parts and prunes the base weights themselves"
)


@register("dsee", DseeConfig, "DSEE: ΔW = (α/r)(B·A + S), S on a fixed support from a low-rank + sparse split of W; "
          "then magnitude pruning of the backbone (unstructured or attention heads)",
          traits=Traits(quantized_base=QUANTIZED_BASE), family="low-rank + sparse")
def build(model: nn.Module, cfg: DseeConfig, *, loading: bool = False) -> Built:
    if cfg.prune_heads:  # fail now, not after stage 1: the model must have prunable heads to spare
        fewest = min(a.core.num_attention_heads for a in attention_blocks(model))
        if cfg.prune_heads >= fewest:
            raise DeltatuneError(f"prune_heads={cfg.prune_heads} would leave no head in a layer with {fewest}; lower it")
    if cfg.pruned_heads:  # the artifact's model lost heads: remove the same ones before the forms go on
        cut_heads(model, {int(k): list(v) for k, v in cfg.pruned_heads.items()})
    adapted = _adapted(model, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    scale = cfg.alpha / cfg.r
    forms: dict[str, Form] = {}
    for name, module in adapted:
        weight = module.weight
        # the artifact holds Ω: a load skips the decomposition (seconds per matrix) and resizes on load
        omega = None if loading else sparse_support(weight, cfg.num_sparse, cfg, generator)
        forms[f"{name}.weight.{SPARSE}"] = MaskedSparse([(module, "weight")], "weight", omega, scale=scale)
        lowrank = LowRank(module, cfg.r, cfg.alpha)
        with torch.no_grad():
            lowrank.A.normal_(0.0, 0.02)  # official: nn.Linear under BERT's init (std = initializer_range 0.02)
            lowrank.B.zero_()  # B = 0 (and S = 0): training starts at the base model
        forms[f"{name}.weight.{LOWRANK}"] = lowrank
    if cfg.prune_ratio > 0:
        for name, module in _prune_group(model, cfg, (n for n, _ in adapted)):
            forms[f"{name}.weight.{PRUNED}"] = MaskedSparse([(module, "weight")], "weight", trainable=False)
    touched = {n for n, _ in adapted} | {k.rpartition(".weight.")[0] for k in forms}
    saved = _saved_modules(model, cfg)
    clash = [n for n, _ in saved if n in touched]
    if clash:
        raise DeltatuneError(f"{clash[0]} is both adapted/pruned by DSEE and in modules_to_save: drop it from one")
    forms.update(dense_forms(model, [(f"{n}.{pn}", p) for n, m in saved for pn, p in m.named_parameters()]))
    return Built(forms, DseePolicy(cfg))
