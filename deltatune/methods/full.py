"""Full fine-tuning as a dense delta: every selected tensor trains in place, as in plain fine-tuning
(no second copy of the model), and the artifact stores Δ = W − W0 of only the tensors that changed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from deltatune.core.registry import Built, Traits, register
from deltatune.core.targeting import select_parameters
from deltatune.methods._common import dense_forms, inplace_forms


@dataclass
class FullConfig:
    targets: list[str] | None = None  # parameter-name patterns; None trains every parameter
    layers: list[int] | str | None = None  # blocks: an index, a list, or 'start:stop' (None: all)
    types: list[str] | None = None  # module types kept: linear, conv1d, embedding, layernorm (None: all)
    exclude: list[str] | None = None  # name patterns left out (as in targets)


# why it cannot train on a quantized base (deltatune.core.quantized): said in its one-line refusal
QUANTIZED_BASE = (
    "it trains the chosen base weights in place, and a quantized weight is packed storage, not values an "
    "optimizer can step"
)


@register("full", FullConfig, "full fine-tuning, in place (stores only the tensors that changed, as a dense delta)",
          traits=Traits(quantized_base=QUANTIZED_BASE, full_model=True), family="full & layer-wise")
def build(model: nn.Module, cfg: FullConfig, *, loading: bool = False) -> Built:
    params = select_parameters(model, cfg.targets, layers=cfg.layers, types=cfg.types, exclude=cfg.exclude)
    # training updates the model's tensors in place; a loaded artifact is a plain dense delta beside W0
    return Built(dense_forms(model, params) if loading else inplace_forms(model, params))
