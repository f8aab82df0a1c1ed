"""Low-rank form: ΔW = s · B A, applied on the input path so ΔW is never materialised.

Layouts (``layout`` says how the base module uses its weight):

- ``linear``: W is (out, in); y += s · B(A(dropout(x))), A (r, in), B (out, r).
- ``conv1d``: GPT-2's Conv1D, W is (in, out) (PEFT's ``fan_in_fan_out``); same A, B, ΔW transposed.
- ``embedding``: W is (num, dim); y += s · (Aᵀ[x]) Bᵀ, A (r, num), B (dim, r), as PEFT's
  ``lora_embedding_A/B``, so exported tensors need no reshaping.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltatune.core.forms.base import WeightDelta
from deltatune.errors import DeltatuneError


def layout_of(module: nn.Module) -> str:
    """The low-rank layout for a module, or an error naming the supported types."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    # transformers' GPT-2 Conv1D, also while a parametrisation has swapped its class for a subclass
    if any(c.__name__ == "Conv1D" for c in type(module).__mro__) and hasattr(module, "nf"):
        return "conv1d"
    raise DeltatuneError(
        f"a low-rank delta cannot target a {type(module).__name__}: supported are nn.Linear, GPT-2 Conv1D "
        "and nn.Embedding. Narrow the targets (e.g. types=['linear'])."
    )


def check_rank_fits(r: int, d_out: int, d_in: int, module: nn.Module) -> None:
    """Refuse a rank no factor pair of this weight can use, before the factors are allocated (an artifact asking
    for r = 2**31 would otherwise try to allocate hundreds of GiB).

    The bound is max(out, in), not min(out, in): B·A has rank at most min(out, in) whatever r is, but PEFT
    accepts any r, and adapters trained with r between the two must still import. Above max(out, in) each
    factor alone holds more numbers than the weight itself, which no fine-tune wants.
    """
    if r > max(d_out, d_in):
        raise DeltatuneError(
            f"rank r={r} is too large for a {type(module).__name__} weight of {d_out}x{d_in} (out x in): r can be "
            f"at most max(out, in) = {max(d_out, d_in)} (B·A has rank at most {min(d_out, d_in)} anyway); "
            "lower r (or the rank_pattern entry for this module)"
        )


class LowRank(WeightDelta):
    kind = "low-rank"

    def __init__(
        self,
        module: nn.Module,
        r: int,
        alpha: float,
        *,
        use_rslora: bool = False,
        dropout: float = 0.0,
        init: str | bool = True,
        dtype: torch.dtype | None = None,
        tied: list[tuple[nn.Module, str]] | None = None,
    ) -> None:
        super().__init__([(module, "weight")], "weight", tied)
        if r <= 0:
            raise DeltatuneError(f"rank r={r} must be a positive integer")
        self.layout = layout_of(module)
        self.r, self.alpha, self.use_rslora = int(r), float(alpha), bool(use_rslora)
        self.scale = self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r
        w = self.base
        shape = self.base_shape  # a quantized weight's (out, in), not its packed storage's
        d_out, d_in = (shape[1], shape[0]) if self.layout in ("conv1d", "embedding") else shape
        check_rank_fits(self.r, d_out, d_in, module)
        # like PEFT (autocast_adapter_dtype): factors of a half-precision (or quantized) base train in fp32
        base_dtype = self.base_dtype
        dtype = dtype or (base_dtype if base_dtype in (torch.float32, torch.float64) else torch.float32)
        self.A = nn.Parameter(torch.empty(self.r, d_in, dtype=dtype, device=w.device))
        self.B = nn.Parameter(torch.empty(d_out, self.r, dtype=dtype, device=w.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset(init)

    def reset(self, init: str | bool = True) -> None:
        """PEFT's ``init_lora_weights``: True (Kaiming-uniform A, zero B; embeddings: zero A, normal B),
        "gaussian" (A ~ N(0, 1/r)), False (both random: for tests only)."""
        with torch.no_grad():
            if init is False:
                nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
                nn.init.normal_(self.B, std=0.02)
            elif self.layout == "embedding":
                nn.init.zeros_(self.A)
                nn.init.normal_(self.B)
            elif init is True or init == "kaiming":
                nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
                nn.init.zeros_(self.B)
            elif init == "gaussian":
                nn.init.normal_(self.A, std=1 / self.r)
                nn.init.zeros_(self.B)
            else:
                raise DeltatuneError(f"init={init!r} is not a LoRA init: use True, 'gaussian' or False")

    def delta_weight(self) -> torch.Tensor:
        ba = (self.B @ self.A) * self.scale  # (out, in)
        return ba if self.layout == "linear" else ba.T

    def output_delta(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "embedding":
            e = module  # keep the base embedding's options so indices behave the same
            after_a = F.embedding(x, self.A.T, e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)
            return (after_a @ self.B.T) * self.scale
        x = self.dropout(x.to(self.A.dtype))
        return (x @ self.A.T @ self.B.T) * self.scale

    def extra_repr(self) -> str:
        return f"layout={self.layout}, r={self.r}, alpha={self.alpha}, rslora={self.use_rslora}"
