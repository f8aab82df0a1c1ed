"""BitFit (Ben Zaken et al., 2022): train only the bias terms, as dense deltas on the biases."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from deltatune.core.registry import Built, Traits, register
from deltatune.core.targeting import select_parameters
from deltatune.errors import DeltatuneError
from deltatune.methods._common import dense_forms


@dataclass
class BitFitConfig:
    layers: list[int] | str | None = None  # blocks: an index, a list, or 'start:stop' (None: all)
    types: list[str] | None = None  # owning module types, e.g. ["linear"] to skip LayerNorm biases
    exclude: list[str] | None = None  # name patterns left out (as in targets)


# why it cannot train on a quantized base (deltatune.core.quantized): said in its one-line refusal
QUANTIZED_BASE = (
    "it trains tensors inside the base layers (their biases) in place, which deltatune does not do in "
    "quantized layers"
)


@register("bitfit", BitFitConfig, "BitFit: train only the bias terms (dense deltas on biases)",
          traits=Traits(quantized_base=QUANTIZED_BASE), family="chosen tensors")
def build(model: nn.Module, cfg: BitFitConfig, *, loading: bool = False) -> Built:
    if not any(n == "bias" or n.endswith(".bias") for n, _ in model.named_parameters()):
        raise DeltatuneError(
            f"{type(model).__name__} has no bias parameters (Llama-style models have none), so BitFit has "
            "nothing to train. Use 'lora' or 'lightweight' for this model."
        )
    params = select_parameters(model, ["bias"], layers=cfg.layers, types=cfg.types, exclude=cfg.exclude)
    return Built(dense_forms(model, params))
