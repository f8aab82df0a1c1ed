"""``Delta``: one fine-tune apart from any model's forward pass.

A delta is a method with its config, the base model it belongs to (its fingerprint) and its tensors. Read from
an artifact (``Delta.read``) it holds the tensors as saved; built on a model (``build``) it holds its forms, not
attached, and its policy, and the tensors live in the forms. ``Tuned`` attaches one; composition, several named
deltas on one model, merging and compression build them without attaching anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from deltatune.core import artifact, fresh_head, quantized, registry, vocabulary
from deltatune.core.forms.base import Form
from deltatune.core.policy import Policy
from deltatune.errors import DeltatuneError
from deltatune.version import __version__

LOAD_FIX = "Load it onto the model it was made for (see `deltatune inspect`)."


class Delta:
    """One delta: method, config, the base it belongs to, and its tensors (read) or forms (built)."""

    def __init__(self, method: registry.Method, config: Any, *, name: str | None = None,
                 path: str | os.PathLike | None = None, tensors: dict[str, torch.Tensor] | None = None,
                 fingerprint: dict[str, Any] | None = None, record: dict[str, Any] | None = None) -> None:
        self.method = method
        self.config = config
        self.name = name or method.name  # an artifact's folder name, or the method
        self.path = path  # where it was read from (None: never saved)
        self.record = record or {}  # the artifact's deltatune.json as read
        self.forms: dict[str, Form] = {}
        self.policy: Policy = Policy()
        self.model: nn.Module | None = None  # the base model it is built on
        self.base_shapes: str | None = None  # hashed before anything was attached: parametrisations rename tensors
        self._unloaded = tensors  # read tensors not yet in forms
        # a known base (read, or copied from a built delta) is checked when the delta is built; once built, it is
        # the fingerprint of the model it is built on, computed at the first call and cached
        self._fingerprint = fingerprint
        # the chat template it was trained with when the run overrode the tokenizer's (data.chat_template):
        # generation must format prompts the same way
        self.chat_template: str | None = self.record.get("chat_template")
        # the parameters of a fresh classification head it trains fully next to the method's own forms
        # (``deltatune.core.fresh_head``): decided when it is built for training, read back from an artifact
        self.fresh_head: list[str] = fresh_head.recorded(self.record)
        # a vocabulary resized before training (``deltatune.core.vocabulary``): its sizes and the added rows
        self.vocabulary: dict[str, Any] | None = self.record.get("vocabulary")
        self.vocabulary_rows: dict[str, torch.Tensor] = {}
        if tensors is not None:
            self._unloaded, self.vocabulary_rows = vocabulary.split(tensors)

    # -- reading -------------------------------------------------------------------------------
    @classmethod
    def read(cls, path: str | os.PathLike) -> Delta:
        """The delta saved at ``path`` (checked: method, config, tensor file), built on no model yet."""
        meta = artifact.read_meta(path)
        method = registry.get(meta["method"])
        config = registry.make_config(method, meta["config"])
        tensors = artifact.read_tensors(path, meta)  # after the config: a bad config fails before a large read
        return cls(method, config, name=Path(path).name, path=path, tensors=tensors,
                   fingerprint=meta.get("fingerprint", {}), record=meta)

    def snapshot(self) -> Delta:
        """A copy apart from any model, named by its method: config, base fingerprint and a copy of the tensors."""
        config = registry.make_config(self.method, registry.config_to_dict(self.config))
        tensors = {k: v.detach().clone() for k, v in self.state_dict().items()}
        copy = Delta(self.method, config, tensors=tensors, fingerprint=self.fingerprint())
        copy.chat_template = self.chat_template
        copy.fresh_head = list(self.fresh_head)
        copy.vocabulary, copy.vocabulary_rows = self.vocabulary, dict(self.vocabulary_rows)
        return copy

    # -- building on a model ---------------------------------------------------------------------
    @property
    def built(self) -> bool:
        return self.model is not None

    def build(self, model: nn.Module, *, shapes: str | None = None, loading: bool = True, fix: str = LOAD_FIX,
              load: bool = True) -> Delta:
        """Build the forms on ``model`` without attaching them. A delta with a known base first checks that
        ``model`` is that base (``fix`` ends the message when it is not); ``load`` puts the read tensors into the
        forms. ``model`` must carry no attached delta (builders look tensors up by names a parametrisation
        changes); ``shapes``: its ``artifact.shapes_hash`` when the caller has it."""
        if self.built:
            raise DeltatuneError(f"the {self.name!r} delta is already built on a model")
        quantized.refuse_method(model, self.method, self.config)  # before the method touches the model
        if self.vocabulary is not None and loading:  # the resized base first: its shapes are the fingerprint's
            vocabulary.restore(model, self.vocabulary, self.vocabulary_rows, self.where)
            shapes = None
        elif not loading and (found := vocabulary.record(model)) is not None:
            self.vocabulary, self.vocabulary_rows = found
        shapes = shapes or artifact.shapes_hash(model)
        built = self.method.build(model, self.config, loading=loading)
        # a fresh classification head trains fully whatever the method (loading: the heads the artifact records)
        head, names = fresh_head.forms_for(model, built.forms, self.method.name, loading=loading, names=self.fresh_head,
                                           own_head=self.method.has("new_head", self.config))
        expected = self._fingerprint
        # the head first: a policy that grows the delta adds its tensors at the end of the parameter order
        self.forms, self.policy, self.model, self.base_shapes = {**head, **built.forms}, built.policy, model, shapes
        self._fingerprint = None
        if expected is not None:
            diffs = artifact.compare_fingerprints(expected, self.fingerprint())
            if diffs:
                self.forms, self.policy, self.model, self.base_shapes = {}, Policy(), None, None
                self._fingerprint = expected
                raise self._another_base(diffs, fix)
        missing = [n for n in self.fresh_head if n not in names] if loading else []
        if missing:
            self.forms, self.policy, self.model, self.base_shapes = {}, Policy(), None, None
            self._fingerprint = expected
            raise DeltatuneError(f"{self.where} trains the fresh head parameter(s) {', '.join(missing)} fully, but "
                                 f"this {type(model).__name__} has none such: load it onto the model class it was "
                                 "trained with (see `deltatune inspect`)")
        self.fresh_head = names
        if load:
            self.load_tensors()
        return self

    def check_fits(self, fingerprint: dict[str, Any], fix: str = LOAD_FIX) -> None:
        """Raise unless ``fingerprint`` (of a model) is the base this delta belongs to."""
        diffs = artifact.compare_fingerprints(self.fingerprint(), fingerprint)
        if diffs:
            raise self._another_base(diffs, fix)

    def _another_base(self, diffs: list[str], fix: str) -> DeltatuneError:
        return DeltatuneError(f"{self.where} was trained on another base model ({'; '.join(diffs)}). {fix}")

    @property
    def where(self) -> str:
        """How messages name this delta: its path, or its name."""
        return str(self.path) if self.path is not None else self.name

    def load_tensors(self) -> None:
        """Put the tensors read from the artifact into the built forms (the read copies are dropped)."""
        if self._unloaded is not None:
            self.load_state_dict(self._unloaded)
            self._unloaded = None

    def replace_forms(self, new: dict[str, Form], remove: list[str] | tuple[str, ...] = ()) -> list[Form]:
        """Change the structure (a policy switching phases): forms in ``remove`` and those ``new`` replaces leave,
        ``new`` ones join at the end. Returns the forms that left; attaching is the caller's business."""
        gone = [self.forms.pop(n) for n in [*remove, *new] if n in self.forms]
        self.forms.update(new)
        self._fingerprint = None  # the set of base tensors the delta depends on changed
        return gone

    # -- tensors -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Artifact tensors, keyed ``<form name>.<tensor name>``."""
        if not self.built:
            return dict(self._unloaded or {})
        return {f"{name}.{t}": v for name, form in self.forms.items() for t, v in form.stored_tensors().items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        by_form: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.forms}
        unexpected = []
        for key, value in tensors.items():
            owner = next((n for n in self.forms if key.startswith(n + ".") and key[len(n) + 1:]), None)
            if owner is None:
                unexpected.append(key)
            else:
                by_form[owner][key[len(owner) + 1:]] = value
        missing = [
            f"{name}.{t}"
            for name, form in self.forms.items()
            for t in form.stored_tensors_names()
            if t not in by_form[name] and t not in form.optional_tensors()
        ]
        if unexpected or missing:
            raise DeltatuneError(
                "the artifact does not fit this delta: "
                + (f"unexpected tensors {unexpected[:5]}; " if unexpected else "")
                + (f"missing tensors {missing[:5]}" if missing else "")
                + ". It was saved with another method config."
            )
        for name, form in self.forms.items():
            form.load_stored(by_form[name])

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())

    def num_trainable(self) -> int:
        if not self.built:
            return int(self.record.get("sizes", {}).get("trainable") or 0)
        params = {id(p): p for form in self.forms.values() for p in form.parameters() if p.requires_grad}
        return sum(p.numel() for p in params.values())

    # -- the base it belongs to ---------------------------------------------------------------
    def base_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, form in self.forms.items():
            out.update({f"{name}.{k}" if k else name: t for k, t in form.base_tensors().items()})
        return out

    def fingerprint(self) -> dict[str, Any]:
        """The base model's fingerprint: of the model it is built on (computed from the untouched base, before
        any merge, and cached), or the one it was saved with."""
        if self._fingerprint is None:
            if self.model is None or self.base_shapes is None:
                raise DeltatuneError(f"the {self.name!r} delta is built on no model: it has no base fingerprint")
            if any(form.merged for form in self.forms.values()):
                raise DeltatuneError("cannot fingerprint a merged model; unmerge first")
            self._fingerprint = artifact.fingerprint(self.model, self.base_tensors(), self.base_shapes)
        return self._fingerprint

    @property
    def head(self) -> dict[str, Any] | None:
        """The model class (and classification head: ``num_labels``, ``id2label``) the delta was made on, as
        ``artifact.head_record`` records it; None for an artifact saved before the record existed."""
        return self.fingerprint().get("head")

    # -- saving ------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """What ``deltatune.json`` says of it: method, config, base fingerprint, sizes."""
        meta = {
            "format": "deltatune",
            "format_version": artifact.FORMAT_VERSION,
            "deltatune_version": __version__,
            "method": self.method.name,
            "config": registry.config_to_dict(self.config),
            "fingerprint": self.fingerprint(),
            "sizes": {"trainable": self.num_trainable(), "stored_bytes": self.stored_bytes()},
        }
        if self.chat_template is not None:
            meta["chat_template"] = self.chat_template
        if self.fresh_head:
            meta["fresh_head"] = list(self.fresh_head)
        if self.vocabulary is not None:
            meta["vocabulary"] = dict(self.vocabulary)
        return meta

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write ``deltatune.json`` + ``delta.safetensors`` atomically (an interrupted save keeps the old one).
        A folder holding anything but an artifact is refused unless ``overwrite``."""
        artifact.write_artifact(path, self.describe(), vocabulary.joined(self.state_dict(), self.vocabulary_rows),
                                overwrite=overwrite)
