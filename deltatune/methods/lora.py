"""LoRA (Hu et al., 2021, arXiv 2106.09685) with Hugging Face PEFT's defaults and options.

ΔW = s·B·A on each targeted Linear / GPT-2 Conv1D / Embedding, s = alpha/r (rsLoRA: alpha/√r),
A Kaiming-uniform and B zero (embeddings: A zero, B normal), so training starts at the base model.
``bias`` and ``modules_to_save`` train base tensors fully, as dense deltas next to the low-rank ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch.nn as nn

from deltatune.core.forms.base import Form
from deltatune.core.forms.lowrank import LowRank
from deltatune.core.registry import Built, Traits, register
from deltatune.core.targeting import select_modules, sites_of
from deltatune.methods._lowrank import add_trained_extras, check_alpha, default_targets, pattern_value


@dataclass
class LoraConfig:
    r: int = 8  # rank of B·A (PEFT's r)
    alpha: float = 8.0  # PEFT's lora_alpha default; scale = alpha / r
    dropout: float = 0.0  # on the LoRA branch only
    targets: list[str] | None = None  # module patterns; None: the architecture's q/v projections
    layers: list[int] | str | None = None  # blocks: an index, a list, or 'start:stop' (None: all)
    types: list[str] | None = None  # module types kept: linear, conv1d, embedding, layernorm (None: all)
    exclude: list[str] | None = None  # name patterns left out (as in targets)
    use_rslora: bool = False  # scale = alpha / sqrt(r) (Kalajdzievski, 2023)
    init: bool | str = True  # True (Kaiming A, zero B) | "gaussian" | False (random B: tests only)
    # biases trained too: none, all, or lora_only (those of LoRA's modules)
    bias: Literal["none", "all", "lora_only"] = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)  # PEFT semantics: module-name regex -> r
    # PEFT semantics: module-name regex -> alpha
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None  # modules trained fully (e.g. a classifier head)

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"r={self.r} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        check_alpha(self.alpha)


@register("lora", LoraConfig, "LoRA: low-rank ΔW = (alpha/r)·B·A on chosen layers (PEFT-compatible)",
          traits=Traits(quantized_base=True), family="low-rank")
def build(model: nn.Module, cfg: LoraConfig, *, loading: bool = False) -> Built:
    targets = cfg.targets or default_targets(model)
    modules = select_modules(model, targets, layers=cfg.layers, types=cfg.types, exclude=cfg.exclude)
    forms: dict[str, Form] = {}
    for name, module in modules:
        r = int(pattern_value(cfg.rank_pattern, name, cfg.r))
        alpha = pattern_value(cfg.alpha_pattern, name, cfg.alpha)
        forms[f"{name}.weight"] = LowRank(
            module, r, alpha, use_rslora=cfg.use_rslora, dropout=cfg.dropout, init=cfg.init,
            tied=[s for s in sites_of(model, module.weight) if s[0] is not module],
        )
    add_trained_extras(model, modules, cfg.bias, cfg.modules_to_save, forms, "LoRA")
    return Built(forms)
