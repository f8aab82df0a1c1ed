"""The importance estimator AdaLoRA and IncreLoRA share (not a method: the underscore keeps it unregistered).

AdaLoRA (Zhang et al., ICLR 2023, eq. 8-10) smooths a raw importance I over steps with two EMAs,

    Ī ← β₁·Ī + (1 − β₁)·I           (sensitivity)
    Ū ← β₂·Ū + (1 − β₂)·|I − Ī|     (uncertainty)
    s = Ī · Ū

AdaLoRA applies it per entry of P, Λ, Q with I = |w · ∂L/∂w|; IncreLoRA applies the same smoothing per
module with I = Σ|ΔW ⊙ ∂L/∂ΔW| / √numel(ΔW). One implementation, keyed by name, any tensor shape.
The arithmetic is written in the order of PEFT's ``RankAllocator.update_ipt`` so scores match it bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch


class SmoothedImportance:
    """EMAs of sensitivity and uncertainty per key; ``score`` is their product."""

    def __init__(self, beta1: float, beta2: float) -> None:
        if not (0 < beta1 < 1 and 0 < beta2 < 1):
            raise ValueError(f"beta1={beta1} and beta2={beta2} must lie in (0, 1)")
        self.beta1, self.beta2 = beta1, beta2
        self.avg: dict[str, torch.Tensor] = {}
        self.unc: dict[str, torch.Tensor] = {}

    def update(self, key: str, ipt: torch.Tensor) -> None:
        """Fold one step's raw importance ``ipt`` into the EMAs of ``key``."""
        ipt = ipt.detach()
        if key not in self.avg:
            self.avg[key] = torch.zeros_like(ipt)
            self.unc[key] = torch.zeros_like(ipt)
        self.avg[key] = self.beta1 * self.avg[key] + (1 - self.beta1) * ipt
        self.unc[key] = self.beta2 * self.unc[key] + (1 - self.beta2) * (ipt - self.avg[key]).abs()

    def score(self, key: str) -> torch.Tensor:
        return self.avg[key] * self.unc[key]

    def __contains__(self, key: str) -> bool:
        return key in self.avg

    def reset(self) -> None:
        self.avg, self.unc = {}, {}

    def state_dict(self) -> dict[str, Any]:
        return {"avg": dict(self.avg), "unc": dict(self.unc)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.avg = dict(state.get("avg", {}))
        self.unc = dict(state.get("unc", {}))


def sensitivity(p: torch.Tensor) -> torch.Tensor | None:
    """|w · ∂L/∂w| per entry (AdaLoRA eq. 8); None when the tensor has no gradient this step."""
    if p.grad is None:
        return None
    return (p * p.grad).abs().detach()


def orthogonality(qs: list[torch.Tensor], ps: list[torch.Tensor]) -> torch.Tensor | None:
    """AdaLoRA's R(P, Q): the mean over every tensor of ‖QQᵀ − I‖_F (Q: rows are components) and
    ‖PᵀP − I‖_F (P: columns are components), as PEFT's ``AdaLoraModel.forward`` and both official codes."""
    terms = []
    for q in qs:
        cov = q @ q.T
        terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
    for p in ps:
        cov = p.T @ p
        terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)))
    if not terms:
        return None
    return torch.stack(terms).sum() / len(terms)
