"""Scaled parallel adapter (He et al., ICLR 2022, arXiv 2110.04366): h ← h + s·W_up ReLU(W_down x + b_down) + ...
with s = 4 and LoRA's init (W_down Kaiming-uniform, W_up = 0); the FFN half of the MAM adapter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn as nn

from deltatune.core.registry import Built, Traits, register
from deltatune.methods._adapters import build_adapters
from deltatune.methods.parallel_adapter import ParallelAdapterConfig


@dataclass
class ScaledParallelAdapterConfig(ParallelAdapterConfig):
    scale: float = 4.0  # the paper's s (scaled addition beat plain addition for PA)
    learnable_scale: bool = False  # the repo's "learnable_scalar" option: s becomes one trained parameter
    init: Literal["bert", "lora"] = "lora"  # the repo's scaled-PA init


@register("scaled_parallel_adapter", ScaledParallelAdapterConfig,
          "Scaled parallel adapter: h += s·W_up·ReLU(W_down·x) from the sublayer input (s=4, lora init); not mergeable",
          mergeable=False, traits=Traits(quantized_base=True), family="adapters & prompts")
def build(model: nn.Module, cfg: ScaledParallelAdapterConfig, *, loading: bool = False) -> Built:
    return build_adapters(model, cfg, kinds=cfg.sublayers, reads="input", scale=cfg.scale,
                          learnable_scale=cfg.learnable_scale)
