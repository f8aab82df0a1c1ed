"""(IA)³ (Liu et al., 2022, arXiv 2205.05638): learned vectors that rescale inner activations, with Hugging Face
PEFT's defaults (``IA3Config``, 0.21.2).

Each targeted Linear / GPT-2 Conv1D layer gets one vector l, initialised to ones (the base model). A *feedforward*
module (PEFT's ``feedforward_modules``: the FFN's down projection by default) scales its input, W0·(l ⊙ x); any
other target scales its output, l ⊙ (W0·x + b). By default the targets are PEFT's for the architecture: the attention's
keys and values and the FFN's down projection on Llama (its table, copied below, as PEFT's choice differs per model
type); elsewhere the key / value projections (or the fused qkv one) and the FFN's output projection found in the model.

Merging folds l into W (and into the bias of an output scaling): ``deltatune.core.forms.scaling``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from deltatune.core import architectures
from deltatune.core.forms.base import Form
from deltatune.core.forms.scaling import ScaledBias, Scaling
from deltatune.core.registry import Built, PeftFormat, Traits, register
from deltatune.core.targeting import module_types, select_modules, sites_of
from deltatune.errors import DeltatuneError
from deltatune.methods._lowrank import add_trained_extras

# PEFT 0.21.2's per-architecture defaults (peft.utils.constants: TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING and
# ..._FEEDFORWARD_MODULES_MAPPING), copied so that a default IA³ delta adapts exactly PEFT's modules; but mixtral's,
# whose w2 is gone in transformers 5 (its experts are fused 3-D tensors: no Linear to scale)
PEFT_TARGETS: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"], "mt5": ["k", "v", "wi_1"], "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"], "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"], "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"], "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"], "gpt_bigcode": ["c_attn", "mlp.c_proj"], "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"], "deberta": ["in_proj", "output.dense"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"], "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"], "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"], "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}
PEFT_FEEDFORWARD: dict[str, list[str]] = {
    "t5": ["wo"], "mt5": [], "gpt2": ["mlp.c_proj"], "bloom": ["mlp.dense_4h_to_h"], "roberta": ["output.dense"],
    "opt": ["fc2"], "gptj": ["fc_out"], "gpt_neox": ["dense_4h_to_h"], "gpt_neo": ["c_proj"], "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"], "llama": ["down_proj"], "llama4": ["down_proj"], "mistral": ["down_proj"],
    "bert": ["output.dense"], "deberta-v2": ["output.dense"], "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"], "RefinedWebModel": ["dense_4h_to_h"], "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"], "gemma": ["down_proj"], "gemma2": ["down_proj"], "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"], "qwen3": ["down_proj"],
}

# an architecture PEFT has no default for: its attention's key / value (or fused qkv) projections and its FFN's
# output projection, recognised by their names
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)
_KEY_VALUE = re.compile(r"(k|key|wk|v|value|wv)(_?proj|_lin)?|c_attn|query_key_value|w?qkv(_?proj)?|in_proj|w_pack",
                        re.IGNORECASE)
_FFN = re.compile(r"mlp|ffn|feed_?forward", re.IGNORECASE)
_FFN_OUT = re.compile(r"down_proj|fc2|fc_out|c_proj|dense_4h_to_h|w2|wo|out_proj", re.IGNORECASE)


@dataclass
class IA3Config:
    # module patterns; None: PEFT's default for the architecture (Llama: k_proj, v_proj, down_proj)
    targets: list[str] | None = None
    # targets whose input is scaled (the others' output), PEFT's feedforward_modules: a name a target's full name ends
    # with (as PEFT compares), or 're:<regex>' on the full name; None: PEFT's default (Llama: down_proj)
    feedforward: list[str] | None = None
    layers: list[int] | str | None = None  # blocks: an index, a list, or 'start:stop' (None: all)
    types: list[str] | None = None  # module types kept: linear, conv1d (None: all)
    exclude: list[str] | None = None  # name patterns left out (as in targets)
    init: bool = True  # True: vectors of ones (the base model); False: random normal (PEFT's init_ia3_weights; tests)
    modules_to_save: list[str] | None = None  # modules trained fully (e.g. a classifier head)


def _found_defaults(model: nn.Module) -> tuple[list[str], list[str]]:
    """Key / value projections inside attention and FFN output projections, for a model PEFT has no default for."""
    linear = module_types()["linear"] + module_types()["conv1d"]
    kv: list[str] = []
    down: list[str] = []
    for name, module in model.named_modules():
        if not name or not isinstance(module, linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        parents = name.split(".")[:-1]
        if any(_ATTENTION.search(p) for p in parents) and _KEY_VALUE.fullmatch(leaf):
            kv.append(name)
        elif any(_FFN.search(p) for p in parents) and _FFN_OUT.fullmatch(leaf):
            down.append(name)
    if not kv or not down:  # the names say nothing: what the architecture table knows (core/architectures.py)
        roles = architectures.projections(model)
        kv = roles.get("key", []) + roles.get("value", []) + roles.get("qkv", [])
        down = roles.get("ffn_out", [])
    if not kv or not down:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise DeltatuneError(
            f"no default IA³ targets for {type(model).__name__} (model_type={model_type!r}): PEFT has none for it and "
            "no key/value and FFN output projections were recognised; pass targets=[...] and feedforward=[...], e.g. "
            "targets=['k_proj', 'v_proj', 'down_proj'], feedforward=['down_proj']"
        )
    return kv + down, down


def defaults(model: nn.Module) -> tuple[list[str], list[str]]:
    """PEFT's (targets, feedforward modules) for ``model``'s architecture, else those found in it."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in PEFT_TARGETS:
        return list(PEFT_TARGETS[model_type]), list(PEFT_FEEDFORWARD[model_type])
    return _found_defaults(model)


def is_feedforward(name: str, patterns: list[str]) -> bool:
    """PEFT's test (IA3Model._check_target_module_feedforward): a plain name matches when the module's full name ends
    with it (no dot needed, as PEFT compares), a 're:' one when the regex matches the full name."""
    return any(re.fullmatch(p[3:], name) is not None if p.startswith("re:") else name.endswith(p) for p in patterns)


def build_forms(model: nn.Module, cfg: IA3Config) -> dict[str, Form]:
    default_targets, default_ff = defaults(model) if cfg.targets is None or cfg.feedforward is None else ([], [])
    targets = cfg.targets if cfg.targets is not None else default_targets
    feedforward = cfg.feedforward if cfg.feedforward is not None else default_ff
    modules = select_modules(model, targets, layers=cfg.layers, types=cfg.types, exclude=cfg.exclude)
    if cfg.feedforward is not None:  # a name no target ends with is a typo, not a choice (PEFT refuses it too)
        unused = [p for p in cfg.feedforward if not any(is_feedforward(n, [p]) for n, _ in modules)]
        if unused:
            raise DeltatuneError(
                f"feedforward={unused} names no targeted module: each entry must be a name a target's full name ends "
                f"with (or 're:<regex>'); targeted here: {', '.join(n for n, _ in modules[:4])}"
                f"{', ...' if len(modules) > 4 else ''}"
            )
    forms: dict[str, Form] = {}
    for name, module in modules:
        form = Scaling(module, on_input=is_feedforward(name, feedforward),
                       tied=[s for s in sites_of(model, module.weight) if s[0] is not module])
        if not cfg.init:
            with torch.no_grad():
                form.scale.normal_()  # PEFT's init_ia3_weights=False: torch.randn
        forms[f"{name}.weight"] = form
        if not form.on_input and getattr(module, "bias", None) is not None:
            forms[f"{name}.bias"] = ScaledBias(form)
    add_trained_extras(model, modules, "none", cfg.modules_to_save, forms, "IA³")
    return forms


# -- PEFT's IA3 adapters ---------------------------------------------------------------------------------------------
def _to_peft(cfg: IA3Config, forms: dict[str, Form], model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    tensors: dict[str, Any] = {}
    feedforward: list[str] = []
    conv1d = False
    for name, form in forms.items():
        if isinstance(form, ScaledBias):
            continue  # its vector is its weight form's
        if not isinstance(form, Scaling):
            raise DeltatuneError(f"{name} is a {form.kind} delta, which PEFT's IA3 adapter cannot hold")
        module = name.rsplit(".", 1)[0]
        # PEFT's ia3_l: (1, in) for a feedforward module, (out, 1) otherwise
        shape = (1, -1) if form.on_input else (-1, 1)
        tensors[f"{module}.ia3_l"] = form.scale.detach().reshape(shape)
        if form.on_input:
            feedforward.append(module)
        conv1d = conv1d or form.layout == "conv1d"
    targets = sorted(k.rsplit(".", 1)[0] for k in tensors)
    # exact module paths: PEFT's list test is "ends with", so each path matches exactly its own module
    return tensors, {"target_modules": targets, "feedforward_modules": sorted(feedforward), "fan_in_fan_out": conv1d,
                     "init_ia3_weights": True, "exclude_modules": None}


def _from_peft(config: dict[str, Any], layers: dict[str, dict[str, Any]], extra: dict[str, Any],
               model: nn.Module) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    ff = config.get("feedforward_modules")
    patterns = ([f"re:{ff}"] if isinstance(ff, str) else list(ff)) if ff is not None else defaults(model)[1]
    modules = sorted(layers)
    # each module's own path (anchored): the adapter's modules exactly, whatever its target_modules said
    feedforward = [f"re:{re.escape(m)}" for m in modules if is_feedforward(m, patterns)]
    options = {"targets": modules, "feedforward": feedforward}
    tensors = {}
    for module, parts in layers.items():
        vector = parts["ia3_l"]
        on_input = is_feedforward(module, patterns)
        if vector.dim() != 2 or vector.shape[0 if on_input else 1] != 1:
            raise DeltatuneError(
                f"{module}.ia3_l has shape {tuple(vector.shape)}: PEFT stores (1, in) for a feedforward module and "
                f"(out, 1) otherwise, and {module} is {'' if on_input else 'not '}one by the adapter's "
                "feedforward_modules"
            )
        tensors[f"{module}.weight"] = {"scale": vector.reshape(-1)}
    return options, tensors


QUANTIZED_BASE = "its scaling is checked against PEFT on full-precision layers only"


@register("ia3", IA3Config, "(IA)³: learned vectors scale keys, values and the FFN input (Liu et al., 2022); "
          "PEFT-compatible, mergeable", traits=Traits(quantized_base=QUANTIZED_BASE), family="scaling vectors",
          peft=PeftFormat("IA3", ("ia3_l",), _to_peft, _from_peft,
                          config_fields=(("feedforward_modules", "feedforward"), ("init_ia3_weights", "init"))))
def build(model: nn.Module, cfg: IA3Config, *, loading: bool = False) -> Built:
    return Built(build_forms(model, cfg))
