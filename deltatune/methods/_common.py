"""Helpers shared by method modules (not a method: the leading underscore keeps it unregistered)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
import torch.nn as nn

from deltatune.core import registry
from deltatune.core.forms.base import Form, WeightDelta
from deltatune.core.forms.dense import Dense
from deltatune.core.forms.inplace import InPlace
from deltatune.core.policy import release_state
from deltatune.core.targeting import layer_index, select_modules, sites_of
from deltatune.errors import DeltatuneError

F = TypeVar("F", bound=Form)


def per_parameter_forms(model: nn.Module, params: Iterable[tuple[str, nn.Parameter]],
                        make: Callable[[list[tuple[nn.Module, str]], str], F]) -> dict[str, F]:
    """One form per floating parameter, ``make(sites, name)``; a tied parameter once, applied at every module
    holding it."""
    forms: dict[str, F] = {}
    seen: set[int] = set()
    for name, p in params:
        if id(p) in seen or not p.is_floating_point():
            continue
        seen.add(id(p))
        forms[name] = make(sites_of(model, p), name)
    return forms


def dense_forms(model: nn.Module, params: Iterable[tuple[str, nn.Parameter]]) -> dict[str, Dense]:
    """One dense delta per parameter (tied parameters once, applied at every module holding them)."""
    return per_parameter_forms(model, params, Dense)


def block_matrices(
    model: nn.Module,
    targets: list[str] | None,
    layers: list[int] | str | None = None,
    exclude: list[str] | None = None,
) -> list[tuple[str, nn.Module]]:
    """The weight matrices a sparse method tunes: the named targets, or by default every Linear /
    GPT-2 Conv1D inside the numbered transformer blocks (not embeddings, not the output head)."""
    if targets:
        return select_modules(model, targets, layers=layers, types=["linear", "conv1d"], exclude=exclude)
    found = select_modules(model, None, layers=layers, types=["linear", "conv1d"], exclude=exclude)
    return [(n, m) for n, m in found if layer_index(n) is not None]


def inplace_forms(model: nn.Module, params: Iterable[tuple[str, nn.Parameter]], trainable: bool = True
                  ) -> dict[str, InPlace]:
    """One in-place dense delta per parameter (tied parameters once): the model's own tensors train, and
    W0 is copied only for the tensors that get a gradient."""
    forms = per_parameter_forms(model, params, InPlace)
    for form in forms.values():
        form.weight.requires_grad_(trainable)
    return forms


def build_base(model: nn.Module, base_name: str, base_options: dict[str, Any], loading: bool) -> registry.Built:
    """The forms and policy of another registered method, for a method that wraps one (IST's layer selection
    over LoRA, MeZO's optimizer over any form). Bad options name the base and the wrapping option."""
    method = registry.get(base_name)
    try:
        cfg = registry.make_config(method, dict(base_options))
    except DeltatuneError as e:
        raise DeltatuneError(f"base_options: {e}") from e
    return method.build(model, cfg, loading=loading)


def base_on_quantized(base_name: str | None, base_options: dict[str, Any]) -> bool | str:
    """The ``quantized_base`` trait of a method that trains another one's delta (IST, MeZO with ``base``):
    True when that method trains on a quantized base with those options, else its reason, naming it."""
    if base_name not in registry.names():
        return True  # the config itself names the unknown method when it is built
    try:
        reason = registry.get(base_name).quantized_refusal(dict(base_options))
    except (DeltatuneError, TypeError, ValueError):
        return True  # bad base options are the builder's error, said with its context
    return True if reason is None else f"its base method {base_name!r} cannot: {reason}"


def layerwise_forms(model: nn.Module, loading: bool) -> dict[str, WeightDelta]:
    """A delta over every floating tensor of the model for a policy that chooses which train when: in-place
    while training (W0 copied only for tensors that train), a plain dense delta when loading an artifact.
    Nothing trains until the policy says so."""
    params = list(model.named_parameters())
    forms: dict[str, WeightDelta] = dict(dense_forms(model, params) if loading else inplace_forms(model, params, False))
    set_trainable(forms.values(), False)
    return forms


def forms_by_block(forms: dict[str, Form]) -> tuple[dict[int, list[Form]], list[Form]]:
    """Forms grouped by the numbered block their tensor lives in, and the forms outside every block
    (embeddings, final norm, head)."""
    blocks: dict[int, list[Form]] = {}
    outside: list[Form] = []
    for name, form in forms.items():
        i = layer_index(name)
        if i is None:
            outside.append(form)
        else:
            blocks.setdefault(i, []).append(form)
    return dict(sorted(blocks.items())), outside


def set_trainable(forms: Iterable[Form], on: bool, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Switch forms on or off. With an optimizer, their state is released both ways: a tensor that stops
    must not keep memory, one that starts again must not inherit stale moments."""
    params = [p for f in forms for p in f.parameters()]
    for p in params:
        p.requires_grad_(on)
        if not on:
            p.grad = None
    if optimizer is not None:
        release_state(optimizer, params)


def from_rank0(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's value of ``t`` on every data-parallel rank (``t`` itself outside distributed runs): for choices a
    method makes from data that may differ by rank, or from computations (SVD, ties) that need not agree."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return t
    where = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    shared = t.to(where).contiguous()
    dist.broadcast(shared, 0)
    return shared.to(t.device)
