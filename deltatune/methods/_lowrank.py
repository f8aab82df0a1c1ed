"""What the LoRA-like methods share (LoRA, DoRA, KaSA, CorDA, DSEE, the adapters): where they go by default,
PEFT's rank / alpha patterns, and PEFT's ``bias`` / ``modules_to_save`` options."""

from __future__ import annotations

import math
import re
import warnings

import torch.nn as nn

from deltatune.core.targeting import select_modules
from deltatune.errors import DeltatuneError
from deltatune.methods._common import dense_forms

# The paper adapts W_q and W_v; PEFT's per-architecture defaults say where those live.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "opt": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "t5": ["q", "v"],
}


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


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    raise DeltatuneError(
        f"no default LoRA targets for {type(model).__name__} (model_type={model_type!r}): pass targets=[...], "
        "e.g. targets=['q_proj', 'v_proj'] or types=['linear'] with targets=['*']"
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

