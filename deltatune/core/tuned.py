"""``Tuned``: a base model with a delta attached, and the ``attach`` / ``load`` entry points."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.nn as nn

from deltatune.core import artifact, int8, registry
from deltatune.core.forms.base import Form
from deltatune.core.policy import Policy
from deltatune.errors import DeltatuneError
from deltatune.version import __version__

# the model remembers the Tuned whose delta it carries, so a second attach can take the first one off
# even when the user dropped every reference to it (the hooks would otherwise live on unseen)
_CARRIED = "_deltatune_carried"


def _module_key(name: str) -> str:
    return name.replace(".", ":")  # ModuleDict keys may not contain dots


class ModelWrapper(nn.Module):
    """A module around ``self.model`` that forwards to it; attribute lookups it does not know fall
    through to the model, so ``wrapper.generate`` and ``wrapper.config`` work as on the model itself."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


class Tuned(ModelWrapper):
    """Wraps a model, forwards to it, and owns the delta (forms + policy) attached to it.

    Attribute lookups the wrapper does not know fall through to the model, so ``tuned.generate``
    and ``tuned.config`` work as on the model itself.
    """

    def __init__(
        self, model: nn.Module, method: registry.Method, config: Any, forms: dict[str, Form], policy: Policy, shapes: str
    ) -> None:
        super().__init__()
        self.model = model
        self.deltas = nn.ModuleDict({_module_key(k): f for k, f in forms.items()})
        self.delta_names = list(forms)
        self.method = method
        self.method_config = config
        self.policy = policy
        self.merged = False
        self._quantized = False  # the base was quantised under the delta (deltatune.ops.quantize)
        self._fingerprint: dict[str, Any] | None = None
        self._shapes = shapes  # hashed before attaching: hooks and parametrisations rename tensors

    # -- the delta ------------------------------------------------------------------------
    def forms(self) -> dict[str, Form]:
        return {name: self.deltas[_module_key(name)] for name in self.delta_names}

    def replace_forms(self, new: dict[str, Form], remove: list[str] | tuple[str, ...] = ()) -> None:
        """Change the delta's structure during training (a policy switching phases, e.g. dense -> sparse):
        forms in ``remove`` come off, forms in ``new`` go on (replacing one of the same name). Their
        tensors leave / join the delta; the training loops drop / add them in the optimizer."""
        if self.merged:
            raise DeltatuneError("cannot change the forms of a merged delta; unmerge first")
        for name in list(remove) + [n for n in new if n in self.delta_names]:
            if name in self.delta_names:
                self.deltas[_module_key(name)].detach()
                del self.deltas[_module_key(name)]
                self.delta_names.remove(name)
        for name, form in new.items():
            form.attach()
            self.deltas[_module_key(name)] = form
            self.delta_names.append(name)
        self._fingerprint = None  # the set of base tensors the delta depends on changed

    def trainable_parameters(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for p in self.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
        return list(seen.values())

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.delta_state_dict().values())

    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        """Artifact tensors, keyed ``<form name>.<tensor name>``."""
        out = {}
        for name, form in self.forms().items():
            for tname, t in form.stored_tensors().items():
                out[f"{name}.{tname}"] = t
        return out

    def load_delta_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        forms = self.forms()
        by_form: dict[str, dict[str, torch.Tensor]] = {name: {} for name in forms}
        unexpected = []
        for key, value in tensors.items():
            owner = next((n for n in forms if key.startswith(n + ".") and key[len(n) + 1:]), None)
            if owner is None:
                unexpected.append(key)
            else:
                by_form[owner][key[len(owner) + 1:]] = value
        missing = [
            f"{name}.{t}"
            for name, form in forms.items()
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
        for name, form in forms.items():
            form.load_stored(by_form[name])

    # -- identity of the base -------------------------------------------------------------
    def base_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, form in self.forms().items():
            out.update({f"{name}.{k}" if k else name: t for k, t in form.base_tensors().items()})
        return out

    def fingerprint(self) -> dict[str, Any]:
        """Computed from the untouched base (before any merge) and cached."""
        if self._fingerprint is None:
            if self.merged:
                raise DeltatuneError("cannot fingerprint a merged model; unmerge first")
            self._fingerprint = artifact.fingerprint(self.model, self.base_tensors(), self._shapes)
        return self._fingerprint

    # -- several deltas on one model (deltatune.core.tenants) ------------------------------------
    def add(self, name: str, delta: str | os.PathLike | Tuned) -> Tuned:
        """Load another delta (an artifact path or a Tuned of this base) onto the model under ``name``, kept
        off until ``use(name)`` or ``adapter_names``; this Tuned's own delta is named "default"."""
        from deltatune.core.tenants import tenants_of

        tenants_of(self).add(name, delta)
        return self

    def use(self, name: str | None) -> Tuned:
        """Serve delta ``name`` (None: the base model). save / merge / training then act on that delta."""
        from deltatune.core.tenants import tenants_of

        tenants_of(self).use(name)
        return self

    def forward(self, *args: Any, adapter_names: list[str | None] | None = None, **kwargs: Any) -> Any:
        """The model's forward; ``adapter_names`` (one delta name per row, "__base__" or None for the base)
        computes each row with its own delta (low-rank deltas: see deltatune.core.tenants)."""
        if adapter_names is None:
            return self.model(*args, **kwargs)
        from deltatune.core.tenants import tenants_of

        return tenants_of(self).mixed(adapter_names, self.model, *args, **kwargs)

    def generate(self, *args: Any, adapter_names: list[str | None] | None = None, **kwargs: Any) -> Any:
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        from deltatune.core.tenants import tenants_of

        return tenants_of(self).mixed(adapter_names, self.model.generate, *args, **kwargs)

    # -- merge ----------------------------------------------------------------------------
    def merge(self, quantize: str | None = None) -> nn.Module:
        """Fold the delta into the base weights and return the plain model (no hooks, no wrappers).

        The delta is kept, so ``unmerge`` can take it out again. ``quantize="int8"`` then makes every
        Linear / GPT-2 Conv1D weight int8 with per-output-channel scales (deltatune.ops.quantize); such a
        model cannot be unmerged."""
        if self.merged:
            raise DeltatuneError("the delta is already merged; call unmerge() first")
        if self._quantized:
            raise DeltatuneError("the base is quantised to int8 (quantize_base): the delta stays unmerged on it; to "
                                 "merge, dt.load the artifact onto the fp base and tuned.merge(quantize='int8')")
        if quantize is not None:
            int8.check_scheme(quantize)
        tenants = self._modules.get("tenants")
        if tenants is not None:
            tenants.check_in_use()  # type: ignore[operator]
        blockers = [n for n, f in self.forms().items() if not f.mergeable]
        if blockers:
            form = self.forms()[blockers[0]]
            raise DeltatuneError(
                f"method {self.method.name!r} cannot be merged into weights ({blockers[0]}: "
                f"{form.why_not_mergeable()}). Serve it attached: tuned(...) / tuned.generate(...), or save it "
                "with tuned.save() and dt.load() it onto the base model where it is served."
            )
        self.fingerprint()
        for form in self.forms().values():
            form.merge()
        self.merged = True
        self._carry(False)
        self._set_tying(untie=True)
        if quantize is not None:
            self._quantized = True
            return int8.quantize_model(self.model, quantize)
        return self.model

    def _set_tying(self, untie: bool) -> None:
        """A merge that gave a tied weight its own copy must say so in the config, or
        ``save_pretrained`` / ``from_pretrained`` would tie the merged weights back together."""
        cfg = getattr(self.model, "config", None)
        if cfg is None or not any(getattr(f, "unties_on_merge", False) for f in self.forms().values()):
            return
        if untie:
            self._was_tied = getattr(cfg, "tie_word_embeddings", None)
            cfg.tie_word_embeddings = False
        elif getattr(self, "_was_tied", None) is not None:
            cfg.tie_word_embeddings = self._was_tied

    def detach(self) -> nn.Module:
        """Take the (unmerged) delta off the model and return the untouched base model."""
        if self.merged:
            raise DeltatuneError("the delta is merged into the weights; unmerge() before detaching it")
        for form in self.forms().values():
            form.detach()
        self._carry(False)
        return self.model

    def _carry(self, on: bool) -> None:
        if on:
            self.model.__dict__[_CARRIED] = self  # a plain attribute: not registered as a submodule
        elif self.model.__dict__.get(_CARRIED) is self:
            del self.model.__dict__[_CARRIED]

    @property
    def attached(self) -> bool:
        return any(f.attached for f in self.forms().values())

    def unmerge(self) -> Tuned:
        if not self.merged:
            raise DeltatuneError("the delta is not merged; there is nothing to unmerge")
        if self._quantized:
            raise DeltatuneError("the merged model was quantised to int8, which cannot be undone exactly: "
                                 "load the base model again and dt.load the artifact onto it")
        for form in reversed(list(self.forms().values())):
            form.unmerge()
        self.merged = False
        self._carry(True)
        self._set_tying(untie=False)
        return self

    def mark_quantized(self) -> None:
        """The base under the (unmerged) delta was quantised (``deltatune.ops.quantize.quantize_base``): the delta
        can still be saved, no longer merged."""
        self._quantized = True

    # -- save -----------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        return {
            "format": "deltatune",
            "format_version": artifact.FORMAT_VERSION,
            "deltatune_version": __version__,
            "method": self.method.name,
            "config": registry.config_to_dict(self.method_config),
            "fingerprint": self.fingerprint(),
            "sizes": {"trainable": self.num_trainable(), "stored_bytes": self.stored_bytes()},
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write ``deltatune.json`` + ``delta.safetensors`` atomically (an interrupted save keeps the old one)."""
        artifact.write_artifact(path, self.describe(), self.delta_state_dict())


def _method_and_config(method: str | Any, values: dict[str, Any]) -> tuple[registry.Method, Any]:
    if isinstance(method, str):
        m = registry.get(method)
        return m, registry.make_config(m, values)
    if values:
        raise DeltatuneError("pass either a config object or keyword options, not both")
    return registry.method_of_config(method), method


def attach(model: nn.Module, method: str | Any, *, _loading: bool = False, **config: Any) -> Tuned:
    """Attach a method's delta to ``model`` and return the tuned model (the base is frozen, never written).

    ``method`` is a registered name (see ``deltatune.methods()``) with its options as keywords,
    or a method's config object."""
    if isinstance(model, Tuned):
        raise DeltatuneError("this model already has a delta attached; merge() it or attach to the base model")
    m, cfg = _method_and_config(method, config)
    previous = model.__dict__.get(_CARRIED)
    if previous is not None and previous.attached:
        # one active delta per model: a new attach replaces the old one rather than stacking on it
        warnings.warn(
            f"the model already carries an attached {previous.method.name!r} delta; detaching it first "
            "(its Tuned object keeps the delta, re-attach with dt.attach or merge it before attaching another)",
            stacklevel=2,
        )
        previous.detach()
    shapes = artifact.shapes_hash(model)
    registry.freeze(model)
    built = m.build(model, cfg, loading=_loading)
    for form in built.forms.values():
        form.attach()
    tuned = Tuned(model, m, cfg, built.forms, built.policy, shapes)
    tuned._carry(True)
    built.policy.setup(tuned)
    return tuned


def load(model: nn.Module, path: str | os.PathLike) -> Tuned:
    """Attach the delta saved at ``path`` to ``model``, after checking it is the same base model."""
    meta = artifact.read_meta(path)
    m = registry.get(meta["method"])
    cfg = registry.make_config(m, meta["config"])
    tensors = artifact.read_tensors(path, meta)
    tuned = attach(model, cfg, _loading=True)
    diffs = artifact.compare_fingerprints(meta.get("fingerprint", {}), tuned.fingerprint())
    if diffs:
        tuned.detach()
        raise DeltatuneError(
            f"{path} was trained on another base model ({'; '.join(diffs)}). "
            "Load it onto the model it was made for (see `deltatune inspect`)."
        )
    tuned.load_delta_state_dict(tensors)
    return tuned
