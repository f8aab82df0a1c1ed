"""IST (Yao et al., Findings of EMNLP 2024, arXiv 2410.11772): importance-aware sparse tuning.

IST is a policy over another per-layer PEFT method (``base``: LoRA, or any registered method whose forms
sit in the numbered blocks and carry an output ``scale``). Every block keeps its PEFT modules, but each
optimizer step trains only ⌊0.25·L⌋ of the L blocks, drawn from learned block scores s ∈ R^L:

1. Before every step: freeze the PEFT parameters of every block, draw n_u blocks without replacement
   with probabilities ∝ sigmoid(−s) and unfreeze theirs (a high s means "suppressible": trained less).
2. Every T_s steps (t > 0), before that draw: on one probe batch of training data, R times draw a group
   G_k of n_s = ⌊0.5·L⌋ blocks ∝ sigmoid(s) (distinct from earlier groups), scale their PEFT output by
   ρ = 0.25, measure the loss ℓ_k (eval mode, no gradients); then with r_k = exp(−ℓ_k),
   â_k = r_k − mean(r) and q = sigmoid(s) (computed once), s_ℓ += η·â_k·q_ℓ(1 − q_ℓ) for every ℓ ∈ G_k.
   The scales are restored exactly afterwards (the same float), and every module's train/eval flag.

The algorithm and defaults follow the official code (antgroup/importance-aware-sparse-tuning-IST-paper,
``ist.py``): update fraction 0.25, suppression fraction 0.5, R = 3 (``rl_step``), η = 10 (``rl_lr``),
ρ = 0.25, interval 10, probe batch 16. Differences, each for a reason:

- n_u and n_s are at least 1 (the official ⌊0.25·L⌋ is 0 below four blocks: nothing would train);
  L counts the blocks that hold PEFT modules of the base (``layers`` of the base narrows it).
- The "draw a group unlike the earlier ones" loop stops once every C(L, n_s) group was seen (the
  official loop never ends when C(L, n_s) < R, e.g. L = 2) and after 100 tries (near-degenerate scores).
- Forms outside the blocks (a ``modules_to_save`` head) train at every step, as in the official code,
  which toggles block parameters only; forms without a ``scale`` in a block (LoRA's ``bias`` option)
  train with their block but are not suppressed (the official code scales the LoRA branch only).
- Adam moments: the official AdamW keeps the moments of a block that is not selected (a parameter
  without gradient is skipped) and goes on with them when the block is drawn again. The native loop
  drops the optimizer state of every parameter whose ``requires_grad`` flips, so the policy keeps the
  state of deselected parameters itself (``after_optimizer_step``) and hands it back before the next
  optimizer step that trains them (``before_optimizer_step``): the same updates as the official code,
  at its memory (LoRA moments are small), and the state is part of the checkpoint.

Where the probe batches come from (the builder sees only the model and the config), either:

- ``data``: a run-config ``data`` section (in YAML ``method: {name: ist, data: *data}``); the builder
  tokenizes it with the model's tokenizer (``deltatune.methods._calibration.task_batches``) into a pool of
  ``probe_batches`` batches of ``probe_batch`` training examples from a seeded shuffle. Probe j uses
  pool batch j mod ``probe_batches`` (the official code takes the next batch of the training loader; a
  fixed seeded pool keeps the source deterministic and resumable from one counter in the state).
- In Python, ``tuned.policy.set_probe(batches, loss_fn)`` (call it again after a resume: batches are
  not saved; the position is).

Without either, no probe runs: the scores stay 0 and every step draws n_u blocks uniformly (IST's
random-selection baseline). In your own loop, make the optimizer over all of ``tuned.deltas.parameters()``
(blocks drawn later must be in it), and call ``tuned.policy.before_optimizer_step(step, tuned, opt)``
before and ``after_optimizer_step(step, tuned, opt)`` after each ``opt.step()``: the selection for step
0 is drawn when the delta is attached, every later one in ``after_optimizer_step``.

The policy's state (scores, generator, selection, probe counter, kept optimizer state) is checkpointed,
so a resumed run draws exactly the blocks of an uninterrupted one. Under data parallelism every rank
draws with the same generator and takes rank 0's scores after a probe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn

from deltatune.core.forms.base import Form
from deltatune.core.policy import Policy
from deltatune.core.registry import Built, Traits, register
from deltatune.core.targeting import layer_index
from deltatune.errors import DeltatuneError
from deltatune.methods._calibration import LossFn, task_batches
from deltatune.methods._common import base_on_quantized, build_base

if TYPE_CHECKING:
    from deltatune.core.tuned import Tuned

MAX_REDRAWS = 100  # tries for a suppression group unlike the earlier ones before a repeat is accepted


@dataclass
class IstConfig:
    base: str = "lora"  # the per-layer PEFT method IST selects blocks of (low-rank or adapter forms)
    base_options: dict[str, Any] = field(default_factory=dict)  # that method's own options, e.g. {r: 32, alpha: 64}
    update_fraction: float = 0.25  # n_u = ⌊fraction·L⌋ blocks train per step (official: 0.25·L)
    suppress_fraction: float = 0.5  # n_s = ⌊fraction·L⌋ blocks per suppression group (official: 0.5·L)
    rl_steps: int = 3  # R: suppression groups per probe (official rl_step)
    rl_lr: float = 10.0  # η: step size of the score update (official rl_lr)
    rho: float = 0.25  # suppressed blocks' PEFT output is scaled by ρ (official)
    score_interval: int = 10  # T_s: probe every T_s optimizer steps (official)
    probe_batch: int = 16  # examples per probe batch (official)
    probe_batches: int = 32  # pool of probe batches taken from data, used in turn
    data: dict[str, Any] | None = None  # a run-config data section for the probe batches (None: no probe)
    tokenizer: str | None = None  # for data: tokenizer name or folder; None: the model's own
    seed: int = 0  # the block draws, the suppression groups and the probe pool's shuffle

    def __post_init__(self) -> None:
        if self.base == "ist":
            raise ValueError("base='ist': IST selects the blocks of another method; use base='lora' (or another)")
        for name in ("update_fraction", "suppress_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in (0, 1]")
        if not 0.0 <= self.rho <= 1.0:
            raise ValueError(f"rho={self.rho} must be in [0, 1] (the suppressed share of a block's PEFT output)")
        for name in ("rl_steps", "score_interval", "probe_batch", "probe_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.data is not None:
            from deltatune.data.tasks import DataConfig

            try:
                DataConfig(**self.data)  # bad keys fail when the config is read, not after the model loaded
            except (TypeError, DeltatuneError) as e:
                raise ValueError(f"data: {e} (it takes the keys of the run's data section)") from e


@register("ist", IstConfig, "IST: each step trains the PEFT modules of a quarter of the blocks, drawn by "
          "importance scores learned from suppression probes (Yao et al., 2024); a policy over a base method",
          traits=Traits(quantized_base=lambda cfg: base_on_quantized(cfg.base, cfg.base_options)),
          family="low-rank")
def build(model: nn.Module, cfg: IstConfig, *, loading: bool = False) -> Built:
    base = build_base(model, cfg.base, cfg.base_options, loading)
    if type(base.policy) is not Policy:
        raise DeltatuneError(
            f"ist cannot drive base={cfg.base!r}: it has its own dynamic policy ({type(base.policy).__name__}) that "
            "decides what trains. Use a base with a static policy, e.g. base='lora'"
        )
    blocks = [n for n in base.forms if layer_index(n) is not None]
    if not blocks:
        raise DeltatuneError(
            f"ist needs a per-layer base, but base={cfg.base!r} put no delta in the numbered blocks: target block "
            "modules in base_options (e.g. targets=['q_proj', 'v_proj'])"
        )
    if not any(_has_scale(base.forms[n]) for n in blocks):
        kinds = sorted({base.forms[n].kind for n in blocks})
        raise DeltatuneError(
            f"ist probes a block by scaling its PEFT output, but base={cfg.base!r} gives {', '.join(kinds)} deltas "
            "without an output scale: use a low-rank or adapter base (e.g. base='lora')"
        )
    probe: list[Any] | None = None
    loss_fn: LossFn | None = None
    if cfg.data is not None and not loading:  # an artifact loads without data: probing is for training only
        probe, loss_fn = task_batches(model, cfg.data, tokenizer=cfg.tokenizer, batches=cfg.probe_batches,
                                      batch_size=cfg.probe_batch, seed=cfg.seed)
    return Built(base.forms, IstPolicy(cfg, probe, loss_fn))


def _has_scale(form: Form) -> bool:
    return isinstance(getattr(form, "scale", None), float)


def _at_least_one(fraction: float, n: int) -> int:
    return min(n, max(1, math.floor(fraction * n)))


class IstPolicy(Policy):
    """Block scores, the per-step draw of trainable blocks, and the suppression probe."""

    name = "ist"

    def __init__(self, cfg: IstConfig, probe: list[Any] | None = None, loss_fn: LossFn | None = None) -> None:
        self.cfg = cfg
        self.probe_pool, self.loss_fn = probe, loss_fn
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.layers: list[int] = []  # block indices that hold PEFT modules; position i has score s[i]
        self.scores = torch.zeros(0)
        self.selected: list[int] = []  # positions of the blocks that train in the current step
        self.probes = 0  # probes done: the next one uses pool batch probes mod len(pool)
        self.kept: dict[str, dict[str, Any]] = {}  # optimizer state of deselected parameters, by name

    # -- wiring ---------------------------------------------------------------------------
    def setup(self, tuned: Tuned) -> None:
        by_layer: dict[int, list[tuple[str, Form]]] = {}
        for name, form in tuned.forms().items():
            i = layer_index(name)
            if i is not None:
                by_layer.setdefault(i, []).append((name, form))
        self.layers = sorted(by_layer)
        # only parameters that train in the base method are ever switched on (official: the originally trainable)
        self.params = [[(f"{n}.{pn}", p) for n, f in by_layer[i] for pn, p in f.named_parameters() if p.requires_grad]
                       for i in self.layers]
        self.scaled = [[f for _, f in by_layer[i] if _has_scale(f)] for i in self.layers]
        self.scores = torch.zeros(len(self.layers))
        self._select(self.draw_update(), None)

    def set_probe(self, batches: list[Any], loss_fn: LossFn | None = None) -> None:
        """Probe batches for plain Python use; ``loss_fn(model, batch)`` defaults to ``model(**batch).loss``."""
        if not batches:
            raise DeltatuneError("set_probe needs at least one batch")
        self.probe_pool, self.loss_fn = list(batches), loss_fn or (lambda m, b: m(**b).loss)

    @property
    def n_update(self) -> int:
        return _at_least_one(self.cfg.update_fraction, len(self.layers))

    @property
    def n_suppress(self) -> int:
        return _at_least_one(self.cfg.suppress_fraction, len(self.layers))

    # -- the hooks --------------------------------------------------------------------------
    def before_optimizer_step(self, step: int, tuned: Tuned, optimizer: torch.optim.Optimizer) -> None:
        """Hand back the moments a selected parameter had when it was last deselected (official AdamW kept them)."""
        for pos in self.selected:
            for name, p in self.params[pos]:
                state = self.kept.pop(name, None)
                if state is not None and optimizer is not None and not optimizer.state.get(p):
                    optimizer.state[p] = {k: v.to(p.device) if isinstance(v, torch.Tensor) and k != "step" else v
                                          for k, v in state.items()}

    def after_optimizer_step(self, step: int, tuned: Tuned, optimizer: torch.optim.Optimizer) -> None:
        t = step + 1  # optimizer steps completed; the draw below is for step index t
        if t % self.cfg.score_interval == 0:
            self.probe(tuned)
        self._select(self.draw_update(), optimizer)

    # -- selection ----------------------------------------------------------------------------
    def draw_update(self) -> list[int]:
        """n_u distinct block positions, ∝ sigmoid(−s) (official ``multinomial(sigmoid(-s), n_u)``)."""
        return sorted(self._draw(torch.sigmoid(-self.scores.double()), self.n_update))

    def _draw(self, weights: torch.Tensor, n: int) -> list[int]:
        weights = weights.clamp_min(1e-300)  # a saturated score must not leave fewer than n drawable blocks
        return torch.multinomial(weights, n, replacement=False, generator=self.generator).tolist()

    def _select(self, selected: list[int], optimizer: torch.optim.Optimizer | None) -> None:
        self.selected = selected
        on = set(selected)
        for pos, params in enumerate(self.params):
            for name, p in params:
                if p.requires_grad and pos not in on and optimizer is not None and optimizer.state.get(p):
                    self.kept[name] = optimizer.state[p]  # a loop that releases state on a flip would lose it
                p.requires_grad_(pos in on)

    # -- the importance probe ------------------------------------------------------------------
    def draw_groups(self) -> list[list[int]]:
        """R suppression groups of n_s positions ∝ sigmoid(s), unlike the earlier ones while any is left."""
        n_s = self.n_suppress
        distinct = math.comb(len(self.layers), n_s)
        weights = torch.sigmoid(self.scores.double())
        groups: list[list[int]] = []
        for _ in range(self.cfg.rl_steps):
            for _ in range(MAX_REDRAWS):
                group = sorted(self._draw(weights, n_s))
                if group not in groups or len(groups) >= distinct:
                    break
            groups.append(group)
        return groups

    def probe(self, tuned: Tuned) -> None:
        """One score update from R suppressed forward passes on the next probe batch (none without data)."""
        if not self.probe_pool or self.loss_fn is None or tuned.merged:
            return
        batch = self.probe_pool[self.probes % len(self.probe_pool)]
        self.probes += 1
        groups = self.draw_groups()
        losses = torch.tensor([self.suppressed_loss(tuned, batch, g) for g in groups], dtype=torch.float64)
        rewards = torch.exp(-losses)
        advantage = rewards - rewards.mean()
        q = torch.sigmoid(self.scores.double())
        step = torch.zeros_like(q)
        for a, group in zip(advantage.tolist(), groups, strict=True):
            step[group] += self.cfg.rl_lr * a * q[group] * (1 - q[group])
        self.scores = (self.scores.double() + step).to(self.scores.dtype)
        self._same_scores_on_every_rank()

    def suppressed_loss(self, tuned: Tuned, batch: Any, group: list[int]) -> float:
        """The loss with the PEFT output of the blocks in ``group`` scaled by ρ; scales and modes restored."""
        modes = [(m, m.training) for m in tuned.modules()]
        saved = [(f, f.scale) for pos in group for f in self.scaled[pos]]
        device = next(iter(tuned.deltas.parameters())).device
        if isinstance(batch, dict):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        try:
            tuned.eval()
            for form, scale in saved:
                form.scale = scale * self.cfg.rho
            with torch.no_grad():
                return float(self.loss_fn(tuned, batch))
        finally:
            for form, scale in saved:
                form.scale = scale  # the very float it was: restored bit for bit
            for m, training in modes:
                m.training = training

    def _same_scores_on_every_rank(self) -> None:
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        nccl = dist.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        s = self.scores.to(device)
        dist.broadcast(s, 0)
        self.scores = s.cpu()

    # -- checkpoint -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "scores": self.scores.clone(),
            "generator": self.generator.get_state(),
            "selected": list(self.selected),
            "probes": self.probes,
            "kept": {name: dict(state) for name, state in self.kept.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if [int(i) for i in state["layers"]] != self.layers:
            raise DeltatuneError(
                f"the IST state is for blocks {state['layers']} but this delta has PEFT modules in blocks "
                f"{self.layers}: resume with the same base and base_options"
            )
        self.scores = state["scores"].detach().clone().to(torch.float32)
        self.generator.set_state(state["generator"].to(torch.uint8).cpu())
        self.probes = int(state["probes"])
        self.kept = {name: dict(s) for name, s in state["kept"].items()}
        self._select([int(i) for i in state["selected"]], None)
