"""LISA: layerwise importance sampled AdamW (Pan et al., 2024).

Full-parameter fine-tuning in which, at any time, only the parameters outside the numbered blocks
(embeddings, final norm, head) and γ blocks drawn uniformly without replacement train; the draw is
repeated every K optimizer steps, at steps 0, K, 2K, ... as in LMFlow's ``on_step_begin``.

Memory is the point, so two choices differ from the reference code:
- the tensors train in place (``InPlace`` form): no second copy of the model, W0 kept only for
  tensors that have trained (on disk by default, ``keep_w0`` as in ``full``), and the artifact is the dense Δ of
  those tensors alone;
- at each switch the optimizer state of de-activated blocks is released and activated blocks start
  fresh (step count 0), as the paper's per-interval jobs did. LMFlow keeps one optimizer whose stale
  moments grow with every block it visits (its issues #768, #778). The LR schedule stays global.

The draw uses its own seeded generator, saved in checkpoints, so a resumed run and every
data-parallel rank draw the same blocks without communicating.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn

from deltatune.core.policy import Policy
from deltatune.core.registry import Built, Traits, register
from deltatune.errors import DeltatuneError
from deltatune.methods._common import dense_forms, forms_by_block, set_trainable
from deltatune.methods._offloaded_w0 import check_keep_w0, kept_w0_forms

if TYPE_CHECKING:
    from deltatune.core.forms.base import Form, WeightDelta
    from deltatune.core.tuned import Tuned


@dataclass
class LisaConfig:
    activated_layers: int = 2  # γ: LMFlow's default (its shipped script uses 1)
    interval_steps: int = 20  # K: optimizer steps between two draws (LMFlow default)
    seed: int = 0  # of the block draws; the same on every rank
    # where W0 of the tensors that have trained waits (as in full): "disk", a file per tensor (the memory of plain
    # fine-tuning of the active blocks); "memory", a copy beside the weight on its device
    keep_w0: Literal["disk", "memory"] = "disk"
    w0_dir: str | None = None  # the folder of those files (None: the system's temporary folder)

    def __post_init__(self) -> None:
        check_keep_w0(self.keep_w0)
        if self.activated_layers < 1:
            raise ValueError(f"activated_layers={self.activated_layers} must be >= 1")
        if self.interval_steps < 1:
            raise ValueError(f"interval_steps={self.interval_steps} must be >= 1")


class LisaPolicy(Policy):
    name = "lisa"

    def __init__(self, cfg: LisaConfig) -> None:
        self.cfg = cfg
        self.blocks: dict[int, list[Form]] = {}
        self.always: list[Form] = []
        self.active: list[int] = []
        self.draws = 0
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def setup(self, tuned: Tuned) -> None:
        self.blocks, self.always = forms_by_block(tuned.forms())
        if not self.blocks:
            raise DeltatuneError(f"{type(tuned.model).__name__} has no numbered blocks: LISA samples blocks to train")
        if self.cfg.activated_layers > len(self.blocks):
            raise DeltatuneError(
                f"activated_layers={self.cfg.activated_layers} but the model has {len(self.blocks)} blocks; "
                f"use at most {len(self.blocks)} (that many is full fine-tuning)"
            )
        set_trainable(self.always, True)
        self._switch(None)

    def draw(self) -> list[int]:
        """γ distinct block indices, uniform without replacement."""
        order = list(self.blocks)
        picks = torch.randperm(len(order), generator=self.generator)[: self.cfg.activated_layers]
        self.draws += 1
        return sorted(order[int(i)] for i in picks)

    def _switch(self, optimizer: torch.optim.Optimizer | None) -> None:
        old = set(self.active)
        self.active = self.draw()
        new = set(self.active)
        for i in old - new:
            set_trainable(self.blocks[i], False, optimizer)  # their moments are released, not kept stale
        for i in new - old:
            set_trainable(self.blocks[i], True, optimizer)  # fresh state: step count 0
        # a block drawn again keeps training with its state, as it would under one uninterrupted optimizer

    def after_optimizer_step(self, step: int, tuned: Tuned, optimizer: torch.optim.Optimizer) -> None:
        if (step + 1) % self.cfg.interval_steps == 0:
            self._switch(optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {"active": list(self.active), "draws": self.draws, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.draws = int(state["draws"])
        for i in self.blocks:
            set_trainable(self.blocks[i], False)
        self.active = [int(i) for i in state["active"]]
        for i in self.active:
            set_trainable(self.blocks[i], True)


# why it cannot train on a quantized base (deltatune.core.quantized): said in its one-line refusal
QUANTIZED_BASE = (
    "it trains whole blocks' weights in place, and a quantized weight is packed storage, not values an "
    "optimizer can step"
)


@register("lisa", LisaConfig, "LISA: embeddings + head + γ randomly drawn blocks train in place, redrawn every K steps",
          traits=Traits(quantized_base=QUANTIZED_BASE), family="full & layer-wise")
def build(model: nn.Module, cfg: LisaConfig, *, loading: bool = False) -> Built:
    # a delta over every floating tensor; nothing trains until the policy says so. Loading: a plain dense delta
    params = list(model.named_parameters())
    forms: dict[str, WeightDelta] = dict(dense_forms(model, params) if loading
                                         else kept_w0_forms(model, params, cfg.keep_w0, cfg.w0_dir, trainable=False))
    set_trainable(forms.values(), False)
    return Built(forms, LisaPolicy(cfg))
