"""The form interface every delta implements, and the shared machinery of weight-side forms.

A ``Form`` is one delta at one place of the model. The core only ever talks to this interface:
attach / detach its effect, merge / unmerge it into the weights, count what it trains, and
hand over / take back the tensors that go into ``delta.safetensors``. Activation-side forms
(adapters, prefixes) subclass ``Form`` directly; weight-side forms (ΔW added to a base tensor)
subclass ``WeightDelta``, which decides how the delta reaches the forward pass:

- *output path*: for Linear / GPT-2 Conv1D / Embedding weights a form may compute its
  contribution to the module's output from the module's input (``output_delta``), installed as
  a forward hook. LoRA uses it so ΔW is never materialised, exactly as PEFT computes it.
- *parametrisation*: any other tensor (biases, norms, whole weights of a dense delta) is seen
  by the module as ``W0 + delta_weight()`` through ``torch.nn.utils.parametrize``; tied weights
  get the same parametrisation at every module that holds them.

Either way the base tensor W0 is never written until ``merge``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from deltatune.core import quantized
from deltatune.errors import DeltatuneError


class Form(nn.Module):
    """One delta at one place of the model."""

    kind: ClassVar[str] = "form"
    mergeable: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self.attached = False
        self.merged = False

    # -- effect on the model -------------------------------------------------------------
    def attach(self) -> None:
        raise NotImplementedError

    def detach(self) -> None:
        raise NotImplementedError

    def why_not_mergeable(self) -> str:
        """Said by ``Tuned.merge`` when ``mergeable`` is False."""
        return f"its {self.kind} delta changes activations, not weights"

    def merge(self) -> None:
        raise DeltatuneError(f"a {self.kind} delta cannot be merged into weights; keep it attached to serve it")

    def unmerge(self) -> None:
        raise DeltatuneError(f"a {self.kind} delta cannot be merged into weights, so it cannot be unmerged")

    # -- what it trains and stores -------------------------------------------------------
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that define this delta (names local to the form)."""
        out = {n: p.detach() for n, p in self.named_parameters()}
        out.update({n: b for n, b in self.named_buffers() if b is not None})
        return out

    def stored_tensors_names(self) -> list[str]:
        """Every tensor name this form can store (``stored_tensors`` may leave optional ones out)."""
        names = [n for n, _ in self.named_parameters()] + [n for n, b in self.named_buffers() if b is not None]
        return names

    def optional_tensors(self) -> set[str]:
        """Names that may be absent from an artifact (a form that stores only what changed)."""
        return set()

    def load_stored(self, tensors: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters()) | {n: b for n, b in self.named_buffers() if b is not None}
        with torch.no_grad():
            for name, value in tensors.items():
                target = own[name]
                if target.shape != value.shape:
                    raise DeltatuneError(
                        f"tensor {name!r} has shape {tuple(value.shape)} in the artifact but the model needs "
                        f"{tuple(target.shape)}: the artifact was made with another config or base model"
                    )
                target.copy_(value.to(target.dtype))

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stored_tensors().values())

    def base_tensors(self) -> dict[str, torch.Tensor]:
        """Base-model tensors this delta depends on, by local name ("" for the one tensor of a weight
        delta): they go into the artifact's fingerprint under the form's name."""
        return {}


def refuse_quantized_merge(form: WeightDelta) -> None:
    """A form merges into a quantized weight only through ``Tuned.merge``, which first turns the quantized
    layers into plain ones (``deltatune.core.quantized.to_plain``): packed storage cannot take W0 + ΔW."""
    if form.quantized:
        raise DeltatuneError(f"{form.param_name} is a quantized weight: merge the delta with tuned.merge(), "
                             "which dequantizes the base first")


class _AddDelta(nn.Module):
    """Parametrisation W -> W + ΔW. It holds its form without registering it as a submodule, so
    the delta's parameters live (once) in the tuned model, not inside the base model."""

    def __init__(self, form: WeightDelta) -> None:
        super().__init__()
        object.__setattr__(self, "form", form)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.form.added_to(weight)


class WeightDelta(Form):
    """ΔW added to one base tensor (``param_name``), held by one or more modules (tied weights)."""

    def __init__(
        self, sites: list[tuple[nn.Module, str]], param_name: str, tied: list[tuple[nn.Module, str]] | None = None
    ) -> None:
        super().__init__()
        if not sites:
            raise DeltatuneError(f"no module holds {param_name!r}")
        self._sites = sites  # a plain list: the base modules must not become our submodules
        # modules that share the base tensor but do not get the delta (LoRA on a tied embedding, as in PEFT)
        self._tied = tied or []
        self._untied_from: nn.Parameter | None = None
        self.param_name = param_name
        self._hooks: list = []

    @property
    def sites(self) -> list[tuple[nn.Module, str]]:
        """Every (module, attribute) the delta applies at (several for a tied tensor)."""
        return list(self._sites)

    def move_sites(self, replacements: dict[int, nn.Module]) -> None:
        """Point the (detached) delta at new modules: ``replacements`` maps id(old module) to its replacement
        (a base layer swapped for another of the same function, e.g. an int8 layer under a low-rank delta)."""
        if self.attached:
            raise DeltatuneError("detach the delta before moving it to other modules")
        self._sites = [(replacements.get(id(m), m), attr) for m, attr in self._sites]

    @property
    def base(self) -> torch.Tensor:
        module, attr = self._sites[0]
        if parametrize.is_parametrized(module, attr):
            return module.parametrizations[attr].original
        return getattr(module, attr)

    def base_tensors(self) -> dict[str, torch.Tensor]:
        if self.quantized:  # packed storage: its bytes with the scales that give them values
            return {"": quantized.identity(self._sites[0][0])}
        return {"": self.base}

    # -- the base tensor as values (a quantized base stores a weight packed: deltatune.core.quantized) ------
    @property
    def quantized(self) -> bool:
        """Whether the base tensor is a quantized layer's weight (packed storage, not a matrix)."""
        module, attr = self._sites[0]
        return attr == "weight" and quantized.is_quantized(module)

    @property
    def base_shape(self) -> torch.Size:
        """The shape of W0 as values: a quantized weight's (out, in), else the base tensor's own."""
        module, attr = self._sites[0]
        return quantized.weight_shape(module, attr, self.base)

    @property
    def base_dtype(self) -> torch.dtype:
        """The dtype W0's values come in: a quantized layer's compute dtype, else the base tensor's."""
        return quantized.compute_dtype(self._sites[0][0]) if self.quantized else self.base.dtype

    def dense_base(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W0 as values in ``dtype`` (default ``base_dtype``), detached. For a quantized weight the
        dequantized matrix, a fresh m·n tensor each call: use it and drop it (nothing of that size is kept
        between calls); otherwise the base tensor itself (a copy only when the dtype differs)."""
        if self.quantized:
            return quantized.dequantize(self._sites[0][0], dtype)
        base = self.base.detach()
        return base if dtype is None else base.to(dtype)

    def added_to(self, weight: torch.Tensor) -> torch.Tensor:
        """W0 + ΔW as the parametrisation computes it in every forward; a form whose ΔW touches few entries
        overrides it to add them without a dense ΔW the size of W0."""
        return weight + self.delta_weight().to(weight.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW in the layout of the base tensor."""
        raise NotImplementedError

    def output_delta(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """The delta's contribution to ``module(x)``; None when the form has no output path here."""
        return None

    def uses_output_path(self) -> bool:
        """Whether the delta acts through a forward hook computed from the module's input (not a parametrisation)."""
        module, attr = self._sites[0]
        return len(self._sites) == 1 and attr == "weight" and type(self).output_delta is not WeightDelta.output_delta

    def attach(self) -> None:
        if self.attached:
            return
        if self.uses_output_path():
            module = self._sites[0][0]
            self._hooks.append(module.register_forward_hook(self._hook))
        else:
            if self.quantized:  # W0 + ΔW cannot be handed to a layer that computes from packed storage
                raise DeltatuneError(
                    f"a {self.kind} delta cannot act on the quantized weight {self.param_name} of a "
                    f"{type(self._sites[0][0]).__name__}: target layers that are not quantized, or load the "
                    "base without quantize"
                )
            adder = _AddDelta(self)
            for module, attr in self._sites:
                parametrize.register_parametrization(module, attr, adder, unsafe=True)
        self.attached = True

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        delta = self.output_delta(module, args[0])
        # add at the higher precision, then round once (as PEFT does for fp32 factors on a bf16 base)
        return output if delta is None else (output + delta).to(output.dtype)

    def detach(self) -> None:
        if not self.attached:
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for module, attr in self._sites:
            if parametrize.is_parametrized(module, attr):
                self._remove_own_parametrization(module, attr)
        self.attached = False

    def _remove_own_parametrization(self, module: nn.Module, attr: str) -> None:
        plist = module.parametrizations[attr]
        others = [p for p in plist if not (isinstance(p, _AddDelta) and p.form is self)]
        original = plist.original
        parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        # several deltas on one tensor (a sum form): put back the ones that are not ours
        for p in others:
            parametrize.register_parametrization(module, attr, p, unsafe=True)
        assert self.base is original

    @property
    def unties_on_merge(self) -> bool:
        return bool(self._tied)

    def merge(self) -> None:
        if self.merged:
            raise DeltatuneError("this delta is already merged; unmerge it before merging again")
        refuse_quantized_merge(self)
        self.detach()
        with torch.no_grad():
            base = self.base
            # compute in fp32 so half-precision weights lose no more than one rounding
            merged = (base.float() + self.delta_weight().float()).to(base.dtype)
            if self._tied:
                # the delta applies here only: give these modules their own merged copy, keep the tie partners on W0
                self._untied_from = base
                new = nn.Parameter(merged, requires_grad=base.requires_grad)
                for module, attr in self._sites:
                    setattr(module, attr, new)
            else:
                base.copy_(merged)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            raise DeltatuneError("this delta is not merged; there is nothing to unmerge")
        if self._untied_from is not None:
            for module, attr in self._sites:
                setattr(module, attr, self._untied_from)  # exact: the shared W0 was never written
            self._untied_from = None
        else:
            with torch.no_grad():
                base = self.base
                base.copy_((base.float() - self.delta_weight().float()).to(base.dtype))
        self.merged = False
        self.attach()
