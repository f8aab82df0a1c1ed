"""Helpers shared by method modules (not a method: the leading underscore keeps it unregistered)."""

from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn

from deltatune.core.forms.dense import Dense
from deltatune.core.targeting import sites_of


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
