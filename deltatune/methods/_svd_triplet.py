"""The SVD-form delta ΔW = s·P diag(Λ) Q that AdaLoRA prunes and IncreLoRA grows (``adalora`` documents
its scale and initialisation), and the matrices both methods target."""

from __future__ import annotations

import torch
import torch.nn as nn

from deltatune.core.forms.base import WeightDelta
from deltatune.core.forms.lowrank import check_rank_fits, layout_of
from deltatune.errors import DeltatuneError
from deltatune.methods._common import block_matrices

EPS_RANK = 1e-5  # the official code and PEFT divide by (ranknum + 1e-5)


# -- the form ---------------------------------------------------------------------------------------
class SVDTriplet(WeightDelta):
    """ΔW = alpha / (ranknum + 1e-5) · B diag(E) A on a Linear or GPT-2 Conv1D weight, on the output path
    (y += s · ((x @ (A ⊙ E)ᵀ) @ Bᵀ), PEFT's ``SVDLinear.forward``)."""

    kind = "svd-triplet"

    def __init__(self, module: nn.Module, r: int, alpha: float, *, ranknum: float | None = None,
                 dropout: float = 0.0, tied: list[tuple[nn.Module, str]] | None = None) -> None:
        super().__init__([(module, "weight")], "weight", tied)
        self.layout = layout_of(module)
        if self.layout == "embedding":
            raise DeltatuneError("an SVD-form delta targets Linear / GPT-2 Conv1D layers, not embeddings "
                                 "(as PEFT's AdaLoRA): narrow the targets")
        if r < 0:
            raise DeltatuneError(f"rank r={r} must be >= 0")
        w = self.base
        shape = self.base_shape  # a quantized weight's (out, in), not its packed storage's
        self.d_out, self.d_in = (shape[1], shape[0]) if self.layout == "conv1d" else shape
        check_rank_fits(r, self.d_out, self.d_in, module)
        # factors of a half-precision base train in fp32 (as PEFT and the low-rank form)
        self.dtype = self.base_dtype if self.base_dtype in (torch.float32, torch.float64) else torch.float32
        self.alpha = float(alpha)
        self.ranknum = float(r if ranknum is None else ranknum)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.A = nn.Parameter(torch.zeros(r, self.d_in, dtype=self.dtype, device=w.device))
        self.E = nn.Parameter(torch.zeros(r, 1, dtype=self.dtype, device=w.device))
        self.B = nn.Parameter(torch.zeros(self.d_out, r, dtype=self.dtype, device=w.device))

    @property
    def r(self) -> int:
        return self.A.shape[0]

    @property
    def scale(self) -> float:
        # PEFT: scaling = lora_alpha if lora_alpha > 0 else r
        return (self.alpha if self.alpha > 0 else float(self.r)) / (self.ranknum + EPS_RANK)

    def init_like_peft(self) -> None:
        """PEFT's ``AdaLoraLayer.update_layer`` draw for draw on the CPU generator (randn A, E, B and the
        ranknum placeholder, then E = 0, A, B ~ N(0, 0.02²)), so one seed gives PEFT's initial triplets."""
        r = self.r
        a = torch.randn(r, self.d_in)
        torch.randn(r, 1)
        b = torch.randn(self.d_out, r)
        torch.randn(1)
        nn.init.normal_(a, mean=0.0, std=0.02)
        nn.init.normal_(b, mean=0.0, std=0.02)
        with torch.no_grad():
            self.A.copy_(a)
            self.B.copy_(b)
            self.E.zero_()

    # -- the delta ------------------------------------------------------------------------------
    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, E, B) of every component in the forward pass (a subclass may add more)."""
        return self.A, self.E, self.B

    def delta_weight(self) -> torch.Tensor:
        a, e, b = self.factors()
        dw = (b @ (a * e)) * self.scale  # (out, in)
        return dw if self.layout == "linear" else dw.T

    def output_delta(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        a, e, b = self.factors()
        x = self.dropout(x.to(a.dtype))
        return (x @ (a * e).T @ b.T) * self.scale

    # -- what is stored -------------------------------------------------------------------------
    def kept(self) -> torch.Tensor:
        """Components that contribute (λ ≠ 0): the artifact keeps exactly these."""
        return self.E.detach().reshape(-1) != 0

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        keep = self.kept()
        return {"A": self.A.detach()[keep], "E": self.E.detach()[keep], "B": self.B.detach()[:, keep]}

    def stored_tensors_names(self) -> list[str]:
        return ["A", "E", "B"]

    def load_stored(self, tensors: dict[str, torch.Tensor]) -> None:
        a, e, b = tensors["A"], tensors["E"], tensors["B"]
        r = a.shape[0]
        if a.shape != (r, self.d_in) or e.shape != (r, 1) or b.shape != (self.d_out, r):
            raise DeltatuneError(
                f"the SVD triplet of {self.param_name} has shapes A {tuple(a.shape)}, E {tuple(e.shape)}, "
                f"B {tuple(b.shape)}; this layer needs ({self.d_in} inputs, {self.d_out} outputs) with one rank: "
                "the artifact was made for another base model"
            )
        self._resize(r)
        with torch.no_grad():
            self.A.copy_(a.to(self.A))
            self.E.copy_(e.to(self.E))
            self.B.copy_(b.to(self.B))

    def _resize(self, r: int) -> None:
        """New tensors of rank ``r`` (the stored final rank of this matrix)."""
        if r == self.r:
            return
        dev, grad = self.A.device, self.A.requires_grad
        self.A = nn.Parameter(torch.zeros(r, self.d_in, dtype=self.dtype, device=dev), requires_grad=grad)
        self.E = nn.Parameter(torch.zeros(r, 1, dtype=self.dtype, device=dev), requires_grad=grad)
        self.B = nn.Parameter(torch.zeros(self.d_out, r, dtype=self.dtype, device=dev), requires_grad=grad)

    def extra_repr(self) -> str:
        return f"layout={self.layout}, r={self.r}, ranknum={self.ranknum:g}, alpha={self.alpha:g}"


def svd_targets(model: nn.Module, targets: list[str] | None, layers: list[int] | str | None,
                exclude: list[str] | None) -> list[tuple[str, nn.Module]]:
    found = block_matrices(model, targets, layers, exclude)
    if not found:
        raise DeltatuneError("no Linear / GPT-2 Conv1D layer matches the targets: widen targets / layers / exclude")
    return found
