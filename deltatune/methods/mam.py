"""MAM adapter, "Mix-And-Match" (He et al., ICLR 2022, arXiv 2110.04366, the unified view of PETL):
prefix tuning on every attention layer + a scaled parallel adapter on every FFN.

The paper's best design along its four dimensions: modify attention at a tiny budget (a prefix), spend
the rest of the budget on the FFN (where extra capacity helps most), in parallel (reading the FFN
input), with scaled addition (s = 4) and LoRA's init. Its defaults (l = 30, mid 800, r = 512) are for
BART-large (d = 1024, ≈ 6.7 % of the parameters); the repo's GLUE script on RoBERTa-base uses l = 16,
r = 16, s = 2 (≈ 0.5 %), the scale of the shipped examples. Like its prefix, it changes attention from
the first step and cannot be merged into weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from deltatune.core.registry import Built, Traits, register
from deltatune.methods._adapters import BottleneckConfig, build_adapters
from deltatune.methods._common import dense_forms
from deltatune.methods._prefix import head_parameters, prefix_forms


@dataclass
class MamConfig:
    prefix_length: int = 30  # the paper's MAM: prefix l = 30 on all attention blocks
    reparam: bool = True  # ... trained through the reparametrisation MLP (folded away when saved)
    mid_dim: int = 800  # ... of hidden size 800
    r: int = 512  # scaled parallel adapter on every FFN, bottleneck 512 (BART-large, d = 1024)
    scale: float = 4.0  # s = 4, fixed
    activation: str = "relu"  # the adapter's activation: relu, gelu, silu, tanh or linear
    layers: list[int] | str | None = None  # blocks that get both parts (None: all)
    modules_to_save: list[str] | None = None  # base modules trained fully, e.g. ["classifier"] (a fresh head)

    def __post_init__(self) -> None:
        if self.prefix_length < 1:
            raise ValueError(f"prefix_length={self.prefix_length} must be at least 1")
        # the adapter half is validated by the bottleneck config it becomes
        self.adapter_config()

    def adapter_config(self) -> BottleneckConfig:
        return BottleneckConfig(r=self.r, activation=self.activation, init="lora", layers=self.layers)


@register("mam", MamConfig, "MAM adapter (unified view): prefix tuning on attention + scaled parallel adapter "
          "(s=4) on the FFN", mergeable=False,
          traits=Traits(quantized_base=True, starts_at_base=False), family="adapters & prompts")
def build(model: nn.Module, cfg: MamConfig, *, loading: bool = False) -> Built:
    built = prefix_forms(model, cfg.prefix_length, cfg.reparam, cfg.mid_dim, method="mam", loading=loading, layers=cfg.layers)
    adapters = build_adapters(model, cfg.adapter_config(), kinds=["ffn"], reads="input", scale=cfg.scale)
    built.forms.update(adapters.forms)
    if cfg.modules_to_save:
        built.forms.update(dense_forms(model, head_parameters(model, cfg.modules_to_save)))
    return built
