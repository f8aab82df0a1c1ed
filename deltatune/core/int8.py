"""Int8 layers: weights with per-output-channel scales, in plain torch (no bitsandbytes, any device).

Two uses, for the question "does merging a delta into a quantised base hurt?":

- ``tuned.merge(quantize="int8")``: fold the delta into the fp weights, then quantise (``quantize_model``):
  the quantisation error lands on W0 + ΔW.
- ``quantize_base(tuned)``: quantise the base under an *unmerged* low-rank delta, which keeps acting in
  full precision on top (QLoRA-style serving): the quantisation error lands on W0 only.

Scheme: symmetric per output channel, s_o = max_i |W_oi| / 127, Q = round(W / s) in [-127, 127] (int8; -128 is
not used, so the range is symmetric), as LLM.int8()'s and torch's per-channel weight observers. The layer
computes y = (x Qᵀ) ⊙ s + b: the int8 weight is cast to the activation dtype (exact: |Q| ≤ 127 fits bf16 and
fp16) and the scale is applied to the output channels, so no fp copy of the weight is kept between calls.
Weight-only: activations stay in their dtype (unlike torch.ao's dynamic quantisation, which also quantises
activations to uint8 and supports only CPU and nn.Linear, not GPT-2's Conv1D).

Which layers: every nn.Linear and GPT-2 Conv1D except the output head (``get_output_embeddings()``; transformers'
and bitsandbytes' convention, since the head is usually tied to the input embedding) and any layer whose weight is
shared with another module (quantising it would untie it).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltatune.core.forms.lowrank import layout_of
from deltatune.errors import DeltatuneError

SCHEMES = ("int8",)
QMAX = 127


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise DeltatuneError(f"quantize={scheme!r} is not supported: use one of {list(SCHEMES)} (or None)")


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q int8 (out, in), s fp32 (out,)) for a weight in (out, in) layout, with W ≈ Q ⊙ s per row."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale is exact
    q = torch.round(w / scale[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """y = (x Qᵀ) ⊙ s + b with Q int8 (out, in) and s one fp32 scale per output channel (both buffers)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or scale.shape != qweight.shape[:1]:
            raise DeltatuneError("Int8Linear needs an int8 (out, in) weight and one scale per output channel")
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_module(cls, module: nn.Module) -> Int8Linear:
        """Quantise an nn.Linear (weight (out, in)) or a GPT-2 Conv1D (weight (in, out))."""
        layout = layout_of(module)
        if layout == "embedding":
            raise DeltatuneError("Int8Linear replaces Linear / GPT-2 Conv1D layers, not embeddings")
        w = module.weight if layout == "linear" else module.weight.T
        q, s = quantize_weight(w)
        return cls(q, s, module.bias)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Q ⊙ s as an (out, in) matrix (for checks; the forward never builds it)."""
        return self.qweight.to(dtype) * self.scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantizable(model: nn.Module, include_head: bool = False) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs ``quantize_model`` replaces, in model order."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    holders: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for _, p in m.named_parameters(recurse=False, remove_duplicate=False):
            holders[id(p)] = holders.get(id(p), 0) + 1
    found = []
    for name, m in model.named_modules():
        if not name or (m is head and not include_head):
            continue
        if isinstance(m, nn.Linear) or (type(m).__name__ == "Conv1D" and hasattr(m, "nf")):
            if holders.get(id(m.weight), 0) == 1:  # a shared (tied) weight stays as it is
                found.append((name, m))
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_model(model: nn.Module, scheme: str = "int8", *, include_head: bool = False) -> nn.Module:
    """Replace every Linear / GPT-2 Conv1D of ``model`` (see the module docstring for which) by an
    ``Int8Linear``, in place, and return the model. A model with a delta attached: use ``quantize_base``."""
    check_scheme(scheme)
    if hasattr(model, "deltas") and hasattr(model, "model"):  # a Tuned (not imported: tuned.py imports this module)
        raise DeltatuneError("quantize_model takes a plain model: tuned.merge(quantize='int8') merges first, "
                             "quantize_base(tuned) keeps the delta unmerged")
    for name, m in quantizable(model, include_head):
        if m._forward_hooks or hasattr(m, "parametrizations") or "forward" in m.__dict__:
            raise DeltatuneError(f"{name} has a delta attached: merge it first (tuned.merge(quantize='int8')) or "
                                 "use quantize_base(tuned)")
        replace_module(model, name, Int8Linear.from_module(m))
    return model
