"""Parallel adapter (He et al., ICLR 2022, arXiv 2110.04366): h ← h + W_up ReLU(W_down x + b_down) + b_up,
x the sublayer's INPUT (after a pre-LN block's norm), added to its output before the residual add."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from deltatune.core.registry import Built, Traits, register
from deltatune.methods._adapters import BottleneckConfig, build_adapters, check_sublayers


@dataclass
class ParallelAdapterConfig(BottleneckConfig):
    # the unified view's finding: a parallel adapter on the FFN uses added capacity better than one on attention
    # (attention wins only at ~0.1% budgets), and its best method (MAM) puts the PA on the FFN
    sublayers: list[str] = field(default_factory=lambda: ["ffn"])

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sublayers(self.sublayers)


@register("parallel_adapter", ParallelAdapterConfig,
          "Parallel adapter: h += W_up·ReLU(W_down·x) from the sublayer input x (FFN by default); not mergeable",
          mergeable=False, traits=Traits(quantized_base=True), family="adapters & prompts")
def build(model: nn.Module, cfg: ParallelAdapterConfig, *, loading: bool = False) -> Built:
    return build_adapters(model, cfg, kinds=cfg.sublayers, reads="input")
