"""Hugging Face PEFT adapter format: export low-rank deltas to it, import LoRA adapters from it.

On disk PEFT writes ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` (r, in) / ``.lora_B.weight`` (out, r);
embeddings use ``.lora_embedding_A`` (r, num) / ``.lora_embedding_B`` (dim, r). Fully trained
tensors (``bias="all"``, ``modules_to_save``) are stored as their trained *values*. We emit exact
module paths as ``target_modules`` and per-module ``rank_pattern`` / ``alpha_pattern`` where ranks
differ, so PEFT rebuilds exactly our modules and scales.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from deltatune.core import artifact
from deltatune.core.forms.dense import Dense
from deltatune.core.forms.lowrank import LowRank
from deltatune.core.tuned import Tuned, attach
from deltatune.errors import DeltatuneError
from deltatune.methods.lora import pattern_value

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_VERSION = "0.21.2"  # the version whose format we write and test against

_TASKS = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
)


def task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    return next((task for suffix, task in _TASKS if name.endswith(suffix)), None)


def _module_of(form_name: str) -> str:
    return form_name.rsplit(".", 1)[0]


def export_peft(tuned: Tuned, out: str | os.PathLike) -> Path:
    """Write ``tuned``'s delta as a PEFT LoRA adapter (``PeftModel.from_pretrained`` loads it unchanged)."""
    forms = tuned.forms()
    low = {n: f for n, f in forms.items() if isinstance(f, LowRank)}
    dense = {n: f for n, f in forms.items() if isinstance(f, Dense)}
    other = [n for n in forms if n not in low and n not in dense]
    if not low or other:
        raise DeltatuneError(
            f"method {tuned.method.name!r} has no PEFT LoRA equivalent (PEFT export needs low-rank deltas, "
            f"plus optional dense ones{'; found ' + forms[other[0]].kind if other else ''})"
        )
    if tuned.merged:
        raise DeltatuneError("the delta is merged into the base; unmerge() before exporting it")
    tensors: dict[str, torch.Tensor] = {}
    for name, f in low.items():
        path = PREFIX + _module_of(name)
        if f.layout == "embedding":
            tensors[f"{path}.lora_embedding_A"], tensors[f"{path}.lora_embedding_B"] = f.A, f.B
        else:
            tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"] = f.A, f.B
    biases_only = all(n.endswith(".bias") for n in dense)
    for name, f in dense.items():  # PEFT stores trained values, not differences
        tensors[PREFIX + name] = (f.base + f.delta).detach()

    ranks = {_module_of(n): f.r for n, f in low.items()}
    alphas = {_module_of(n): f.alpha for n, f in low.items()}
    rslora = {f.use_rslora for f in low.values()}
    if len(rslora) > 1:
        raise DeltatuneError("PEFT has one use_rslora flag per adapter; this delta mixes both scalings")
    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    a0 = max(set(alphas.values()), key=list(alphas.values()).count)
    bias_mode = "none"
    if dense and biases_only:
        targeted = {_module_of(n) for n in low}
        bias_mode = "lora_only" if {_module_of(n) for n in dense} <= targeted else "all"
    modules_to_save = None
    if dense and not biases_only:
        modules_to_save = sorted({_module_of(n) for n in dense})
    cfg = getattr(tuned.model, "config", None)
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type(tuned.model),
        "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or None,
        "revision": None,
        "inference_mode": True,
        "r": r0,
        "lora_alpha": a0,
        "lora_dropout": float(getattr(tuned.config, "dropout", 0.0)),
        "target_modules": sorted(ranks),
        "exclude_modules": None,
        "bias": bias_mode,
        "fan_in_fan_out": any(f.layout == "conv1d" for f in low.values()),
        "use_rslora": rslora.pop(),
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": modules_to_save,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {re.escape(m): r for m, r in ranks.items() if r != r0},
        "alpha_pattern": {re.escape(m): a for m, a in alphas.items() if a != a0},
        "lora_bias": False,
        "peft_version": PEFT_VERSION,
        "exported_by": f"deltatune (method {tuned.method.name})",
    }
    if any(f.layout == "conv1d" for f in low.values()) and any(f.layout == "linear" for f in low.values()):
        raise DeltatuneError("PEFT has one fan_in_fan_out flag per adapter; this delta mixes Conv1D and Linear targets")
    blob = artifact.tensors_to_bytes(tensors, {"format": "pt"})
    files = {WEIGHTS_FILE: blob, CONFIG_FILE: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()}
    artifact.atomic_write_dir(out, files)
    return Path(out)


def read_peft(adapter: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    path = Path(adapter)
    cfg_path, w_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise DeltatuneError(f"{path} is not a PEFT adapter folder: {CONFIG_FILE} is missing")
    if not w_path.is_file():
        legacy = " (only a pickled adapter_model.bin is there: re-save it with safetensors; deltatune never reads pickle)"
        raise DeltatuneError(f"{w_path} is missing{legacy if (path / 'adapter_model.bin').exists() else ''}")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DeltatuneError(f"{cfg_path} is not valid JSON: {e}") from e
    try:
        tensors = load_file(w_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise DeltatuneError(f"{w_path} is truncated or corrupted: {e}") from e
    return config, tensors


_LORA_KEY = re.compile(r"^(?P<mod>.+)\.(?:lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")


def import_peft(model: nn.Module, adapter: str | os.PathLike) -> Tuned:
    """Attach a PEFT LoRA adapter to ``model`` as a deltatune ``lora`` delta (same logits as PEFT)."""
    config, raw = read_peft(adapter)
    if config.get("peft_type") != "LORA":
        raise DeltatuneError(f"{adapter} is a {config.get('peft_type')!r} adapter; only PEFT LoRA adapters import")
    for key, why in (("use_dora", "DoRA"), ("lora_bias", "lora_bias (a bias on B)")):
        if config.get(key):
            raise DeltatuneError(f"{adapter} uses {why}, which deltatune does not import yet")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() in {"pissa", "corda", "olora", "loftq"}:
        raise DeltatuneError(
            f"{adapter} was initialised with {init!r}, which rewrites the base weights: convert it to a plain "
            "LoRA with PEFT (path_initial_model_for_weight_conversion) before importing"
        )
    tensors = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in raw.items()}
    tensors = {re.sub(r"\.lora_(A|B)\.[^.]+\.weight$", r".lora_\1.weight", k): v for k, v in tensors.items()}
    lora_modules = sorted({m.group("mod") for k in tensors if (m := _LORA_KEY.match(k))})
    if not lora_modules:
        raise DeltatuneError(f"{adapter} holds no LoRA tensors (keys like '<module>.lora_A.weight')")
    # current PEFT writes fully trained tensors as "<path>.<param>"; older files as "<path>.modules_to_save.<param>"
    saved_values = {
        re.sub(r"\.modules_to_save\.(?:[^.]+\.)?(?=[^.]+$)", ".", k): v for k, v in tensors.items() if not _LORA_KEY.match(k)
    }

    ranks = {}
    for mod in lora_modules:
        a = tensors.get(f"{mod}.lora_A.weight", tensors.get(f"{mod}.lora_embedding_A"))
        ranks[mod] = int(a.shape[0])
    alpha = float(config.get("lora_alpha", 8))
    alpha_pattern = {re.escape(m): float(pattern_value(config.get("alpha_pattern") or {}, m, alpha)) for m in lora_modules}
    bias = config.get("bias", "none")
    non_bias = [k for k in saved_values if not k.endswith(".bias")]
    modules_to_save = sorted({k.rsplit(".", 1)[0] for k in non_bias}) or None
    tuned = attach(
        model,
        "lora",
        r=int(config.get("r", 8)),
        alpha=alpha,
        dropout=float(config.get("lora_dropout", 0.0)),
        targets=lora_modules,
        use_rslora=bool(config.get("use_rslora", False)),
        bias=bias if bias in ("none", "all", "lora_only") else "none",
        rank_pattern={re.escape(m): r for m, r in ranks.items()},
        alpha_pattern=alpha_pattern,
        modules_to_save=modules_to_save,
    )
    forms = tuned.forms()
    with torch.no_grad():
        for mod in lora_modules:
            form = forms[f"{mod}.weight"]
            assert isinstance(form, LowRank)
            emb = form.layout == "embedding"
            form.load_stored({
                "A": tensors[f"{mod}.lora_embedding_A" if emb else f"{mod}.lora_A.weight"],
                "B": tensors[f"{mod}.lora_embedding_B" if emb else f"{mod}.lora_B.weight"],
            })
        for name, value in saved_values.items():
            if name not in forms:
                continue  # a bias PEFT saved but this config does not train: its value is the base value
            form = forms[name]
            assert isinstance(form, Dense)
            form.delta.copy_(value.to(form.base.dtype) - form.base)
    return tuned

