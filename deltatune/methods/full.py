"""Full fine-tuning as a dense delta: every selected tensor trains in place, as in plain fine-tuning
(no second copy of the model), and the artifact stores Δ = W − W0 of only the tensors that changed.

W0, the reference the artifact is computed from, waits on disk by default (``keep_w0: disk``: a raw file per
tensor, written when it first trains, in ``w0_dir`` or the system's temporary folder), so training holds what
plain full fine-tuning holds; ``keep_w0: memory`` keeps it beside the weight (one more copy of the model, no disk
and no read of W0 per step). Both give the same artifact bit for bit: after every optimizer step W is settled onto
a value its artifact reproduces exactly, which on disk reads W0 back in chunks of a few MiB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn as nn

from deltatune.core.registry import Built, Traits, register
from deltatune.core.targeting import select_parameters
from deltatune.methods._common import dense_forms
from deltatune.methods._offloaded_w0 import check_keep_w0, kept_w0_forms


@dataclass
class FullConfig:
    targets: list[str] | None = None  # parameter-name patterns; None trains every parameter
    layers: list[int] | str | None = None  # blocks: an index, a list, or 'start:stop' (None: all)
    types: list[str] | None = None  # module types kept: linear, conv1d, embedding, layernorm (None: all)
    exclude: list[str] | None = None  # name patterns left out (as in targets)
    # where W0 (the artifact's reference) waits while W trains in place. "disk": a file per trained tensor (the
    # memory of plain full fine-tuning); "memory": a copy beside the weight, on its device (one more model-size)
    keep_w0: Literal["disk", "memory"] = "disk"
    w0_dir: str | None = None  # the folder of those files (None: the system's temporary folder)

    def __post_init__(self) -> None:
        check_keep_w0(self.keep_w0)


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
    if loading:
        return Built(dense_forms(model, params))
    return Built(kept_w0_forms(model, params, cfg.keep_w0, cfg.w0_dir))
