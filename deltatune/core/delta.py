"""A delta apart from any model: what an artifact path or a ``Tuned`` holds (method, config, fingerprint, tensors)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from deltatune.core import artifact, registry
from deltatune.core.tuned import Tuned
from deltatune.errors import DeltatuneError

DeltaSource = str | os.PathLike | Tuned


def read_delta(item: DeltaSource) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(name, description with method / config / fingerprint, tensors) of an artifact path or a Tuned."""
    if isinstance(item, Tuned):
        if item.merged:
            raise DeltatuneError(f"the {item.method.name!r} delta is merged into its model: unmerge() it first")
        meta = {"method": item.method.name, "config": registry.config_to_dict(item.method_config),
                "fingerprint": item.fingerprint()}
        tensors = {k: v.detach().clone() for k, v in item.delta_state_dict().items()}
        return item.method.name, meta, tensors
    if not isinstance(item, str | os.PathLike):
        raise DeltatuneError(f"a delta is an artifact path or a Tuned model or Tuned models, not {type(item).__name__}")
    meta, tensors = artifact.read_artifact(item)
    return Path(item).name, meta, tensors
