"""Dense form: a full tensor ΔW for a selected base tensor (full fine-tuning, BitFit, LISA, ...)."""

from __future__ import annotations

import torch
import torch.nn as nn

from deltatune.core.forms.base import WeightDelta


class Dense(WeightDelta):
    """W = W0 + Δ with Δ a trainable tensor of W0's shape, zero at the start.

    The artifact stores Δ only if it is non-zero: a "full" fine-tune whose policy never
    trained some tensors does not pay for them on disk.
    """

    kind = "dense"

    def __init__(self, sites: list[tuple[nn.Module, str]], param_name: str, dtype: torch.dtype | None = None) -> None:
        super().__init__(sites, param_name)
        base = self.base
        self.delta = nn.Parameter(torch.zeros_like(base, dtype=dtype or base.dtype))

    def delta_weight(self) -> torch.Tensor:
        return self.delta

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {"delta": self.delta.detach()} if bool(self.delta.detach().any()) else {}

    def optional_tensors(self) -> set[str]:
        return {"delta"}
