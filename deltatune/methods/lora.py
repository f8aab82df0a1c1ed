"""LoRA (Hu et al., 2021, arXiv 2106.09685) with Hugging Face PEFT's defaults and options.

ΔW = s·B·A on each targeted Linear / GPT-2 Conv1D / Embedding, s = alpha/r (rsLoRA: alpha/√r),
A Kaiming-uniform and B zero (embeddings: A zero, B normal), so training starts at the base model.
``bias`` and ``modules_to_save`` train base tensors fully, as dense deltas next to the low-rank ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch.nn as nn

from deltatune.core.forms.base import Form
from deltatune.core.forms.lowrank import LowRank
from deltatune.core.registry import Built, register
from deltatune.core.targeting import select_modules, sites_of
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


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 8.0  # PEFT's lora_alpha default; scale = alpha / r
    dropout: float = 0.0  # on the LoRA branch only
    targets: list[str] | None = None  # module patterns; None: the architecture's q/v projections
    layers: list[int] | str | None = None
    types: list[str] | None = None
    exclude: list[str] | None = None
    use_rslora: bool = False  # scale = alpha / sqrt(r) (Kalajdzievski, 2023)
    init: bool | str = True  # True (Kaiming A, zero B) | "gaussian" | False (random B: tests only)
    bias: Literal["none", "all", "lora_only"] = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)  # PEFT semantics: module-name regex -> r
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None  # modules trained fully (e.g. a classifier head)

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"r={self.r} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")


def pattern_value(patterns: dict, module_name: str, default: float) -> float:
    """PEFT's rank/alpha pattern lookup: a key matches a module name or a dotted suffix of it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    raise DeltatuneError(
        f"no default LoRA targets for {type(model).__name__} (model_type={model_type!r}): pass targets=[...], "
        "e.g. targets=['q_proj', 'v_proj'] or types=['linear'] with targets=['*']"
    )


@register("lora", LoraConfig, "LoRA: low-rank ΔW = (alpha/r)·B·A on chosen layers (PEFT-compatible)")
def build(model: nn.Module, cfg: LoraConfig, *, loading: bool = False) -> Built:
    targets = cfg.targets or default_targets(model)
    modules = select_modules(model, targets, layers=cfg.layers, types=cfg.types, exclude=cfg.exclude)
    forms: dict[str, Form] = {}
    for name, module in modules:
        r = int(pattern_value(cfg.rank_pattern, name, cfg.r))
        alpha = pattern_value(cfg.alpha_pattern, name, cfg.alpha)
        forms[f"{name}.weight"] = LowRank(
            module, r, alpha, use_rslora=cfg.use_rslora, dropout=cfg.dropout, init=cfg.init,
            tied=[s for s in sites_of(model, module.weight) if s[0] is not module],
        )
    add_trained_extras(model, modules, cfg.bias, cfg.modules_to_save, forms, "LoRA")
    return Built(forms)


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

