"""Composition: several deltas on one base model at once, θ = θ0 + φ_a + φ_b + ..., each removable again.

Words, as the package uses them:

- *compose*: apply several deltas at once, each kept apart so that ``revert`` removes one exactly
  (``dt.compose`` -> ``Composition``);
- *merge* (``Composition.merge``, ``Tuned.merge``, ``deltatune merge``): fold what is applied into the base
  weights, giving a plain model; ``unmerge`` takes it out again;
- *merge deltas* (``dt.merge_deltas``, ``deltatune merge-deltas``, ``deltatune.ops.merging``): combine several
  deltas into one new delta (task arithmetic, TIES, DARE);
- ``save_composed`` / ``save_reverted`` (the ``deltatune compose`` / ``deltatune revert`` verbs): compose, merge
  and write the plain model as a ``save_pretrained`` folder, with a record of its parts.

This is LT-SFT's cross-lingual recipe (a task delta plus a language delta, trained separately) and
works for every weight-side form::

    both = dt.compose(model, ["runs/task-sft", "runs/lang-sft"])
    both(**batch)                      # forwards like the model
    both.revert("lang-sft")            # θ0 + φ_task again, exactly as dt.compose(model, ["runs/task-sft"])
    plain = both.merge(); both.unmerge()

``compose`` returns a ``Composition`` (a small ``nn.Module``, not a ``Tuned``: it has several methods
and configs, so it is not saved as one artifact). Each part is an artifact path or a ``Tuned``; it is
checked against the base model's fingerprint as ``dt.load`` does and kept as its own (frozen) forms.

How the parts reach the forward pass: sparse deltas of one base tensor become ONE sparse form whose
support is the union and whose values are the sum (a sparse form replaces its module's forward, so
two could not be stacked); low-rank and dense forms are attached side by side (forward hooks and
chained parametrisations). Every change (a revert) takes everything off and puts the remaining parts
on again the same way, so reverting gives exactly the composition of the remaining parts, and
reverting all leaves the model as it was. The base weights are never written, except by ``merge``;
``unmerge`` puts back bit for bit what merge overwrote.
"""

from __future__ import annotations

import json
import os
import types
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from deltatune.core import artifact
from deltatune.core.delta import Delta
from deltatune.core.forms.base import WeightDelta
from deltatune.core.forms.dense import Dense
from deltatune.core.forms.sparse import Sparse, sparse_sum
from deltatune.core.tuned import (
    DeltaSource,
    ModelWrapper,
    Tuned,
    carried_taken_off,
    carry,
    delta_of,
    refuse_another_carried,
)
from deltatune.errors import DeltatuneError

COMPOSITION_FILE = "deltatune-composition.json"  # in a folder save_composed wrote: its base and parts


class SummedSparse(Sparse):
    """The sum of every part's sparse delta on one base tensor. Where a dense delta of another part is a
    parametrisation of the same tensor, this one must be too (a patched forward would read W0 and skip it)."""

    def __init__(self, like: Sparse, indices: torch.Tensor, values: torch.Tensor, parametrize_only: bool) -> None:
        super().__init__(like.sites, like.param_name, indices=indices, dtype=values.dtype)
        self.set_support(indices, values)
        self.values.requires_grad_(False)
        self.parametrize_only = parametrize_only

    def _functional(self) -> bool:
        return not self.parametrize_only and super()._functional()


def _site_keys(form: WeightDelta) -> set[tuple[int, str]]:
    return {(id(m), a) for m, a in form.sites}


def _uses_parametrization(form: WeightDelta) -> bool:
    # the rule WeightDelta.attach applies: a form without an output path here is a parametrisation
    return not form.uses_output_path()


class Composition(ModelWrapper):
    """A base model with several deltas applied at once (see the module docstring).

    Attributes the composition does not have fall through to the model (``generate``, ``config``)."""

    method = types.SimpleNamespace(name="compose")  # how dt.attach names a composition it takes off the model

    def __init__(self, model: nn.Module, parts: list[Delta]) -> None:
        super().__init__()
        self.model = model
        self._parts = parts
        # the parts' tensors live here, so .to(device) moves them with the model
        self.part_forms = nn.ModuleDict({_key(p.name): nn.ModuleDict({_key(n): f for n, f in p.forms.items()})
                                         for p in parts})
        self.summed = nn.ModuleDict()
        self._applied: list[WeightDelta] = []
        self.on = True  # False between detach() and reattach()
        self.merged = False
        self._snapshots: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._was_tied: bool | None = None
        self._apply()
        carry(self.model, self, True)  # a later dt.attach takes the composition off first

    # -- what is composed --------------------------------------------------------------------------
    @property
    def parts(self) -> list[str]:
        """The names of the composed deltas, in order (artifact folder names, or the method of a Tuned)."""
        return [p.name for p in self._parts]

    def applied_forms(self) -> list[WeightDelta]:
        """The forms acting on the model now (the parts' dense / low-rank forms and the summed sparse ones)."""
        return list(self._applied)

    @property
    def attached(self) -> bool:
        return any(f.attached for f in self._applied)

    # -- applying ----------------------------------------------------------------------------------
    def _take_off(self) -> None:
        for form in self._applied:
            form.detach()
        self._applied = []
        self.summed = nn.ModuleDict()

    def _apply(self) -> None:
        """Put every part on: non-sparse forms side by side in part order, then one summed sparse form per
        base tensor (tensors a parametrisation holds first: see the note in lt_sft on GPT-2's Conv1D)."""
        self._take_off()
        others: list[WeightDelta] = []
        sparse: dict[int, list[Sparse]] = {}
        for part in self._parts:
            for form in part.forms.values():
                if isinstance(form, Sparse):
                    if form.k:
                        sparse.setdefault(id(form.base), []).append(form)
                elif not (isinstance(form, Dense) and not bool(form.delta.detach().any())):  # an all-zero dense: skip
                    others.append(form)
        parametrized = {id(f.base) for f in others if _uses_parametrization(f)}
        for form in others:
            form.attach()
            self._applied.append(form)
        summed = [self._summed(group, key in parametrized) for key, group in sparse.items()]
        summed.sort(key=lambda f: f.sites[0][1] == "weight")
        for form in summed:
            form.attach()
            self.summed[str(len(self.summed))] = form
            self._applied.append(form)

    @staticmethod
    def _summed(group: list[Sparse], parametrize_only: bool) -> SummedSparse:
        first = group[0]
        idx, val = first.entries()
        for other in group[1:]:
            if _site_keys(other) != _site_keys(first):
                raise DeltatuneError(
                    f"two sparse deltas of {first.param_name} apply at different modules (a tied weight once tied, "
                    "once not): compose cannot add them; merge one of them into the model first"
                )
            idx, val = sparse_sum(idx, val, *other.entries())
        return SummedSparse(first, idx, val, parametrize_only)

    # -- revert ------------------------------------------------------------------------------------
    def _index(self, which: int | str) -> int:
        names = self.parts
        if isinstance(which, bool) or not isinstance(which, int | str):
            raise DeltatuneError(f"revert takes a part's position or name, not {which!r}; parts: {names}")
        if isinstance(which, int):
            if not -len(names) <= which < len(names):
                raise DeltatuneError(f"there is no part {which}: the composition has {len(names)} ({names})")
            return which % len(names)
        if which not in names:
            raise DeltatuneError(f"no composed delta is named {which!r}; parts: {names}")
        return names.index(which)

    def revert(self, which: int | str) -> Composition:
        """Remove one delta (by position in ``parts`` or by name): the model then computes exactly what the
        composition of the remaining parts computes; with none left, it is the base model again."""
        if self.merged:
            raise DeltatuneError("the composition is merged into the weights: unmerge() before reverting a part")
        part = self._parts.pop(self._index(which))
        del self.part_forms[_key(part.name)]
        if self.on:
            self._apply()
        return self

    def detach(self) -> nn.Module:
        """Take every part off and return the untouched base model (``reattach`` puts them back on)."""
        if self.merged:
            raise DeltatuneError("the composition is merged into the weights: unmerge() before detaching it")
        self._take_off()
        self.on = False
        carry(self.model, self, False)
        return self.model

    def reattach(self) -> Composition:
        """Put the parts that ``detach`` took off back on the model."""
        if self.merged:
            raise DeltatuneError("the composition is merged into the weights: there is nothing to put back on")
        refuse_another_carried(self.model, self)
        self._apply()
        self.on = True
        carry(self.model, self, True)
        return self

    # -- merge -------------------------------------------------------------------------------------
    def merge(self) -> nn.Module:
        """Fold the current sum into the base weights and return the plain model."""
        if self.merged:
            raise DeltatuneError("the composition is already merged; call unmerge() first")
        # merge / unmerge of a dense or low-rank delta is a float add / subtract: keep what it overwrites
        seen: set[int] = set()
        self._snapshots = []
        for form in self._applied:
            if not isinstance(form, Sparse) and id(form.base) not in seen:
                seen.add(id(form.base))
                self._snapshots.append((form.base, form.base.detach().clone()))
        for form in self._applied:
            form.merge()
        cfg = getattr(self.model, "config", None)
        if cfg is not None and any(getattr(f, "unties_on_merge", False) for f in self._applied):
            self._was_tied = getattr(cfg, "tie_word_embeddings", None)
            cfg.tie_word_embeddings = False  # a merged tied-embedding delta gave the embedding its own copy
        self.merged = True
        return self.model

    def unmerge(self) -> Composition:
        """Restore the base weights bit for bit and put the deltas back on as before the merge."""
        if not self.merged:
            raise DeltatuneError("the composition is not merged; there is nothing to unmerge")
        for form in reversed(self._applied):
            form.unmerge()
            form.detach()
        with torch.no_grad():
            for base, saved in self._snapshots:
                base.copy_(saved)
        self._snapshots = []
        for form in self._applied:  # the same order as _apply: the same computation as before the merge
            form.attach()
        cfg = getattr(self.model, "config", None)
        if self._was_tied is not None and cfg is not None:
            cfg.tie_word_embeddings = self._was_tied
            self._was_tied = None
        self.merged = False
        return self

    def extra_repr(self) -> str:
        return f"parts={self.parts}, merged={self.merged}"


def _key(name: str) -> str:
    return name.replace(".", ":")  # ModuleDict keys may not contain dots


# -- building the parts --------------------------------------------------------------------------
def _part(model: nn.Module, item: DeltaSource, shapes: str) -> Delta:
    part = delta_of(item).build(model, shapes=shapes, load=False,
                                fix="Compose deltas of the model they were made for (see `deltatune inspect`).")
    for fname, form in part.forms.items():
        if not isinstance(form, WeightDelta) or not form.mergeable:
            raise DeltatuneError(
                f"{part.name}: its {form.kind} delta at {fname} changes activations, not weights; compose adds weight "
                "deltas only. Serve it on its own with dt.load"
            )
    part.load_tensors()
    for form in part.forms.values():
        form.requires_grad_(False)
    return part


def _unique(parts: list[Delta]) -> None:
    seen: dict[str, int] = {}
    for part in parts:
        n = seen.get(part.name, 0)
        seen[part.name] = n + 1
        if n:
            part.name = f"{part.name}#{n + 1}"


def compose(model: nn.Module, deltas: Sequence[DeltaSource]) -> Composition:
    """Apply all ``deltas`` (artifact paths or ``Tuned`` models) to ``model`` at once: θ = θ0 + Σ φ.

    Each delta must have been trained on this base model (checked as ``dt.load`` checks). A ``Tuned`` whose
    delta is attached to ``model`` itself is taken off it first (its delta then acts through the composition);
    when a delta is refused, the model keeps the delta it carried."""
    if isinstance(model, Tuned | Composition):
        raise DeltatuneError("compose onto the base model (tuned.detach() returns it), not onto a tuned model")
    if isinstance(deltas, str | os.PathLike | Tuned) or not deltas:
        raise DeltatuneError("compose takes a list of deltas: dt.compose(model, ['runs/a', 'runs/b'])")
    with carried_taken_off(model) as previous:
        shapes = artifact.shapes_hash(model)  # before any part is on: parametrisations rename tensors
        # every part is built before any is attached: the builders find their tensors by the model's names
        parts = [_part(model, item, shapes) for item in deltas]
    if previous is not None and not any(item is previous for item in deltas):
        # a Tuned composed here comes back through the composition, not twice; anything else is replaced
        warnings.warn(f"the model carries an attached {previous.method.name!r} delta; detaching it before composing",
                      stacklevel=2)
    _unique(parts)
    return Composition(model, parts)


def revert(composition: Composition, which: int | str) -> Composition:
    """``composition.revert(which)``: remove one composed delta again, exactly."""
    if not isinstance(composition, Composition):
        raise DeltatuneError(f"revert takes what dt.compose returned, not a {type(composition).__name__}")
    return composition.revert(which)


# -- a composition written as a plain model (deltatune compose / deltatune revert) --------------------------
def save_composed(deltas: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                  base: str | nn.Module | None = None, overwrite: bool = False) -> Path:
    """Compose every delta on the base (θ0 + Σ φ_i), merge, and write a ``save_pretrained`` folder at ``out``
    with a record of the parts (the several-delta version of ``deltatune merge``). ``out`` is new, empty or a
    saved model; ``overwrite`` replaces any other folder."""
    if isinstance(deltas, str | os.PathLike) or not deltas:
        raise DeltatuneError("compose takes a list of artifacts: deltatune compose A B ... --out OUT")
    fingerprint = artifact.read_meta(deltas[0]).get("fingerprint", {})
    name = base or fingerprint.get("name_or_path")
    if not name:
        raise DeltatuneError(f"{deltas[0]} does not say which base model it belongs to: pass base=...")
    with artifact.destination(out, "model", inputs=[*deltas, name], overwrite=overwrite) as dest:
        _write_composed(deltas, name, dest, fingerprint.get("head"))
    return Path(out)


def _write_composed(deltas: Sequence[str | os.PathLike], name: str | nn.Module, dest: artifact.Destination,
                    head: dict | None = None) -> None:
    """``head``: the model class the artifacts record (a classification head the bare base name does not give)."""
    from deltatune.data import models

    model = models.load_base(name, head)
    plain = compose(model, list(deltas)).merge()
    if not hasattr(plain, "save_pretrained"):
        raise DeltatuneError(f"{type(plain).__name__} has no save_pretrained; compose in Python and save it yourself")

    record = {"base": str(name) if not isinstance(name, nn.Module) else None,
              "parts": [str(Path(d).resolve()) for d in deltas], "head": head}

    def fill(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        models.copy_tokenizer(name, tmp)
        # what was composed, so that save_reverted can rebuild the model without one part exactly (from θ0)
        (tmp / COMPOSITION_FILE).write_text(json.dumps(record, indent=2) + "\n")

    dest.write(fill)


def save_reverted(composed: str | os.PathLike, part: str | os.PathLike, out: str | os.PathLike, *,
                  overwrite: bool = False) -> Path:
    """The model ``save_composed`` wrote at ``composed`` without ``part`` (a path or a folder name from its
    parts), rebuilt from the base: θ0 + the sum of the remaining parts, exactly as composing them alone.
    Subtracting from the merged weights would not be exact in floating point; the record of what was
    composed makes it so."""
    record_path = Path(composed) / COMPOSITION_FILE
    if not record_path.is_file():
        raise DeltatuneError(f"{composed} has no {COMPOSITION_FILE}: revert works on a model written by "
                             "`deltatune compose` (which records its base and parts)")
    record = json.loads(record_path.read_text())
    parts = list(record["parts"])
    chosen = [p for p in parts if p == str(Path(part).resolve()) or Path(p).name == str(part)]
    if len(chosen) != 1:
        raise DeltatuneError(f"{part!r} is not one of the composed parts {[Path(p).name for p in parts]}; "
                             "name it by its folder name or path")
    remaining = [p for p in parts if p != chosen[0]]
    if record.get("base") is None:
        raise DeltatuneError(f"{composed} was composed on an in-memory base model; revert it in Python")
    with artifact.destination(out, "model", inputs=[composed, *parts, record["base"]], overwrite=overwrite) as dest:
        if remaining:
            _write_composed(remaining, record["base"], dest, record.get("head"))
        else:
            _write_base(record["base"], dest, record.get("head"))
    return Path(out)


def _write_base(name: str, dest: artifact.Destination, head: dict | None = None) -> None:
    from deltatune.data import models

    model = models.load_base(name, head)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        models.copy_tokenizer(name, tmp)

    dest.write(fill)
