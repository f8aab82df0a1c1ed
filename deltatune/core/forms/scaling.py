"""Scaling form: a weight rescaled along one axis, W = W0 ⊙ s, so ΔW = W0 ⊙ (s − 1).

One learned vector scales either the outputs of a Linear / GPT-2 Conv1D layer (each output row of W0, and its bias)
or its inputs (each input column of W0: the layer sees x ⊙ s). This is what (IA)³ learns; at s = 1 the layer is
unchanged.

Forward, as PEFT's (IA)³ layer computes it: the output is multiplied by s, or a forward pre-hook multiplies the input
by s, so nothing of W0's size is built. That shortcut scales everything the module computes, so it is taken only while
this delta is alone on the module; beside another delta of the same weight (a composition, or a sparse form that
replaced the module's forward) the hook adds exactly ΔW·x = (s − 1) ⊙ (W0·x), or W0·((s − 1) ⊙ x), instead.

An output scaling of a module with a bias also scales the bias, Δb = b0 ⊙ (s − 1): a second form on the bias
(``ScaledBias``) holds no tensor of its own, reads the vector of its weight's form, and acts through a
parametrisation (b0 ⊙ s), so merge, composition and every export see both tensors' deltas; the weight's hook then
scales only W0·x.

ΔW depends on W0, so merge writes W0 ⊙ s and unmerge divides by s (exact to rounding); entries whose scale is zero
cannot be divided back, so merge keeps their W0 aside.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from deltatune.core.forms.base import WeightDelta, _AddDelta, refuse_quantized_merge
from deltatune.core.forms.lowrank import layout_of
from deltatune.errors import DeltatuneError


def _alone(module: nn.Module, own_forward_hooks: int, own_pre_hooks: int, bias_form: WeightDelta | None) -> bool:
    """Whether only this scaling acts on ``module``: no other hook, no replaced forward, no other parametrisation
    (the bias may be parametrised by the scaling's own bias form)."""
    if len(module._forward_hooks) > own_forward_hooks or len(module._forward_pre_hooks) > own_pre_hooks:
        return False
    if "forward" in module.__dict__:  # a sparse form runs W0 + scatter in a forward of its own
        return False
    if parametrize.is_parametrized(module, "weight"):
        return False
    if parametrize.is_parametrized(module, "bias"):
        plist = module.parametrizations["bias"]
        return all(isinstance(p, _AddDelta) and p.form is bias_form for p in plist)
    return True


class _Scaled(WeightDelta):
    """What the weight and the bias scalings share: ΔT = T0 ⊙ (s − 1) with s shaped along one axis of T0."""

    kind = "scaling"

    def __init__(self, sites: list[tuple[nn.Module, str]], param_name: str,
                 tied: list[tuple[nn.Module, str]] | None = None) -> None:
        super().__init__(sites, param_name, tied)
        self._kept: tuple[torch.Tensor, torch.Tensor] | None = None  # (mask, W0 values) a merge could not scale back

    def shaped(self) -> torch.Tensor:
        """s shaped to broadcast over the base tensor in its own layout."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        if self.merged:
            raise DeltatuneError("a merged scaling delta has overwritten W0, which its ΔW depends on: unmerge first")
        s = self.shaped()
        return self.dense_base(s.dtype if s.dtype in (torch.float32, torch.float64) else torch.float32) * (s - 1)

    def merge(self) -> None:
        if self.merged:
            raise DeltatuneError("this delta is already merged; unmerge it before merging again")
        refuse_quantized_merge(self)
        self.detach()
        with torch.no_grad():
            base = self.base
            s = self.shaped().float()
            # W0 ⊙ s, not W0 + W0 ⊙ (s − 1): the sum cancels where s is small, and unmerge divides by s
            merged = (base.float() * s).to(base.dtype)
            if self._tied:  # the delta applies here only: these modules get a merged copy, the tie partners keep W0
                self._untied_from = base
                new = nn.Parameter(merged, requires_grad=base.requires_grad)
                for module, attr in self._sites:
                    setattr(module, attr, new)
            else:
                zero = (s == 0).expand_as(base)
                self._kept = (zero, base[zero].clone()) if bool(zero.any()) else None
                base.copy_(merged)
        self.merged = True

    def unmerge(self) -> None:
        if self.merged and self._untied_from is None:
            with torch.no_grad():
                base = self.base
                s = self.shaped().float()
                w0 = base.float() / torch.where(s == 0, torch.ones_like(s), s)
                base.copy_(w0.to(base.dtype))
                if self._kept is not None:
                    mask, values = self._kept
                    base[mask] = values
            self._kept = None
            self.merged = False
            self.attach()
            return
        super().unmerge()


class Scaling(_Scaled):
    """W = W0 ⊙ s on a Linear / GPT-2 Conv1D weight: s (``vector``) scales its outputs, or its inputs with
    ``on_input`` (PEFT's ``feedforward_modules``)."""

    def __init__(self, module: nn.Module, *, on_input: bool, dtype: torch.dtype | None = None,
                 tied: list[tuple[nn.Module, str]] | None = None) -> None:
        super().__init__([(module, "weight")], "weight", tied)
        self.layout = layout_of(module)
        if self.layout == "embedding":
            raise DeltatuneError("a scaling delta cannot target an nn.Embedding: it scales the inputs or outputs of "
                                 "Linear and GPT-2 Conv1D layers; narrow the targets (e.g. types=['linear'])")
        self.on_input = bool(on_input)
        shape = self.base_shape
        d_out, d_in = (shape[1], shape[0]) if self.layout == "conv1d" else shape
        base_dtype = self.base_dtype
        # like PEFT (autocast_adapter_dtype): the vector of a half-precision base trains in fp32
        dtype = dtype or (base_dtype if base_dtype in (torch.float32, torch.float64) else torch.float32)
        self.scale = nn.Parameter(torch.ones(d_in if self.on_input else d_out, dtype=dtype, device=self.base.device))
        self.bias_form: ScaledBias | None = None  # set by ScaledBias: the bias an output scaling scales too
        self._scaled_input = False  # the pre-hook scaled this call's input (the output hook then adds nothing)

    def shaped(self) -> torch.Tensor:
        # linear W (out, in), conv1d W (in, out): the output axis is 0 for linear, 1 for conv1d
        along_rows = (self.layout == "linear") != self.on_input
        return self.scale.view(-1, 1) if along_rows else self.scale.view(1, -1)

    # -- forward -------------------------------------------------------------------------
    def output_delta(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """ΔW·x alone (the bias's share is its own form's): for the hook beside other deltas."""
        w0 = self.dense_base(self.scale.dtype)
        x = x.to(self.scale.dtype)
        if self.on_input:
            x = x * (self.scale - 1)
            return x @ w0.T if self.layout == "linear" else x @ w0
        wx = x @ w0.T if self.layout == "linear" else x @ w0
        return wx * (self.scale - 1)

    def attach(self) -> None:
        if self.attached:
            return
        super().attach()  # the forward hook (self._hook)
        if self.on_input:
            self._hooks.append(self._sites[0][0].register_forward_pre_hook(self._pre_hook))

    def _is_alone(self, module: nn.Module) -> bool:
        return _alone(module, 1, 1 if self.on_input else 0, self.bias_form)

    def _pre_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        self._scaled_input = self._is_alone(module)
        if not self._scaled_input:
            return None
        x = args[0]
        # PEFT's arithmetic: scale in the vector's dtype, hand the layer its own dtype back
        return ((x.to(self.scale.dtype) * self.scale).to(x.dtype), *args[1:])

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self.on_input:
            if self._scaled_input:
                self._scaled_input = False
                return output
            return (output + self.output_delta(module, args[0])).to(output.dtype)
        if self._is_alone(module):
            # (W0·x + b0 ⊙ s) with the bias form on: scale W0·x only, b0 ⊙ s is already there
            bias = getattr(module, "bias", None) if self.bias_form is not None else None
            if bias is None:
                return (output * self.scale).to(output.dtype)
            return ((output - bias) * self.scale + bias).to(output.dtype)
        return (output + self.output_delta(module, args[0])).to(output.dtype)

    def detach(self) -> None:
        super().detach()
        self._scaled_input = False

    def extra_repr(self) -> str:
        return f"layout={self.layout}, scales={'inputs' if self.on_input else 'outputs'}"


class ScaledBias(_Scaled):
    """b = b0 ⊙ s for the bias of an output scaling: s is the ``Scaling`` form's vector (held there, stored there),
    applied through a parametrisation."""

    def __init__(self, weight_form: Scaling) -> None:
        if weight_form.on_input:
            raise DeltatuneError("an input scaling leaves the bias as it is: it has no bias form")
        module = weight_form.sites[0][0]
        if getattr(module, "bias", None) is None:
            raise DeltatuneError(f"{type(module).__name__} has no bias to scale")
        super().__init__([(module, "bias")], "bias")
        object.__setattr__(self, "weight_form", weight_form)  # not a submodule: its vector is stored once, there
        weight_form.bias_form = self

    def shaped(self) -> torch.Tensor:
        return self.weight_form.scale

    def num_trainable(self) -> int:
        return 0  # its one tensor is its weight form's
