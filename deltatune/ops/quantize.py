"""``quantize_base``: quantise a base model to int8 under an *unmerged* low-rank delta (QLoRA-style serving).

The int8 layer itself (``Int8Linear``, ``quantize_model``, used by ``tuned.merge(quantize="int8")``) lives in
``deltatune/core/int8.py``; this operation swaps the layers under an attached delta and moves its forms onto them.
"""

from __future__ import annotations

import torch.nn as nn

from deltatune.core.forms.lowrank import LowRank
from deltatune.core.int8 import Int8Linear, check_scheme, quantizable, quantize_model, replace_module
from deltatune.core.tuned import Tuned
from deltatune.errors import DeltatuneError

__all__ = ["Int8Linear", "quantize_base", "quantize_model"]


def quantize_base(target: nn.Module | Tuned, scheme: str = "int8", *, include_head: bool = False) -> nn.Module | Tuned:
    """Quantise the base model's Linear / GPT-2 Conv1D weights to int8 and keep a ``Tuned``'s delta unmerged on
    top, in its own precision (a plain model is just quantised). The delta must act from the layer input
    (low-rank forms); one that needs the fp base weight (dense, sparse, DoRA) is refused: merge it instead.
    The Tuned can still save its delta, but no longer merge it."""
    if not isinstance(target, Tuned):
        return quantize_model(target, scheme, include_head=include_head)
    check_scheme(scheme)
    tuned = target
    if tuned.merged:
        raise DeltatuneError("the delta is merged: quantize_base keeps it unmerged; unmerge() first, or use "
                             "tuned.merge(quantize='int8')")
    tuned.fingerprint()  # of the fp base, kept for save()
    layers = dict(quantizable(tuned.model, include_head))
    by_module = {id(m): n for n, m in layers.items()}
    forms_at: dict[str, list[LowRank]] = {}
    for fname, form in tuned.forms().items():
        sites = getattr(form, "sites", [])
        on = [by_module[id(m)] for m, _ in sites if id(m) in by_module]
        if not on:
            continue
        plain = isinstance(form, LowRank) and type(form).output_delta is LowRank.output_delta
        if not (plain and form.uses_output_path()):
            raise DeltatuneError(
                f"{fname}: its {form.kind} delta needs the full-precision weight of {on[0]}, so it cannot stay "
                "unmerged on an int8 base; merge it instead: tuned.merge(quantize='int8')"
            )
        forms_at.setdefault(on[0], []).append(form)
    was_attached = tuned.attached
    for forms in forms_at.values():
        for form in forms:
            form.detach()
    for name, m in layers.items():
        new = Int8Linear.from_module(m)
        replace_module(tuned.model, name, new)
        for form in forms_at.get(name, []):
            # the form's output path reads only the layer input: it acts on the int8 layer as it did on W0
            form.move_sites({id(m): new})
    if was_attached:
        for forms in forms_at.values():
            for form in forms:
                form.attach()
    tuned.mark_quantized()
    return tuned
