"""Low-rank form: ΔW = s · B A, applied on the input path so ΔW is never materialised.

Layouts (``layout`` says how the base module uses its weight):

- ``linear``: W is (out, in); y += s · B(A(dropout(x))), A (r, in), B (out, r).
- ``conv1d``: GPT-2's Conv1D, W is (in, out) (PEFT's ``fan_in_fan_out``); same A, B, ΔW transposed.
- ``embedding``: W is (num, dim); y += s · (Aᵀ[x]) Bᵀ, A (r, num), B (dim, r), as PEFT's
  ``lora_embedding_A/B``, so exported tensors need no reshaping.
- ``conv`` (``ConvLowRank``): nn.Conv1d / Conv2d / Conv3d, W is (out, in, *kernel); A (r, in, *kernel) convolves x as
  the base does (its stride, padding, dilation), B (out, r, 1, …) is a 1×1 convolution: y += s · B ∗ (A ∗ x), PEFT's
  Conv LoRA layer (``lora_A`` / ``lora_B`` weights in these shapes); ΔW = s · B A over the channels, (out, in, *kernel).
- ``param`` / ``experts`` (``ParamLowRank``): a parameter targeted by name, as PEFT's ``target_parameters`` (its
  ``ParamWrapper``): a 2-D weight (out, in) that no Linear holds (an MoE router's) gets ΔW = s · B A; a 3-D stack of
  expert matrices (E, out, in) (or (E, in, out) where the experts module says ``is_transposed``) one pair per expert,
  A (E, r, in), B (E, out, r), ΔW[e] = s · B[e] A[e]. The module computes with the parameter itself, so the delta
  acts through a parametrisation (W0 + ΔW, computed once per forward of the module), never through a hook.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from deltatune.core.forms.base import WeightDelta
from deltatune.errors import DeltatuneError

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def layout_of(module: nn.Module) -> str:
    """The low-rank layout for a module, or an error naming the supported types."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    # transformers' GPT-2 Conv1D, also while a parametrisation has swapped its class for a subclass
    if any(c.__name__ == "Conv1D" for c in type(module).__mro__) and hasattr(module, "nf"):
        return "conv1d"
    own = [n for n, p in module.named_parameters(recurse=False) if p.dim() in (2, 3)]
    hint = (f"; a matrix such a module holds itself (here {own[0]!r}, e.g. an MoE router's or experts' weights) takes "
            "lora's target_parameters=['<module>." + own[0] + "']") if own else ""
    raise DeltatuneError(
        f"a low-rank delta cannot target a {type(module).__name__}: supported are nn.Linear, GPT-2 Conv1D "
        f"and nn.Embedding (lora also nn.Conv1d / Conv2d / Conv3d). Narrow the targets (e.g. types=['linear']){hint}."
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


class ConvLowRank(LowRank):
    """ΔW = s·B·A on an nn.Conv1d / Conv2d / Conv3d in PEFT's layout (its ``lora.Conv2d`` & co.): A (r, in, *kernel) is a
    convolution with the base's kernel size, stride, padding and dilation, B (out, r, 1, …) a 1×1 convolution, so
    y += s · B(A(dropout(x))) and ΔW = s · (B A over the channels), the shape of W. Grouped convolutions are refused:
    PEFT's A mixes all input channels, which W (out, in / groups, …) cannot hold, so such a delta never merges."""

    def __init__(self, module: nn.Module, r: int, alpha: float, *, use_rslora: bool = False, dropout: float = 0.0,
                 init: str | bool = True, dtype: torch.dtype | None = None) -> None:
        WeightDelta.__init__(self, [(module, "weight")], "weight", None)
        if r <= 0:
            raise DeltatuneError(f"rank r={r} must be a positive integer")
        if not isinstance(module, CONV_TYPES):
            raise DeltatuneError(f"ConvLowRank targets nn.Conv1d / Conv2d / Conv3d, not a {type(module).__name__}")
        if module.groups != 1:
            raise DeltatuneError(
                f"a low-rank delta cannot target a {type(module).__name__} with groups={module.groups}: its B·A mixes "
                "every input channel, which a grouped convolution's weight cannot hold (it would never merge); "
                "leave this layer out of the targets"
            )
        self.layout = "conv"
        self.r, self.alpha, self.use_rslora = int(r), float(alpha), bool(use_rslora)
        self.scale = self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r
        w = self.base
        d_out, d_in, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
        check_rank_fits(self.r, d_out, d_in * math.prod(kernel), module)
        base_dtype = w.dtype
        dtype = dtype or (base_dtype if base_dtype in (torch.float32, torch.float64) else torch.float32)
        self.A = nn.Parameter(torch.empty(self.r, d_in, *kernel, dtype=dtype, device=w.device))
        self.B = nn.Parameter(torch.empty(d_out, self.r, *(1,) * len(kernel), dtype=dtype, device=w.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset(init)  # kaiming_uniform_ on A (r, in, *kernel): fan-in in·∏kernel, as PEFT's lora_A conv weight

    def delta_weight(self) -> torch.Tensor:
        return ((self.B.flatten(1) @ self.A.flatten(1)) * self.scale).view(self.base.shape)

    def output_delta(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.A.dtype))
        after_a = module._conv_forward(x, self.A, None)  # the base's stride, padding (and its mode), dilation
        return _CONV_FN[self.A.dim() - 2](after_a, self.B) * self.scale


class ParamLowRank(LowRank):
    """LoRA on a parameter targeted by name (PEFT's ``target_parameters``, its ``ParamWrapper``), for matrices that no
    Linear holds: a 2-D weight (out, in) such as an MoE router's (layout ``param``: ΔW = s·B·A), or a 3-D stack of
    expert matrices (layout ``experts``), one pair per expert: A (E, r, in), B (E, out, r), ΔW[e] = s·B[e]·A[e]. The
    stack is (E, out, in), or (E, in, out) where the module says ``is_transposed`` (transformers' experts flag, which
    PEFT reads too). The module computes with the parameter, so ΔW reaches it through a parametrisation, computed once
    per forward of the module (``torch.nn.utils.parametrize.cached`` around it: an expert loop reads the stack once
    per expert). No dropout: the delta is added to the weight, there is no input of its own to drop (PEFT refuses it
    too)."""

    def __init__(self, module: nn.Module, param: str, r: int, alpha: float, *, use_rslora: bool = False,
                 init: str | bool = True, dtype: torch.dtype | None = None) -> None:
        WeightDelta.__init__(self, [(module, param)], param, None)
        if r <= 0:
            raise DeltatuneError(f"rank r={r} must be a positive integer")
        w = self.base
        if w.dim() == 2:
            self.layout, self.experts, self.transposed = "param", 0, False
            d_out, d_in = w.shape
        elif w.dim() == 3:
            self.layout, self.experts = "experts", int(w.shape[0])
            self.transposed = bool(getattr(module, "is_transposed", False))
            d_out, d_in = (w.shape[2], w.shape[1]) if self.transposed else (w.shape[1], w.shape[2])
        else:
            raise DeltatuneError(
                f"target_parameters takes 2-D weights and 3-D stacks of expert matrices; {param!r} of "
                f"{type(module).__name__} has shape {tuple(w.shape)}: leave it out of target_parameters"
            )
        self.r, self.alpha, self.use_rslora = int(r), float(alpha), bool(use_rslora)
        self.scale = self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r
        check_rank_fits(self.r, int(d_out), int(d_in), module)
        dtype = dtype or (w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32)
        lead = (self.experts,) if self.experts else ()
        self.A = nn.Parameter(torch.empty(*lead, self.r, d_in, dtype=dtype, device=w.device))
        self.B = nn.Parameter(torch.empty(*lead, d_out, self.r, dtype=dtype, device=w.device))
        self.dropout = nn.Identity()
        self._caches: list = []
        self.reset(init)

    def reset(self, init: str | bool = True) -> None:
        """LoRA's inits on each expert's pair (Kaiming's fan-in is ``in``, as on PEFT's (E·r, in) lora_A)."""
        with torch.no_grad():
            a, b = self.A.view(-1, self.A.shape[-1]), self.B.view(-1, self.B.shape[-1])
            if init is False:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.normal_(b, std=0.02)
            elif init is True or init == "kaiming":
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                nn.init.zeros_(b)
            elif init == "gaussian":
                nn.init.normal_(a, std=1 / self.r)
                nn.init.zeros_(b)
            else:
                raise DeltatuneError(f"init={init!r} is not a LoRA init for target_parameters: use True, 'gaussian' "
                                     "or False")

    def delta_weight(self) -> torch.Tensor:
        if not self.experts:
            return (self.B @ self.A) * self.scale
        dw = torch.bmm(self.B, self.A) * self.scale  # (E, out, in)
        return dw.transpose(1, 2) if self.transposed else dw

    def output_delta(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def uses_output_path(self) -> bool:
        return False

    def attach(self) -> None:
        if self.attached:
            return
        super().attach()
        module = self._sites[0][0]
        self._hooks.append(module.register_forward_pre_hook(self._cache_on))
        self._hooks.append(module.register_forward_hook(self._cache_off, always_call=True))

    def _cache_on(self, module: nn.Module, args: tuple) -> None:
        cache = parametrize.cached()
        cache.__enter__()
        self._caches.append(cache)

    def _cache_off(self, module: nn.Module, args: tuple, output: object) -> None:
        if self._caches:
            self._caches.pop().__exit__(None, None, None)

    def extra_repr(self) -> str:
        shape = f", experts={self.experts}" + (", transposed" if self.transposed else "") if self.experts else ""
        return f"layout={self.layout}, param={self.param_name}, r={self.r}, alpha={self.alpha}{shape}"
