"""The method registry: a method is one module that declares a config dataclass and a builder.

The core never names a method, and never imports one: ``deltatune/__init__.py`` imports the
``deltatune.methods`` package, which imports every module in it, and each registers itself with ``@register``.
"""

from __future__ import annotations

import dataclasses
import difflib
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

    def has(self, trait: str, config: Any = None) -> bool:
        """Whether the method's delta has ``trait`` (a field of ``Traits``) with these options: a config, a dict
        of option values, or None for the defaults."""
        value = getattr(self.traits, trait)
        if not callable(value):
            return bool(value)
        if not isinstance(config, self.config_cls):
            config = make_config(self, dict(config or {}))
        return bool(value(config))


_REGISTRY: dict[str, Method] = {}


def register(name: str, config_cls: type, description: str, *, mergeable: bool | str = True,
             traits: Traits | None = None) -> Callable[[Builder], Builder]:
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"method {name!r}: config must be a dataclass")

    def deco(build: Builder) -> Builder:
        if name in _REGISTRY and _REGISTRY[name].build is not build:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTRY[name] = Method(name, config_cls, build, description, mergeable, traits or Traits())
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
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
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
        return isinstance(value, list | tuple)
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def type_name(hint: Any) -> str:
    """A field's type as a config author writes it: ``int``, ``list[str] | None`` (not ``<class 'int'>``)."""
    return hint.__name__ if isinstance(hint, type) and not typing.get_args(hint) else str(hint).replace("typing.", "")


def make_config(method: Method, values: dict[str, Any]) -> Any:
    """Build a method's config from keyword values: every bad key or value in one error."""
    fields = {f.name: f for f in dataclasses.fields(method.config_cls)}
    hints = typing.get_type_hints(method.config_cls)
    problems = []
    for key, value in values.items():
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            problems.append(f"unknown option {key!r}{hint}")
        elif not _is_instance(value, hints[key]):
            problems.append(f"{key}={value!r} should be {type_name(hints[key])}")
    if problems:
        raise DeltatuneError(
            f"bad config for method {method.name!r}: " + "; ".join(problems)
            + f". Valid options: {', '.join(fields)}"
        )
    try:
        return method.config_cls(**values)
    except (ValueError, TypeError) as e:
        raise DeltatuneError(f"bad config for method {method.name!r}: {e}") from e


def config_to_dict(config: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
