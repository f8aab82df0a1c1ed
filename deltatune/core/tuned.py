"""``Tuned``: a base model with a delta attached, and the ``attach`` / ``load`` entry points."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

from deltatune.core import quantized, registry
from deltatune.core.delta import Delta
from deltatune.core.forms.base import Form
from deltatune.core.policy import Policy
from deltatune.errors import DeltatuneError

# the model remembers what carries its attached delta (a Tuned, or a composition of several), so a second attach can
# take the first one off even when the user dropped every reference to it (the hooks would otherwise live on unseen)
_CARRIED = "_deltatune_carried"


def _module_key(name: str) -> str:
    return name.replace(".", ":")  # ModuleDict keys may not contain dots


def carried_by(model: nn.Module) -> Any | None:
    """What carries the delta attached to ``model`` now (a ``Tuned`` or a composition), or None."""
    holder = model.__dict__.get(_CARRIED)
    return holder if holder is not None and holder.attached else None


def refuse_another_carried(model: nn.Module, holder: Any) -> None:
    """Before ``holder`` puts its delta back on ``model``: refuse if another one is attached there now."""
    other = carried_by(model)
    if other is not None and other is not holder:
        raise DeltatuneError(f"the model carries another attached {other.method.name!r} delta: detach it first")


def carry(model: nn.Module, holder: Any, on: bool) -> None:
    """Record that ``holder`` carries the delta attached to ``model`` (``on``), or no longer does."""
    if on:
        model.__dict__[_CARRIED] = holder  # a plain attribute: not registered as a submodule
    elif model.__dict__.get(_CARRIED) is holder:
        del model.__dict__[_CARRIED]


@contextlib.contextmanager
def carried_taken_off(model: nn.Module) -> Iterator[Any | None]:
    """Take the delta ``model`` carries (if any) off while the body runs, and put it back on if the body fails.

    The body sees the base model (builders look tensors up by names that a parametrisation changes), and a
    delta refused there (another base model) leaves the model as it was. Yields what carried the delta."""
    holder = carried_by(model)
    if holder is None:
        yield None
        return
    holder.detach()
    try:
        yield holder
    except BaseException:
        holder.reattach()
        raise


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


# names of the model's methods that write or upload it: reached through a Tuned they would save the base without
# the delta, so they are refused rather than passed through
BASE_WRITERS = ("save", "push_to_hub")

# PEFT's save_pretrained keywords a Tuned's save_pretrained takes (see its docstring for what each does here)
PEFT_SAVE_KEYWORDS = ("safe_serialization", "selected_adapters", "save_embedding_layers", "is_main_process")


class BaseWriteRefused(DeltatuneError, AttributeError):
    """A model-writing method reached through a Tuned. An AttributeError too, so ``hasattr`` says the Tuned has
    no such method instead of raising."""


class Tuned(ModelWrapper):
    """Wraps a model, forwards to it, and attaches one ``Delta`` (forms + policy) to it.

    Attribute lookups the wrapper does not know fall through to the model, so ``tuned.generate``
    and ``tuned.config`` work as on the model itself; the model's own saving methods (``save_*``,
    ``push_to_hub``) do not, as they would write the base without the delta. ``tuned.delta`` is the Delta;
    ``tuned.deltas`` holds its forms as submodules, so ``.to(device)`` and ``parameters()`` reach them.
    """

    def __getattr__(self, name: str) -> Any:
        if not name.startswith(BASE_WRITERS):
            return super().__getattr__(name)  # the Tuned's own submodules and tensors, then the model's attributes
        try:
            return nn.Module.__getattr__(self, name)  # a submodule or tensor of the Tuned's own by that name
        except AttributeError:
            raise BaseWriteRefused(
                f"tuned.{name} would write the base model without the delta: tuned.save_pretrained(path) saves "
                f"the delta; to write the full model, model = tuned.merge() and call model.{name}(...)"
            ) from None

    # transformers' Trainer refuses a quantized model unless it carries trainable adapters, which it reads from this
    # flag (set by its own PEFT integration; ``validate_quantization_for_training``): a Tuned carries its delta. Only
    # the wrapper says so: the model's own methods read the model's flag, which stays unset.
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module, delta: Delta) -> None:
        super().__init__()
        self.model = model
        self.delta = delta
        self.deltas = nn.ModuleDict()
        self._register_forms()
        self.merged = False
        self._quantized = False  # the base was quantised under the delta (deltatune.ops.quantize)
        # while merged on a quantized base: its quantized layers, turned plain, and what puts them back
        self._plain: quantized.PlainModel | None = None

    # -- the delta ------------------------------------------------------------------------
    @property
    def method(self) -> registry.Method:
        return self.delta.method

    @property
    def method_config(self) -> Any:
        return self.delta.config

    @property
    def policy(self) -> Policy:
        return self.delta.policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self.delta.policy = policy

    @property
    def delta_names(self) -> list[str]:
        return list(self.delta.forms)

    def forms(self) -> dict[str, Form]:
        return dict(self.delta.forms)

    def _register_forms(self) -> None:
        """Make ``deltas`` hold exactly the delta's forms, in its order (changed in place: a form that stays keeps
        its position, so the parameter order the training loops rely on only ever grows at the end)."""
        wanted = {_module_key(name): form for name, form in self.delta.forms.items()}
        for key in list(self.deltas.keys()):
            if wanted.get(key) is not self.deltas[key]:
                del self.deltas[key]
        for key, form in wanted.items():
            if key not in self.deltas:
                self.deltas[key] = form

    def replace_forms(self, new: dict[str, Form], remove: list[str] | tuple[str, ...] = ()) -> None:
        """Change the delta's structure during training (a policy switching phases, e.g. dense -> sparse):
        forms in ``remove`` come off, forms in ``new`` go on (replacing one of the same name). Their
        tensors leave / join the delta; the training loops drop / add them in the optimizer."""
        if self.merged:
            raise DeltatuneError("cannot change the forms of a merged delta; unmerge first")
        for form in self.delta.replace_forms(new, remove):
            form.detach()
        for form in new.values():
            form.attach()
        self._register_forms()

    def swap_delta(self, delta: Delta) -> Delta:
        """Hold ``delta`` (built on this model, not attached) instead of the delta held now, which is returned.
        Nothing is attached or detached here (several named deltas on one model: deltatune.core.tenants)."""
        if self.merged:
            raise DeltatuneError("the delta is merged into the weights: unmerge() before switching deltas")
        if delta.model is not self.model:
            raise DeltatuneError("the delta is not built on this Tuned's model")
        old, self.delta = self.delta, delta
        self._register_forms()
        return old

    def trainable_parameters(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for p in self.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
        return list(seen.values())

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts as PEFT counts them: all is the base model's plus the delta's."""
        return self.num_trainable(), sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        """Print the counts in PEFT's format, so notebooks and logs written for PEFT read the same."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def stored_bytes(self) -> int:
        return self.delta.stored_bytes()

    def delta_state_dict(self) -> dict[str, torch.Tensor]:
        """Artifact tensors, keyed ``<form name>.<tensor name>``."""
        return self.delta.state_dict()

    def load_delta_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.delta.load_state_dict(tensors)

    # -- identity of the base -------------------------------------------------------------
    def base_tensors(self) -> dict[str, torch.Tensor]:
        return self.delta.base_tensors()

    def fingerprint(self) -> dict[str, Any]:
        """Computed from the untouched base (before any merge) and cached."""
        return self.delta.fingerprint()

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

        The delta is kept, so ``unmerge`` can take it out again. ``quantize="int8" | "nf4" | "fp4"`` then
        quantizes every Linear / GPT-2 Conv1D but the output head with bitsandbytes, as
        ``dt.models.load(..., quantize=)`` does (``deltatune.core.quantized``); such a model cannot be
        unmerged.

        On a quantized base (``deltatune.core.quantized``) every quantized layer becomes a plain ``nn.Linear``
        holding its dequantized weight at its compute dtype, with ΔW added where the delta has one, and the
        model loses transformers' quantization marks: it computes, saves and loads as a plain model.
        ``unmerge`` gives the quantized layers back exactly (they are kept aside while merged)."""
        if self.merged:
            raise DeltatuneError("the delta is already merged; call unmerge() first")
        if self._quantized:
            raise DeltatuneError("the base was quantised under the delta (quantize_base): the delta stays "
                                 "unmerged on it; to merge, dt.load the artifact onto the fp base and "
                                 "tuned.merge(quantize=...)")
        if quantize is not None:
            quantized.check_scheme(quantize)
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
        if quantized.is_quantized_model(self.model):
            for form in self.forms().values():
                form.detach()  # nothing may hang on a layer while it turns plain
            self._plain = quantized.to_plain(self.model)
        for form in self.forms().values():
            form.merge()
        self.merged = True
        self._carry(False)
        self._set_tying(untie=True)
        if quantize is not None:
            self._quantized = True
            self._plain = None  # the quantized layers it kept cannot come back under other weights
            return self._quantize_merged(quantize)
        return self.model

    def _quantize_merged(self, scheme: str) -> nn.Module:
        """The merged model quantized with bitsandbytes as ``dt.models.load(..., quantize=scheme)`` does (nf4 /
        fp4: QLoRA's double quantization, computing in the merged weights' dtype; int8: LLM.int8())."""
        return quantized.quantize_model(self.model, scheme, double_quant=True)

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

    def reattach(self) -> Tuned:
        """Put the delta that ``detach`` took off back on the model."""
        if self.merged:
            raise DeltatuneError("the delta is merged into the weights: there is nothing to put back on")
        refuse_another_carried(self.model, self)
        for form in self.forms().values():
            form.attach()
        self._carry(True)
        return self

    @property
    def switchable(self) -> bool:
        """Whether ``delta_off`` gives the base model's forward cheaply: every form sits beside the base weights
        (hooks, parametrisations, modules). An in-place form (full fine-tuning, LISA, HFT) has written the base
        tensor itself; taking it off copies W0 back into every trained tensor, so a caller that needs the base
        model's outputs often (a preference objective's reference) computes them once instead."""
        from deltatune.core.forms.inplace import InPlace

        return not any(isinstance(f, InPlace) for f in self.forms().values())

    @contextlib.contextmanager
    def delta_off(self) -> Iterator[nn.Module]:
        """The base model while the body runs (the delta taken off, put back after, also when the body fails):
        the reference policy of DPO / GRPO, exactly the base's forward. Gradients do not reach the delta
        through it. Refused on a merged delta (the weights are the tuned ones)."""
        if self.merged:
            raise DeltatuneError("the delta is merged into the weights: unmerge() before asking for the base model")
        if not self.attached:
            yield self.model
            return
        self.detach()
        try:
            yield self.model
        finally:
            self.reattach()

    def _carry(self, on: bool) -> None:
        carry(self.model, self, on)

    @property
    def attached(self) -> bool:
        return any(f.attached for f in self.forms().values())

    def unmerge(self) -> Tuned:
        if not self.merged:
            raise DeltatuneError("the delta is not merged; there is nothing to unmerge")
        if self._quantized:
            raise DeltatuneError("the merged model was quantised, which cannot be undone exactly: "
                                 "load the base model again and dt.load the artifact onto it")
        for form in reversed(list(self.forms().values())):
            form.unmerge()
        if self._plain is not None:  # a quantized base: its own layers back, exactly as they were
            forms = list(self.forms().values())
            for form in forms:
                form.detach()
            quantized.back_to_quantized(self.model, self._plain)
            self._plain = None
            for form in forms:
                form.attach()
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
        return self.delta.describe()

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write ``deltatune.json`` + ``delta.safetensors`` atomically (an interrupted save keeps the old one).
        A folder holding anything but an artifact is refused unless ``overwrite``."""
        self.delta.save(path, overwrite=overwrite)

    def save_pretrained(self, save_directory: str | os.PathLike, *, overwrite: bool = False, **peft_options: Any
                        ) -> None:
        """Save the delta artifact to ``save_directory``, as ``save`` does: PEFT's habit, never the base model
        (``merge()`` gives the plain model to save whole). ``dt.load`` / ``Tuned.from_pretrained`` read it back.

        PEFT's keywords: ``is_main_process=False`` writes nothing (as in PEFT, for the other ranks);
        ``safe_serialization`` must stay True (only safetensors is written); ``selected_adapters`` may name
        only the delta in use ("default"); ``save_embedding_layers`` is ignored (the artifact holds every tensor
        the delta trains, and never the base's). Any other keyword is refused."""
        unknown = sorted(set(peft_options) - set(PEFT_SAVE_KEYWORDS))
        if unknown:
            raise DeltatuneError(
                f"save_pretrained got unknown option(s) {', '.join(unknown)}: it saves the delta artifact and takes "
                f"overwrite and PEFT's {', '.join(PEFT_SAVE_KEYWORDS)}"
            )
        if peft_options.get("safe_serialization", True) is not True:
            raise DeltatuneError("save_pretrained writes safetensors only (nothing is pickled): drop "
                                 "safe_serialization=False")
        selected = peft_options.get("selected_adapters")
        if selected is not None and list(selected) != ["default"]:
            raise DeltatuneError(f"save_pretrained saves the delta in use, not {selected!r}: tuned.use(name) "
                                 "first, then save_pretrained without selected_adapters")
        if peft_options.get("is_main_process", True):
            self.save(save_directory, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls, model: nn.Module, path: str | os.PathLike) -> Tuned:
        """PEFT's ``PeftModel.from_pretrained(model, path)`` habit: the same as ``dt.load(model, path)``."""
        return load(model, path)


# Converters of other libraries' config objects into (method name, options): deltatune.interop.peft registers PEFT's
# config objects (LoraConfig, and those of the types methods declare) here when the package is imported. The core may not import interop (docs/architecture.md), so the layer
# that knows the foreign format plugs itself in rather than the core reaching up to it.
ConfigConverter = Callable[[Any, nn.Module], tuple[str, dict[str, Any]] | None]
_CONVERTERS: list[ConfigConverter] = []


def register_config_converter(convert: ConfigConverter) -> None:
    """``convert(config_object, model)`` returns (method name, options) for a config object it knows, else None;
    ``attach`` asks every registered converter about a config object that is not a deltatune method's config."""
    if convert not in _CONVERTERS:
        _CONVERTERS.append(convert)


def _method_and_config(method: str | Any, values: dict[str, Any], model: nn.Module) -> tuple[registry.Method, Any]:
    if isinstance(method, str):
        m = registry.get(method)
        return m, registry.make_config(m, values)
    if values:
        raise DeltatuneError("pass either a config object or keyword options, not both")
    try:
        return registry.method_of_config(method), method
    except DeltatuneError as e:
        unknown = e  # raised below if no converter knows the object either (outside this block: no chained trace)
    for convert in _CONVERTERS:
        converted = convert(method, model)
        if converted is not None:
            name, options = converted
            m = registry.get(name)
            return m, registry.make_config(m, options)
    raise unknown


def attach(model: nn.Module, method: str | Any, *, _loading: bool = False, **config: Any) -> Tuned:
    """Attach a method's delta to ``model`` and return the tuned model (the base is frozen, never written).

    ``method`` is a registered name (see ``deltatune.methods()``) with its options as keywords, a method's config
    object, or a PEFT config object: ``LoraConfig`` (converted to the ``lora`` / ``dora`` options) or that of another
    PEFT type a method declares (``IA3Config``, ``VeraConfig``, ...; ``registry.PeftFormat.config_fields``); fields
    deltatune cannot honour are refused, each named."""
    if isinstance(model, Tuned):
        raise DeltatuneError("this model already has a delta attached; merge() it or attach to the base model")
    m, cfg = _method_and_config(method, config, model)
    return _put_on(model, Delta(m, cfg), loading=_loading)


def load(model: nn.Module, path: str | os.PathLike) -> Tuned:
    """Attach the delta saved at ``path`` to ``model``, after checking it is the same base model (before anything
    on the model changes: a refused artifact leaves the delta the model carries attached)."""
    if isinstance(model, Tuned):
        raise DeltatuneError("this model already has a delta attached; merge() it or attach to the base model")
    tuned = _put_on(model, Delta.read(path), loading=True)
    # the forms take the model's mode: a model loaded for inference (eval, as from_pretrained gives it) must not
    # run a LoRA's dropout, as PEFT's from_pretrained (is_trainable=False) does not
    return tuned.train(model.training)


def _put_on(model: nn.Module, delta: Delta, *, loading: bool) -> Tuned:
    """Build ``delta`` on ``model`` (its base checked), attach it, set its policy up and load its tensors; the
    delta the model carried comes off, or stays on when anything here fails."""
    with carried_taken_off(model) as previous:
        # every flag, not only the trainable ones: an in-place form (full fine-tuning, a fresh head) switches a
        # frozen parameter on, and a failed attach must leave the model as it found it
        flags = [(p, p.requires_grad) for p in model.parameters()]
        registry.freeze(model)
        try:
            delta.build(model, loading=loading, load=False)
            for form in delta.forms.values():
                form.attach()
            tuned = Tuned(model, delta)
            tuned._carry(True)
            try:
                delta.policy.setup(tuned)
                delta.load_tensors()  # after setup, as a resumed run restores the policy before the tensors
            except BaseException:
                tuned.detach()
                raise
        except BaseException:
            for p, flag in flags:
                p.requires_grad_(flag)
            raise
    if previous is not None:
        # one active delta per model: a new one replaces the old one rather than stacking on it
        warnings.warn(
            f"the model already carries an attached {previous.method.name!r} delta; detaching it first "
            "(it keeps the delta: reattach() puts it back on; or merge it before attaching another)",
            stacklevel=3,
        )
    return tuned


def delta_of(item: DeltaSource) -> Delta:
    """The delta of an artifact path (read), or of a ``Tuned`` (a copy, apart from its model), not built yet."""
    if isinstance(item, Tuned):
        if item.merged:
            raise DeltatuneError(f"the {item.method.name!r} delta is merged into its model: unmerge() it first")
        return item.delta.snapshot()
    if not isinstance(item, str | os.PathLike):
        raise DeltatuneError(f"a delta is an artifact path or a Tuned model, not {type(item).__name__}")
    return Delta.read(item)


DeltaSource = str | os.PathLike | Tuned
