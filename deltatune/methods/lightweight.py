"""Lightweight fine-tuning: train only named parts of the model (embeddings, the head, the last k
blocks, or parameters matching patterns), as dense deltas with a static selection."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from deltatune.core.registry import Built, Traits, register
from deltatune.core.targeting import count_layers, layer_index, select_parameters
from deltatune.errors import DeltatuneError
from deltatune.methods._common import dense_forms

PARTS = ("embeddings", "head")


@dataclass
class LightweightConfig:
    parts: list[str] = field(default_factory=lambda: ["embeddings", "head"])  # any of PARTS
    last_k: int = 0  # also train every parameter of the last k blocks
    targets: list[str] | None = None  # also train parameters matching these patterns

    def __post_init__(self) -> None:
        bad = [p for p in self.parts if p not in PARTS]
        if bad:
            raise ValueError(f"unknown part(s) {bad}: parts are {list(PARTS)}")
        if self.last_k < 0:
            raise ValueError(f"last_k={self.last_k} must be >= 0")
        if not self.parts and not self.last_k and not self.targets:
            raise ValueError("nothing to train: set parts, last_k or targets")


def _part_module(model: nn.Module, part: str) -> nn.Module:
    getter = "get_input_embeddings" if part == "embeddings" else "get_output_embeddings"
    module = getattr(model, getter, lambda: None)()
    if module is None:
        raise DeltatuneError(
            f"{type(model).__name__} has no {part} module ({getter}() gives None); name the parameters with "
            "targets=[...] instead"
        )
    return module


# why it cannot train on a quantized base (deltatune.core.quantized): said in its one-line refusal
QUANTIZED_BASE = (
    "it trains whole parts of the model (blocks' weights) as dense deltas, and a quantized weight is "
    "packed storage, not values an optimizer can step"
)


@register("lightweight", LightweightConfig, "train only named parts (embeddings, head, last k blocks) as dense deltas",
          traits=Traits(quantized_base=QUANTIZED_BASE), family="chosen tensors")
def build(model: nn.Module, cfg: LightweightConfig, *, loading: bool = False) -> Built:
    chosen: list[tuple[str, nn.Parameter]] = []
    by_id = {id(p): n for n, p in model.named_parameters()}
    for part in cfg.parts:
        chosen += [(by_id[id(p)], p) for p in _part_module(model, part).parameters() if id(p) in by_id]
    if cfg.last_k:
        n_layers = count_layers(by_id.values())
        if n_layers == 0:
            raise DeltatuneError(f"{type(model).__name__} has no numbered blocks, so last_k has no meaning here")
        first = max(n_layers - cfg.last_k, 0)
        chosen += [(n, p) for n, p in model.named_parameters() if (layer_index(n) if layer_index(n) is not None else -1) >= first]
    if cfg.targets:
        chosen += select_parameters(model, cfg.targets)
    return Built(dense_forms(model, chosen))
