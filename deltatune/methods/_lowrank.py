"""What the LoRA-like methods share (LoRA, DoRA, KaSA, CorDA, DSEE, the adapters): where they go by default,
PEFT's rank / alpha patterns, and PEFT's ``bias`` / ``modules_to_save`` options."""

from __future__ import annotations

import math
import re
import warnings

import torch.nn as nn

from deltatune.core.targeting import match_name, module_types, select_modules
from deltatune.errors import DeltatuneError
from deltatune.methods._common import dense_forms


def pattern_value(patterns: dict, module_name: str, default: float) -> float:
    """PEFT's rank/alpha pattern lookup: a key matches a module name or a dotted suffix of it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def check_alpha(alpha: float) -> None:
    """LoRA's alpha (the scale is alpha/r) must be finite. A non-positive one only draws a warning: PEFT accepts
    any ``lora_alpha`` (its adapters must import), a negative alpha just flips the sign of B·A, which training
    absorbs into B, and alpha = 0 silences the delta."""
    if not math.isfinite(alpha):
        raise ValueError(f"alpha={alpha} must be a finite number")
    if alpha < 0:
        warnings.warn(f"alpha={alpha:g} is negative: the delta is scaled by alpha/r < 0, which trains like "
                      f"alpha={-alpha:g} with B negated (PEFT accepts it too); use a positive alpha", stacklevel=3)
    elif alpha == 0:
        warnings.warn("alpha=0 scales the delta to zero: it changes nothing and its factors get no gradient; "
                      "use a positive alpha, e.g. alpha = r", stacklevel=3)


# The LoRA paper adapts W_q and W_v; PEFT's per-architecture defaults are those (or the fused q/k/v projection
# where a model has one). Rather than copy PEFT's table (which misses architectures and ages), find them in the
# model: the Linear / Conv1D layers inside its attention modules, recognised by the role their names give them.
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)  # a module's attribute or class name
_QUERY = re.compile(r"(q|query|wq)(_?proj|_lin)?", re.IGNORECASE)
_VALUE = re.compile(r"(v|value|wv)(_?proj|_lin)?", re.IGNORECASE)
_FUSED_QKV = re.compile(r"c_attn|query_key_value|w?qkv(_?proj)?|in_proj|w_pack", re.IGNORECASE)


def _attention_projections(model: nn.Module) -> dict[str, str]:
    """Full name -> leaf name of every Linear / Conv1D layer inside an attention module of ``model``."""
    linear = module_types()["linear"] + module_types()["conv1d"]
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if not name or not (_ATTENTION.search(leaf) or _ATTENTION.search(type(module).__name__)):
            continue
        for sub, child in module.named_modules(prefix=name):
            if sub != name and isinstance(child, linear):
                found[sub] = sub.rsplit(".", 1)[-1]
    return found


def _as_patterns(model: nn.Module, chosen: list[str], leaves: dict[str, str]) -> list[str]:
    """The leaf names of ``chosen`` (PEFT's list style, e.g. ["q_proj", "v_proj"]) when they select exactly those
    modules; else the full names (a leaf name also used outside attention must not widen the selection)."""
    names = list(dict.fromkeys(leaves[n] for n in chosen))
    selected = {n for n, _ in model.named_modules() if any(match_name(p, n) for p in names)}
    return names if selected == set(chosen) else chosen


def default_targets(model: nn.Module) -> list[str]:
    """The attention's query and value projections (or its fused q/k/v projection) of ``model``, as PEFT's
    default ``target_modules`` name them for the architectures it knows."""
    leaves = _attention_projections(model)
    query = [n for n, leaf in leaves.items() if _QUERY.fullmatch(leaf)]
    value = [n for n, leaf in leaves.items() if _VALUE.fullmatch(leaf)]
    if query and value:
        return _as_patterns(model, query + value, leaves)
    fused = [n for n, leaf in leaves.items() if _FUSED_QKV.fullmatch(leaf)]
    if fused:
        return _as_patterns(model, fused, leaves)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    seen = ", ".join(sorted(set(leaves.values()))[:12]) or "no Linear layer inside a module named like attention"
    raise DeltatuneError(
        f"no default LoRA targets for {type(model).__name__} (model_type={model_type!r}): its attention has no "
        f"recognisable query/value or fused qkv projection (found: {seen}); pass targets=[...], e.g. "
        "targets=['q_proj', 'v_proj'] or targets=['all-linear']"
    )


def add_trained_extras(model: nn.Module, modules: list[tuple[str, nn.Module]], bias: str,
                       modules_to_save: list[str] | None, forms: dict, what: str) -> None:
    """PEFT's ``bias`` ("all" / "lora_only") and ``modules_to_save`` options, shared by the LoRA-like methods:
    dense deltas on those tensors, added to ``forms`` (``modules``: the low-rank targets)."""
    extra: list[tuple[str, nn.Parameter]] = []
    if bias == "all":
        extra += [(n, p) for n, p in model.named_parameters() if n == "bias" or n.endswith(".bias")]
    elif bias == "lora_only":
        extra += [(f"{n}.bias", m.bias) for n, m in modules if getattr(m, "bias", None) is not None]
    if modules_to_save:
        saved = select_modules(model, modules_to_save)
        extra += [(f"{n}.{pn}", p) for n, m in saved for pn, p in m.named_parameters()]
    for name, form in dense_forms(model, extra).items():
        if name in forms:
            raise DeltatuneError(f"{name} is both a {what} target and fully trained: drop it from modules_to_save")
        forms[name] = form

