"""Helpers shared by method modules (not a method: the leading underscore keeps it unregistered)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.nn as nn

from deltatune.core import registry
from deltatune.core.forms.dense import Dense
from deltatune.core.forms.inplace import InPlace
from deltatune.core.targeting import layer_index, select_modules, sites_of
from deltatune.errors import DeltatuneError


def dense_forms(model: nn.Module, params: Iterable[tuple[str, nn.Parameter]]) -> dict[str, Dense]:
    """One dense delta per parameter (tied parameters once, applied at every module holding them)."""
    forms: dict[str, Dense] = {}
    seen: set[int] = set()
    for name, p in params:
        if id(p) in seen or not p.is_floating_point():
            continue
        seen.add(id(p))
        forms[name] = Dense(sites_of(model, p), name)
    return forms


def block_matrices(
    model: nn.Module,
    targets: list[str] | None,
    layers: list[int] | str | None = None,
    exclude: list[str] | None = None,
) -> list[tuple[str, nn.Module]]:
    """The weight matrices a sparse method tunes: the named targets, or by default every Linear /
    GPT-2 Conv1D inside the numbered transformer blocks (not embeddings, not the output head)."""
    if targets:
        return select_modules(model, targets, layers=layers, types=["linear", "conv1d"], exclude=exclude)
    found = select_modules(model, None, layers=layers, types=["linear", "conv1d"], exclude=exclude)
    return [(n, m) for n, m in found if layer_index(n) is not None]


def inplace_forms(model: nn.Module, params: Iterable[tuple[str, nn.Parameter]], trainable: bool = True
                  ) -> dict[str, InPlace]:
    """One in-place dense delta per parameter (tied parameters once): the model's own tensors train, and
    W0 is copied only for the tensors that get a gradient."""
    forms: dict[str, InPlace] = {}
    seen: set[int] = set()
    for name, p in params:
        if id(p) in seen or not p.is_floating_point():
            continue
        seen.add(id(p))
        forms[name] = InPlace(sites_of(model, p), name)
        p.requires_grad_(trainable)
    return forms


def build_base(model: nn.Module, base_name: str, base_options: dict[str, Any], loading: bool) -> registry.Built:
    """The forms and policy of another registered method, for a method that wraps one (IST's layer selection
    over LoRA, MeZO's optimizer over any form). Bad options name the base and the wrapping option."""
    method = registry.get(base_name)
    try:
        cfg = registry.make_config(method, dict(base_options))
    except DeltatuneError as e:
        raise DeltatuneError(f"base_options: {e}") from e
    return method.build(model, cfg, loading=loading)
