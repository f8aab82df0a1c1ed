"""The method registry: a method is one module that declares a config dataclass and a builder.

The core never names a method, and never imports one: ``deltatune/__init__.py`` imports the
``deltatune.methods`` package, which imports every module in it, and each registers itself with ``@register``.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from deltatune.core.forms.base import Form
from deltatune.core.policy import Policy
from deltatune.errors import DeltatuneError


@dataclass
class Built:
    """What a method's builder returns: named forms (not yet attached) and the policy that drives them."""

    forms: dict[str, Form]
    policy: Policy = dataclasses.field(default_factory=Policy)


Builder = Callable[..., Built]
# a trait that holds for some options of a method and not others is a function of its config
ConfigTrait = bool | Callable[[Any], bool]
# True (supported) or the reason it is not, or a function of the config giving one of them
QuantizedTrait = bool | str | Callable[[Any], bool | str]


@dataclass(frozen=True)
class Traits:
    """What a method's delta does, declared where the method registers, so that tests, operations and the command
    line ask the registry (``Method.has``) instead of naming methods."""

    # a fresh delta leaves the model's output exactly as it was (False by design: a prefix takes attention mass
    # before it has learnt anything, a new head has logits of its own, KaSA truncates the base it attaches to)
    starts_at_base: ConfigTrait = True
    # trains the model's own weights in place, every chosen one at once: the delta, its checkpoints and the
    # optimizer state are the size of the model (full fine-tuning, MeZO without a base method)
    full_model: ConfigTrait = False
    # trains from forward passes only: the policy takes the whole step (``Policy.train_step``), nothing has a
    # gradient, and a zeroth-order method cannot be another one's base
    gradient_free: bool = False
    # the logits come from a head of the delta's own (the model is loaded with a task head the delta replaces)
    new_head: bool = False
    # the operation that makes this method's deltas from other artifacts ("compress"); None: it is trained
    made_by: str | None = None
    # whether it trains on a quantized base (``deltatune.core.quantized``): True, or the reason it cannot (a
    # phrase ending "...: {reason}; load the base without quantize"); refused unless a method says it can
    quantized_base: QuantizedTrait = "it trains or reads the base weights as full-precision matrices"


@dataclass(frozen=True)
class PeftFormat:
    """How a method's delta is written as, and read from, a Hugging Face PEFT adapter of one ``peft_type``, declared
    where the method registers. ``deltatune.interop.peft`` does the rest for every such method: the files, the
    ``base_model.model.`` prefix, the task type, fully trained tensors (``modules_to_save``, biases) and attaching;
    the method only converts its own forms. (PEFT's ``LORA`` type has its own path there.)"""

    peft_type: str  # adapter_config.json's peft_type, e.g. "IA3"
    tensors: tuple[str, ...]  # the names PEFT gives a layer's tensors: keys "<module path>.<name>" in the adapter
    # (method config, the method's own forms by name, model) -> (tensors keyed "<module path>.<PEFT name>",
    # adapter_config.json fields of the method)
    export: Callable[[Any, dict[str, Form], nn.Module], tuple[dict[str, Any], dict[str, Any]]]
    # (adapter_config.json, the layers' tensors by module path then PEFT name, the adapter's other tensors that are
    # no module's (e.g. VeRA's projections), model) -> (the method's options for attach, tensors to load by form
    # name then the form's own tensor name)
    import_: Callable[[dict[str, Any], dict[str, dict[str, Any]], dict[str, Any], nn.Module],
                      tuple[dict[str, Any], dict[str, dict[str, Any]]]]
    # PEFT's ``bias`` value for "the biases of the adapted modules" ("vera_only"); None: the type has no bias option
    bias_only: str | None = None
    # adapter keys outside the model (``base_model.<name>``, not ``base_model.model.<module>``) the type may hold
    top_level: tuple[str, ...] = ()
    # PEFT's config object of this type given to ``dt.attach`` (e.g. ``IA3Config(...)``): (PEFT field, the method's
    # option that takes its value) pairs, the option None for a field that changes nothing deltatune computes (how
    # PEFT saves the adapter). ``interop.peft`` converts the fields every type shares itself (target_modules,
    # exclude_modules, layers_to_transform, layers_pattern, modules_to_save, fan_in_fan_out); one string where the
    # option takes names is PEFT's regular expression on the full name. Any other field set away from PEFT's default
    # is refused. Empty: the type's config objects do not convert.
    config_fields: tuple[tuple[str, str | None], ...] = ()


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    build: Builder  # build(model, config, *, loading: bool) -> Built
    description: str
    # whether ``tuned.merge()`` folds the delta into the weights: True, False (an activation-side delta
    # that must stay attached), or a phrase saying when it does ("with activation: linear")
    mergeable: bool | str = True
    traits: Traits = dataclasses.field(default_factory=Traits)
    family: str = "other"  # one of FAMILIES: how `deltatune methods` groups it
    peft: PeftFormat | None = None  # how it converts to and from a PEFT adapter (None: no PEFT type of its own)

    def has(self, trait: str, config: Any = None) -> bool:
        """Whether the method's delta has ``trait`` (a field of ``Traits``) with these options: a config, a dict
        of option values, or None for the defaults."""
        value = getattr(self.traits, trait)
        if not callable(value):
            return value is True if isinstance(value, str) else bool(value)  # a string: a reason it does not
        if not isinstance(config, self.config_cls):
            config = make_config(self, dict(config or {}))
        result = value(config)
        return result is True if isinstance(result, str) else bool(result)  # a string is a reason it does not

    def quantized_refusal(self, config: Any = None) -> str | None:
        """None if the method trains on a quantized base with these options, else the reason it does not."""
        value = self.traits.quantized_base
        if callable(value):
            if not isinstance(config, self.config_cls):
                config = make_config(self, dict(config or {}))
            value = value(config)
        if value is True:
            return None
        return value if isinstance(value, str) and value else "it needs the base weights in full precision"


_REGISTRY: dict[str, Method] = {}

# the kinds of delta, in the order ``deltatune methods`` lists them; a method declares its own where it registers
# (tests/test_discoverability.py checks each declaration against the forms the method builds)
FAMILIES = ("low-rank", "low-rank + sparse", "sparse", "full & layer-wise", "chosen tensors", "scaling vectors",
            "adapters & prompts", "zeroth-order", "made from artifacts", "other")


def register(name: str, config_cls: type, description: str, *, mergeable: bool | str = True,
             traits: Traits | None = None, family: str = "other",
             peft: PeftFormat | None = None) -> Callable[[Builder], Builder]:
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"method {name!r}: config must be a dataclass")
    if family not in FAMILIES:
        raise ValueError(f"method {name!r}: family {family!r} is not one of {FAMILIES}")

    def deco(build: Builder) -> Builder:
        if name in _REGISTRY and _REGISTRY[name].build is not build:
            raise ValueError(f"method {name!r} is registered twice")
        if peft is not None:
            other = for_peft_type(peft.peft_type)
            if other is not None and other.name != name:
                raise ValueError(f"method {name!r}: PEFT type {peft.peft_type} is already {other.name!r}'s")
        _REGISTRY[name] = Method(name, config_cls, build, description, mergeable, traits or Traits(), family, peft)
        return build

    return deco


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> Method:
    if name not in _REGISTRY:
        near = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {' or '.join(map(repr, near))}?" if near else ""
        raise DeltatuneError(f"unknown method {name!r}.{hint} Registered methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def for_peft_type(peft_type: str) -> Method | None:
    """The method that declares PEFT's ``peft_type`` (``PeftFormat``), or None."""
    return next((m for m in _REGISTRY.values() if m.peft is not None and m.peft.peft_type == peft_type.upper()), None)


def method_of_config(config: Any) -> Method:
    for m in _REGISTRY.values():
        if type(config) is m.config_cls:
            return m
    raise DeltatuneError(f"{type(config).__name__} is not the config of any registered method")


def _is_instance(value: Any, hint: Any) -> bool:
    """A light check of JSON-like values against a dataclass field's type hint."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_instance(value, h) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:  # a bool is an int to Python, but `steps: true` is a mistake, not 1 step
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            return False
        # list[X] / tuple[X, ...]: every item an X (a word where token ids go is a mistake, not a one-name list)
        item = args[0] if origin is list and len(args) == 1 else args[0] if len(args) == 2 and args[1] is ... else None
        return item is None or all(_is_instance(v, item) for v in value)
    if origin is dict:
        args = typing.get_args(hint)
        return isinstance(value, dict) and (len(args) != 2 or all(_is_instance(v, args[1]) for v in value.values()))
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


# Keys that users of PEFT, transformers' Trainer, TRL and axolotl write, and deltatune's name for each: an unknown
# key found here is answered with "did you mean" the deltatune key (when the section has it). One table for the run
# config's sections and every method's options.
ALIASES: dict[str, str] = {
    # PEFT's LoraConfig and friends
    "rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "target_modules": "targets", "lora_target_modules": "targets",
    "layers_to_transform": "layers", "exclude_modules": "exclude", "init_lora_weights": "init",
    "num_virtual_tokens": "length", "bottleneck_size": "r",
    "feedforward_modules": "feedforward", "init_ia3_weights": "init", "init_weights": "init",
    "projection_prng_key": "seed", "vera_dropout": "dropout", "loraplus_lr_ratio": "loraplus_ratio",
    # transformers' TrainingArguments, TRL's SFTConfig, axolotl
    "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs", "max_steps": "steps",
    "per_device_train_batch_size": "batch_size", "micro_batch_size": "batch_size", "train_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size", "gradient_accumulation_steps": "grad_accum",
    "warmup_ratio": "warmup", "warmup_steps": "warmup", "lr_scheduler_type": "schedule", "lr_scheduler": "schedule",
    "optim": "optimizer", "save_steps": "save_every", "eval_steps": "eval_every", "save_total_limit": "keep_last",
    "max_seq_length": "max_length", "max_seq_len": "max_length", "max_len": "max_length",
    "sequence_len": "max_length", "seq_len": "max_length", "dataset_text_field": "text_field",
    "val_set_size": "eval_fraction", "test_size": "eval_fraction", "bf16": "precision", "fp16": "precision",
    "metric_for_best_model": "metric", "early_stopping_patience": "patience",
    "early_stopping_threshold": "threshold", "greater_is_better": "mode",
    "output_dir": "output", "model_name_or_path": "model", "base_model": "model", "datasets": "data",
    "dataset": "data", "peft": "method", "adapter": "method",
}
# what to write instead, where the alias is not a plain rename
ALIAS_NOTES: dict[str, str] = {
    "warmup_ratio": "a fraction below 1 is a share of the steps", "warmup_steps": "1 or more is a number of steps",
    "greater_is_better": "mode: max for true, min for false", "bf16": "precision: bf16",
    "fp16": "precision: bf16 (deltatune's mixed precision)",
    "val_set_size": "a fraction between 0 and 1",
}


def suggestion(key: str, allowed: list[str]) -> str | None:
    """The allowed key a user most likely meant by ``key``: its deltatune name (``ALIASES``) when ``allowed`` has
    it, else the closest spelling, else None."""
    alias = ALIASES.get(str(key).lower())
    if alias is not None and alias in allowed:
        return alias
    near = difflib.get_close_matches(str(key), allowed, n=1)
    return near[0] if near else None


def did_you_mean(key: str, allowed: list[str]) -> str:
    """`` (did you mean 'r'?)`` after an unknown key (with a note for an alias that is not a plain rename), else
    the allowed keys."""
    near = suggestion(key, allowed)
    if near is None:
        return f" (allowed: {', '.join(allowed)})"
    note = ALIAS_NOTES.get(str(key).lower()) if ALIASES.get(str(key).lower()) == near else None
    return f" (did you mean {near!r}? {note})" if note else f" (did you mean {near!r}?)"


# a type as a person names it, and its plural (in "a list of ...")
_SPOKEN: dict[Any, tuple[str, str]] = {
    int: ("a whole number", "whole numbers"), float: ("a number", "numbers"),
    bool: ("true or false", "true/false values"), str: ("text", "names"), dict: ("a mapping", "mappings"),
    list: ("a list", "lists"), tuple: ("a list", "lists"), type(None): ("null", "nulls"), Any: ("anything", "values"),
}


def type_name(hint: Any) -> str:
    """A field's type as a person says it: ``a whole number``, ``null or a list of names``, ``'min' or 'max'``
    (never ``<class 'int'>`` or ``list[str] | None``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _union_name(args)
    if origin is typing.Literal:
        return _choices([repr(a) for a in args])
    if origin in (list, tuple) and args:
        if origin is tuple and Ellipsis not in args:
            same = len(set(args)) == 1
            return f"a list of {len(args)} {_plural(args[0])}" if same else f"a list of {len(args)} values"
        return f"a list of {_plural(args[0])}"
    if origin is dict and args:
        return "a mapping" if args[1] is Any else f"a mapping of names to {_plural(args[1])}"
    spoken = _SPOKEN.get(origin or hint)
    if spoken is not None:
        return spoken[0]
    return getattr(hint, "__name__", str(hint))


def _plural(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple) and args:
        return f"lists of {_plural(args[0])}"
    spoken = _SPOKEN.get(origin or hint)
    return spoken[1] if spoken is not None else type_name(hint)


def _union_name(args: tuple[Any, ...]) -> str:
    """``null, text or a list of names``: null first, a whole number left out where a number is allowed, and
    true / false as two of the choices."""
    parts = ["null"] if type(None) in args else []
    for a in args:
        if a is type(None) or (a is int and float in args):
            continue
        parts += ["true", "false"] if a is bool else [type_name(a)]
    return _choices(parts)


def _choices(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def _one_name_lists(method: Method, values: dict[str, Any]) -> dict[str, Any]:
    """One name where a list of names goes is a one-item list (YAML ``targets: all-linear``, PEFT's
    ``target_modules="all-linear"``)."""
    hints = typing.get_type_hints(method.config_cls)
    out = dict(values)
    for key, value in values.items():
        if isinstance(value, str) and key in hints and _is_instance([value], hints[key]) \
                and not _is_instance(value, hints[key]):
            out[key] = [value]
    return out


def config_problems(method: Method, values: dict[str, Any], prefix: str = "") -> list[str]:
    """Every unknown key (with the option meant) and badly typed value in ``values``, one line each; keys are
    shown as ``prefix + key`` (``method.r`` in a run config)."""
    fields = [f.name for f in dataclasses.fields(method.config_cls)]
    hints = typing.get_type_hints(method.config_cls)
    values = _one_name_lists(method, values)
    problems = []
    for key, value in values.items():
        if key not in fields:
            where = f"key {prefix}{key} for {method.name}" if prefix else f"option {key!r}"
            problems.append(f"unknown {where}{did_you_mean(key, fields)}")
        elif not _is_instance(value, hints[key]):
            problems.append(f"{prefix}{key}={value!r}: should be {type_name(hints[key])}")
    return problems


def problem_list(header: str, problems: list[str]) -> str:
    """One problem after the header on its line, or several on lines of their own: ``header:`` then
    ``  - problem`` each."""
    if len(problems) == 1:
        return f"{header}: {problems[0]}"
    return f"{header} ({len(problems)} problems):\n" + "\n".join(f"  - {p}" for p in problems)


def make_config(method: Method, values: dict[str, Any]) -> Any:
    """Build a method's config from keyword values: every bad key or value in one error."""
    values = _one_name_lists(method, values)
    problems = config_problems(method, values)
    if problems:
        raise DeltatuneError(problem_list(f"bad config for method {method.name!r}", problems))
    try:
        return method.config_cls(**values)
    except (ValueError, TypeError) as e:
        raise DeltatuneError(f"bad config for method {method.name!r}: {e}") from e


def config_to_dict(config: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
