"""LoHa: low-rank Hadamard product (Hyeon-Woo et al., FedPara, ICLR 2022; LyCORIS), with Hugging Face PEFT's defaults
and arithmetic (``LoHaConfig``, 0.21.2).

    ΔW = (W1a W1b) ⊙ (W2a W2b) · alpha / r

on each targeted nn.Linear: two rank-r products multiplied elementwise, so ΔW reaches rank r² with the parameters of
two LoRA pairs. W1a, W1b, W2a are Kaiming-uniform and W2b zero (PEFT's init), so training starts at the base model.
ΔW is built at every forward and applied on the output path, y += ΔW·x, as PEFT does; merging adds it to W.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from deltatune.core.registry import Built, Traits, register
from deltatune.methods._lycoris import LycorisConfig, LycorisDelta, build_forms, peft_format


class LoHa(LycorisDelta):
    kind = "loha"

    def __init__(self, module: nn.Module, r: int, alpha: float, *, init: bool = True, **options: Any) -> None:
        super().__init__(module, r, alpha, **options)
        # PEFT's shapes for a Linear: W1a, W2a (out, r), W1b, W2b (r, in)
        self.w1_a, self.w1_b = self._param(self.d_out, self.r), self._param(self.r, self.d_in)
        self.w2_a, self.w2_b = self._param(self.d_out, self.r), self._param(self.r, self.d_in)
        self.reset(init)

    def reset(self, init: bool = True) -> None:
        """PEFT's init: Kaiming-uniform W1a, W1b, W2a and zero W2b (True), or all four Kaiming-uniform (False)."""
        with torch.no_grad():
            for p in (self.w1_a, self.w1_b, self.w2_a):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            if init:
                nn.init.zeros_(self.w2_b)
            else:
                nn.init.kaiming_uniform_(self.w2_b, a=math.sqrt(5))

    def weight(self) -> torch.Tensor:
        return ((self.w1_a @ self.w1_b) * (self.w2_a @ self.w2_b)) * self.scale


@dataclass
class LoHaConfig(LycorisConfig):
    """LoRA-like options with PEFT's LoHa defaults (r 8, alpha 8, no dropout, LoRA's default targets)."""

    init: bool = True  # True: zero W2b (the base model at step 0); False: all factors random (tests only)


QUANTIZED_BASE = "its ΔW is checked against PEFT on full-precision layers only"


def _form(cfg: LoHaConfig):  # noqa: ANN202 - a form factory
    return lambda module, r, alpha, tied: LoHa(module, r, alpha, init=cfg.init, rank_dropout=cfg.rank_dropout,
                                               module_dropout=cfg.module_dropout, tied=tied)


@register("loha", LoHaConfig, "LoHa: ΔW = (W1a·W1b) ⊙ (W2a·W2b)·alpha/r, rank up to r² (Hyeon-Woo et al., 2022; "
          "LyCORIS); PEFT-compatible, mergeable", family="low-rank", traits=Traits(quantized_base=QUANTIZED_BASE),
          peft=peft_format("LOHA", "hada_", ("w1_a", "w1_b", "w2_a", "w2_b"), LoHa, lambda cfg: {}, ()))
def build(model: nn.Module, cfg: LoHaConfig, *, loading: bool = False) -> Built:
    return Built(build_forms(model, cfg, _form(cfg), "LoHa"))
