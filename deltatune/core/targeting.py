"""Targeting: pick the modules or parameters a delta lives on.

A pattern is matched against full dotted names:

- ``"q_proj"``: the name equals it or ends with ``".q_proj"`` (Hugging Face PEFT's list semantics);
- ``"layers.*.mlp.*"``: a glob, matched against the full name and every dotted suffix of it;
- ``"re:.*attn\\.(q|v)_proj"``: a regular expression, ``re.fullmatch`` on the full name;
- ``"all-linear"``: every Linear / GPT-2 Conv1D layer but the model's output layer (PEFT's shorthand, see
  ``all_linear``).

A pattern that matches nothing is an error listing the 20 nearest names the model does have: a
typo must never silently train nothing.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Sequence

import torch.nn as nn

from deltatune.errors import DeltatuneError

ALL_LINEAR = "all-linear"
_LAYER_INDEX = re.compile(r"\.(\d+)(?=\.|$)")
_GLOB_CHARS = set("*?[")

LayerSpec = int | str | Sequence[int] | None


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # plain torch user without transformers
        return None
    return Conv1D


def module_types() -> dict[str, tuple[type, ...]]:
    """The type names a user may write in ``types=[...]``."""
    conv1d = _conv1d_type()
    return {
        "linear": (nn.Linear,),
        "conv1d": (conv1d,) if conv1d else (),
        "embedding": (nn.Embedding,),
        "layernorm": (nn.LayerNorm,),
    }


def layer_index(name: str) -> int | None:
    """The block index in a name such as ``model.layers.7.self_attn.q_proj`` (the first integer part)."""
    m = _LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None


def match_name(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if _GLOB_CHARS & set(pattern):
        parts = name.split(".")
        return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))
    return name == pattern or name.endswith("." + pattern)


def _type_matches(module: nn.Module, types: Sequence[str]) -> bool:
    known = module_types()
    for t in types:
        key = t.lower()
        if key in known and known[key] and isinstance(module, known[key]):
            return True
        if type(module).__name__.lower() == key:  # any class by name, e.g. "LlamaRMSNorm"
            return True
        if key == "layernorm" and "norm" in type(module).__name__.lower():
            return True
    return False


def resolve_layers(layers: LayerSpec, n_layers: int) -> set[int] | None:
    """``3`` · ``[0, 1, 5]`` · ``"0:4"`` (a Python slice; negatives count from the end) · None (all)."""
    if layers is None:
        return None
    if isinstance(layers, int):
        return {layers % n_layers if n_layers else layers}
    if isinstance(layers, str):
        if ":" not in layers:
            raise DeltatuneError(f"layers={layers!r} is not a layer range: write 'start:stop' (e.g. '0:4') or a list of ints")
        start, stop = (int(x) if x.strip() else None for x in layers.split(":", 1))
        return set(range(n_layers)[slice(start, stop)])
    return {int(i) % n_layers if n_layers else int(i) for i in layers}


def count_layers(names: Iterable[str]) -> int:
    idx = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(idx) + 1 if idx else 0


def nearest_names(pattern: str, names: Iterable[str], n: int = 20) -> list[str]:
    """Names to show when ``pattern`` matched nothing: leaf names and index-collapsed paths."""
    names = list(names)
    candidates = sorted({x.rsplit(".", 1)[-1] for x in names} | {_LAYER_INDEX.sub(".*", x) for x in names})
    needle = pattern[3:] if pattern.startswith("re:") else pattern
    return difflib.get_close_matches(needle, candidates, n=n, cutoff=0.0)


def _as_list(x: str | Sequence[str] | None) -> list[str] | None:
    if x is None:
        return None
    return [x] if isinstance(x, str) else list(x)


def _select(
    items: list[tuple[str, object]],
    owner: str,
    names: str | Sequence[str] | None,
    layers: LayerSpec,
    types: Sequence[str] | None,
    exclude: str | Sequence[str] | None,
    type_of,
) -> list[tuple[str, object]]:
    all_names = [n for n, _ in items]
    patterns, excludes = _as_list(names), _as_list(exclude) or []
    if patterns:
        for p in patterns:
            if not any(match_name(p, n) for n in all_names):
                near = ", ".join(nearest_names(p, all_names))
                raise DeltatuneError(
                    f"target {p!r} matches no {owner} of the model. Nearest names it does have: {near}. "
                    "Fix the pattern (exact suffix such as 'q_proj', a glob such as 'layers.*.mlp.*', "
                    "or 're:<regex>')."
                )
    wanted_layers = resolve_layers(layers, count_layers(all_names))
    chosen = []
    for name, item in items:
        if patterns and not any(match_name(p, name) for p in patterns):
            continue
        if any(match_name(p, name) for p in excludes):
            continue
        if wanted_layers is not None and layer_index(name) not in wanted_layers:
            continue
        if types and not _type_matches(type_of(name, item), types):
            continue
        chosen.append((name, item))
    if not chosen:
        raise DeltatuneError(
            f"the selection names={patterns} layers={layers!r} types={types} exclude={excludes} matches no "
            f"{owner} (each name pattern matches, but not together with the other filters). Widen one of them."
        )
    return chosen


def all_linear(model: nn.Module) -> list[str]:
    """PEFT's ``target_modules="all-linear"``: every Linear / Conv1D layer except the output layer, which is the
    LM head (``get_output_embeddings()``) or, for a model without one, its classification head (the ``score`` or
    ``classifier`` layer, as PEFT leaves out for a SEQ_CLS task): adapting the head is a choice to make by name."""
    linear = module_types()["linear"] + module_types()["conv1d"]
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if head is None:
        head = next((getattr(model, n) for n in ("score", "classifier") if isinstance(getattr(model, n, None), nn.Module)),
                    None)
    return [n for n, m in model.named_modules() if n and isinstance(m, linear) and m is not head]


def _expand_all_linear(model: nn.Module, names: str | Sequence[str] | None) -> str | Sequence[str] | None:
    patterns = _as_list(names)
    if not patterns or not any(p.lower() == ALL_LINEAR for p in patterns):
        return names
    found = all_linear(model)
    if not found:
        raise DeltatuneError(f"target {ALL_LINEAR!r}: {type(model).__name__} has no Linear or Conv1D layer besides its "
                             "output layer; name the modules to adapt instead")
    others = [p for p in patterns if p.lower() != ALL_LINEAR]
    return list(dict.fromkeys(found + others))


def select_modules(
    model: nn.Module,
    names: str | Sequence[str] | None = None,
    *,
    layers: LayerSpec = None,
    types: Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> list[tuple[str, nn.Module]]:
    """Modules whose name matches any of ``names`` and all other filters, in model order."""
    names = _expand_all_linear(model, names)
    items = [(n, m) for n, m in model.named_modules() if n]
    return _select(items, "module", names, layers, types, exclude, lambda _n, m: m)  # type: ignore[return-value]


def select_parameters(
    model: nn.Module,
    names: str | Sequence[str] | None = None,
    *,
    layers: LayerSpec = None,
    types: Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> list[tuple[str, nn.Parameter]]:
    """Parameters; a tied parameter matches under any of its names and comes back once, under its
    first name. ``types`` filters by the owning module."""
    owners = dict(model.named_modules(remove_duplicate=False))
    items = list(model.named_parameters(remove_duplicate=False))
    canonical = {id(p): n for n, p in reversed(items)}

    def owner_of(name: str, _p: object) -> nn.Module:
        return owners[name.rsplit(".", 1)[0]] if "." in name else model

    chosen = _select(items, "parameter", names, layers, types, exclude, owner_of)
    unique = {id(p): (canonical[id(p)], p) for _, p in chosen}
    return list(unique.values())  # type: ignore[return-value]


def sites_of(model: nn.Module, param: nn.Parameter) -> list[tuple[nn.Module, str]]:
    """Every (module, attribute) that holds ``param``: more than one when weights are tied."""
    found: dict[tuple[int, str], tuple[nn.Module, str]] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for pname, p in m.named_parameters(recurse=False, remove_duplicate=False):
            if p is param:
                found[(id(m), pname)] = (m, pname)
    return list(found.values())
