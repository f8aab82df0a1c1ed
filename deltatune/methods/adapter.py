"""Sequential bottleneck adapter (Houlsby et al., 2019; Pfeiffer et al., 2021), as the unified view
(He et al., ICLR 2022) writes it: h ← h + W_up ReLU(W_down h + b_down) + b_up at a sublayer's output,
before its residual add / post-LN; W_up = 0 so training starts at the base model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn as nn

from deltatune.core.registry import Built, Traits, register
from deltatune.methods._adapters import BottleneckConfig, build_adapters

PLACEMENTS = {"houlsby": ["attention", "ffn"], "pfeiffer": ["ffn"]}


@dataclass
class AdapterConfig(BottleneckConfig):
    # Houlsby: after the attention output AND after the FFN, the original design and the unified view's
    # sequential-adapter baseline (its XSum script: "Houlsby r=200 both places"); Pfeiffer: after the FFN only,
    # half the parameters
    placement: Literal["houlsby", "pfeiffer"] = "houlsby"
    init: Literal["bert", "lora"] = "bert"  # the unified-view repo's adapter init: W_down ~ N(0, 0.02), W_up = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement={self.placement!r} is unknown; use 'houlsby' or 'pfeiffer'")


@register("adapter", AdapterConfig,
          "Bottleneck adapter (Houlsby / Pfeiffer): h += W_up·act(W_down·h) after attention and/or FFN; "
          "mergeable only with activation: linear (into a projection with a bias)",
          mergeable="only with activation: linear, into a projection with a bias (GPT-2, BERT)",
          traits=Traits(quantized_base=True), family="adapters & prompts")
def build(model: nn.Module, cfg: AdapterConfig, *, loading: bool = False) -> Built:
    return build_adapters(model, cfg, kinds=PLACEMENTS[cfg.placement], reads="output")
