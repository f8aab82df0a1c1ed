"""A fresh classification head: weights the loader initialised at random because the checkpoint lacked them (an
encoder loaded for sequence classification, a causal LM with ``data.head: true``).

Such a head has learnt nothing, so a delta that leaves it frozen trains a body whose logits a random projection
reads: the run reports near-chance accuracy and nothing says why. PEFT avoids it by adding the ``classifier`` /
``score`` module to ``modules_to_save`` for ``task_type="SEQ_CLS"``; deltatune does the same for every method,
whatever its form and policy:

- the loader (``deltatune.data.models.load``) marks the model with the names of the head parameters it made
  fresh (``mark``); a model loaded any other way carries no mark and nothing is added;
- building a delta for training (``Delta.build(loading=False)``) trains each marked parameter fully, in place (the
  model's own tensor, as full fine-tuning trains it: one copy, and a zeroth-order method perturbs the real weight),
  unless one of the method's own forms already changes it (full fine-tuning, LISA's and HFT's head, LT-SFT's head,
  a user's ``modules_to_save``: never two forms on one tensor) or the method reads its logits from a head of its
  own (the ``new_head`` trait: the model's head is not used at all);
- the names that trained are recorded in the artifact (``deltatune.json``'s ``fresh_head``), and loading builds a
  dense delta on exactly those (``Delta.build(loading=True)``): the artifact stores Δ = W − W0 either way, and the
  decision is read back, never derived again from a model whose head is random.

The head's forms come first in the delta, so a policy that grows the delta (IncreLoRA's chunks) still adds its
tensors at the end of the parameter order its optimizer and checkpoints rely on.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.nn as nn

from deltatune.core.forms.base import Form, WeightDelta
from deltatune.core.forms.dense import Dense
from deltatune.core.forms.inplace import InPlace
from deltatune.core.targeting import sites_of
from deltatune.errors import DeltatuneError

log = logging.getLogger(__name__)

# the attribute on a model that lists its fresh head parameters: a plain attribute (not a buffer or submodule), so it
# follows the model object (deepcopy, .to(device)) and never reaches a state dict or a saved folder
_MARK = "_deltatune_fresh_head"


def mark(model: nn.Module, names: list[str]) -> None:
    """Record that the parameters ``names`` of ``model`` were initialised at random by its loader."""
    if names:
        model.__dict__[_MARK] = tuple(names)
    else:
        model.__dict__.pop(_MARK, None)


def marked(model: nn.Module) -> list[str]:
    """The fresh head parameters ``mark`` recorded on ``model`` (those it still has), in model order."""
    names = set(model.__dict__.get(_MARK, ()))
    return [n for n, _ in model.named_parameters() if n in names]


def recorded(meta: dict[str, Any]) -> list[str]:
    """The fresh head parameters an artifact's ``deltatune.json`` says trained fully ([] for none, or an artifact
    from before the record existed)."""
    value = meta.get("fresh_head") or []
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise DeltatuneError(f"the artifact's fresh_head must be a list of parameter names, not {value!r}: "
                             "deltatune.json is damaged")
    return list(value)


def _changed_by(forms: dict[str, Form]) -> set[int]:
    """ids of the base tensors that some weight-side form of ``forms`` changes."""
    return {id(f.base) for f in forms.values() if isinstance(f, WeightDelta)}


def forms_for(model: nn.Module, forms: dict[str, Form], method: str, *, own_head: bool, loading: bool,
              names: list[str]) -> tuple[dict[str, Form], list[str]]:
    """The forms that train the fresh head next to a method's ``forms`` built on ``model``, and the parameter names
    they cover (what the artifact records).

    Training (``loading=False``): the parameters ``mark`` recorded on ``model`` that no form of the method changes,
    each trained in place; none when the method has a head of its own (``own_head``). Loading: exactly ``names``
    (the artifact's record) that ``model`` has, each as a dense delta (the artifact format of an in-place one)."""
    params = dict(model.named_parameters())
    changed = _changed_by(forms)
    if loading:
        # a name the model lacks is left out: the caller's base check names the model class it needs
        chosen = [n for n in names if n in params]
        clash = [n for n in chosen if id(params[n]) in changed]
        if clash:
            raise DeltatuneError(f"the artifact trains {clash[0]} both with its {method!r} delta and as a fresh head: "
                                 "deltatune.json is damaged")
    else:
        fresh = marked(model)
        if fresh and own_head:
            log.debug("%s reads its logits from a head of its own: the model's fresh head (%s) stays unused", method,
                      ", ".join(fresh))
            return {}, []
        chosen = [n for n in fresh if id(params[n]) not in changed]
    out: dict[str, Form] = {}
    seen: set[int] = set()
    for name in chosen:
        p = params[name]
        if id(p) in seen:  # a tied tensor: one form, applied at every module holding it
            continue
        seen.add(id(p))
        if loading:
            out[name] = Dense(sites_of(model, p), name)
        else:
            form = InPlace(sites_of(model, p), name)
            form.weight.requires_grad_(True)
            out[name] = form
    if out and not loading:
        _say(model, method, list(out), [n for n in marked(model) if n not in out])
    return out, list(out)


def _say(model: nn.Module, method: str, trained: list[str], own: list[str]) -> None:
    """One line at info level: which fresh head trains fully, how large it is, and with which method."""
    params = dict(model.named_parameters())
    count = sum(params[n].numel() for n in trained)
    modules = ", ".join(dict.fromkeys(n.rpartition(".")[0] or n for n in trained))
    size = f"{count:,} parameters"
    if own:  # the method's own forms change the rest of the head
        size = f"{size}; {method} trains {', '.join(own)} itself"
    log.info("the fresh %s head (%s) trains fully with %s: it was initialised at random (not in the checkpoint), so "
             "it trains next to the method's own delta", modules, size, method)
