"""Full fine-tuning as a dense delta: every selected tensor gets W = W0 + Δ.

The base stays untouched until merge, and the artifact stores only the tensors that changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from deltatune.core.registry import Built, register
from deltatune.core.targeting import select_parameters
from deltatune.methods._common import dense_forms


@dataclass
class FullConfig:
    targets: list[str] | None = None  # parameter-name patterns; None trains every parameter
    layers: list[int] | str | None = None
    types: list[str] | None = None
    exclude: list[str] | None = None


@register("full", FullConfig, "full fine-tuning as a dense delta (stores only the tensors that changed)")
def build(model: nn.Module, cfg: FullConfig, *, loading: bool = False) -> Built:
    params = select_parameters(model, cfg.targets, layers=cfg.layers, types=cfg.types, exclude=cfg.exclude)
    return Built(dense_forms(model, params))
