"""``quantize_base``: quantize a base model under an *unmerged* low-rank delta (QLoRA-style serving).

The layers are bitsandbytes' (``deltatune.core.quantized``): int8 is LLM.int8() (``Linear8bitLt``), nf4 /
fp4 QLoRA's 4-bit blocks (``Linear4bit``), the same layers ``deltatune.data.models.load(name,
quantize=...)`` gives. This operation swaps the layers under an attached delta and moves its forms onto
them; to *train* on a quantized base, load it quantized instead. ``quantize_model`` (a plain model) and
``tuned.merge(quantize=...)`` (merge first, then quantize) use the same layers.
"""

from __future__ import annotations

import torch.nn as nn

from deltatune.core import quantized
from deltatune.core.forms.lowrank import LowRank
from deltatune.core.tuned import Tuned
from deltatune.errors import DeltatuneError

__all__ = ["quantize_base", "quantize_model"]


def __getattr__(name: str) -> type:
    """``Int8Linear``: the int8 layer, now bitsandbytes' ``Linear8bitLt`` (the hand-written one it replaced
    had this name; scripts/quantized_merge.py counts layers with it). Looked up lazily: bitsandbytes loads
    on first use."""
    if name == "Int8Linear":
        import bitsandbytes

        return bitsandbytes.nn.Linear8bitLt
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def quantize_model(model: nn.Module, scheme: str = "int8", *, double_quant: bool = True) -> nn.Module:
    """Replace every Linear / GPT-2 Conv1D of a plain ``model`` but the output head (and tied weights) by a
    bitsandbytes layer of ``scheme``, in place, and return the model. A model with a delta attached: use
    ``quantize_base`` (unmerged) or ``tuned.merge(quantize=...)``."""
    quantized.check_scheme(scheme)
    if isinstance(model, Tuned):
        raise DeltatuneError(f"quantize_model takes a plain model: tuned.merge(quantize={scheme!r}) merges "
                             "first, quantize_base(tuned) keeps the delta unmerged")
    return quantized.quantize_model(model, scheme, double_quant=double_quant)


def quantize_base(target: nn.Module | Tuned, scheme: str = "int8", *,
                  double_quant: bool = True) -> nn.Module | Tuned:
    """Quantize the base model's Linear / GPT-2 Conv1D weights and keep a ``Tuned``'s delta unmerged on top,
    in its own precision (a plain model is just quantized). The delta must act from the layer input
    (low-rank forms); one that needs the fp base weight (dense, sparse, DoRA) is refused: merge it instead.
    The Tuned can still save its delta (with the fp base's fingerprint), but no longer merge it."""
    if not isinstance(target, Tuned):
        return quantize_model(target, scheme, double_quant=double_quant)
    quantized.check_scheme(scheme)
    tuned = target
    if tuned.merged:
        raise DeltatuneError(f"the delta is merged: quantize_base keeps it unmerged; unmerge() first, or use "
                             f"tuned.merge(quantize={scheme!r})")
    tuned.fingerprint()  # of the fp base, kept for save()
    layers = dict(quantized.quantizable(tuned.model))
    forms_at = _forms_at(tuned, layers, scheme)
    was_attached = tuned.attached
    moved = [form for forms in forms_at.values() for form in forms]
    for form in moved:
        form.detach()
    for name, m in layers.items():
        w = m.weight if isinstance(m, nn.Linear) else m.weight.T  # GPT-2's Conv1D holds (in, out)
        new = quantized.quantize_linear(w, m.bias, scheme, double_quant=double_quant, dtype=m.weight.dtype)
        quantized.replace_module(tuned.model, name, new)
        for form in forms_at.get(name, []):
            # the form's output path reads only the layer input: it acts on the quantized layer as it did on
            # W0
            form.move_sites({id(m): new})
    if was_attached:
        for form in moved:
            form.attach()
    tuned.mark_quantized()
    return tuned


def _forms_at(tuned: Tuned, layers: dict[str, nn.Module], scheme: str) -> dict[str, list[LowRank]]:
    """The low-rank forms on each layer that ``quantize_base`` replaces; a form that needs the fp weight is
    refused before anything changes."""
    by_module = {id(m): n for n, m in layers.items()}
    forms_at: dict[str, list[LowRank]] = {}
    for fname, form in tuned.forms().items():
        on = [by_module[id(m)] for m, _ in getattr(form, "sites", []) if id(m) in by_module]
        if not on:
            continue
        plain = isinstance(form, LowRank) and type(form).output_delta is LowRank.output_delta
        if not (plain and form.uses_output_path()):
            raise DeltatuneError(
                f"{fname}: its {form.kind} delta needs the full-precision weight of {on[0]}, so it cannot "
                f"stay unmerged on a quantized base; merge it instead: tuned.merge(quantize={scheme!r})"
            )
        forms_at.setdefault(on[0], []).append(form)
    return forms_at
