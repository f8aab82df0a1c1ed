"""Hugging Face PEFT adapter format: export deltas to it (low-rank ones exactly, any weight-side one as a LoRA by
truncated SVD), import LoRA adapters from it; and the same both ways for every other PEFT type a method declares where
it registers (``registry.PeftFormat``, e.g. PEFT's IA3 or VERA), with no method named here. PEFT's config objects
given to ``dt.attach`` convert the same way: ``LoraConfig`` here, another type's through its ``PeftFormat.config_fields``.

On disk PEFT writes ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` (r, in) / ``.lora_B.weight`` (out, r);
embeddings use ``.lora_embedding_A`` (r, num) / ``.lora_embedding_B`` (dim, r). Fully trained
tensors (``bias``, ``modules_to_save``) are stored as their trained *values*; the bias of a module
that carries a LoRA layer lives under ``<path>.base_layer.bias`` (PEFT's wrapper keeps the original
module as ``base_layer``, and silently ignores a ``<path>.bias`` key). We emit exact module paths as
``target_modules`` / ``modules_to_save`` and per-module ``rank_pattern`` / ``alpha_pattern`` where
ranks differ, so PEFT rebuilds exactly our modules and scales. DoRA deltas (method ``dora``) export with
``use_dora: true`` and their magnitude under ``<module path>.lora_magnitude_vector`` (no ``.weight`` on disk, as
PEFT saves it); a DoRA adapter imports back as a ``dora`` delta. A PiSSA / OLoRA delta (lora's ``init: pissa |
pissa_niter_K | olora``, s·(B·A − B₀·A₀)) exports exactly as PEFT's converted LoRA for the original base (rank 2r,
A' = [A; A₀], B' = [B, −B₀]); an unconverted PEFT PiSSA / OLoRA adapter, which fits only PEFT's rewritten base, imports
with B₀, A₀ computed again from the original base (not ``pissa_niter_K``: a random draw). An EVA adapter
(``init_lora_weights="eva"``) is a plain LoRA once initialised (the base is not rewritten): it imports as ``lora`` with
its ranks, and a lora ``init: eva`` delta exports as a plain LoRA with its ``rank_pattern``.
LoRA on a convolution is PEFT's conv layer (``lora_A.weight`` (r, in, *kernel), ``lora_B.weight`` (out, r, 1, …)).
Parameters adapted by name (``target_parameters``: an MoE's expert stacks, its router's weight) are PEFT's
``ParamWrapper`` layers: one per parameter on the module that holds it, nested in the module's parameter order, so
the first parameter's tensors are at ``<module>.base_layer…base_layer.lora_A.weight`` (one ``base_layer`` per later
one) and the last one's at ``<module>.lora_A.weight``; an expert stack's E pairs are PEFT's ``lora_A.weight``
(E·r, in), row e·r + k, and ``lora_B.weight`` (out, r·E), column k·E + e.

A method with a ``PeftFormat`` converts its own forms (``_method_files``, ``_import_method``); this module does the rest
as for LoRA: the files, PEFT's key prefix, the task type, fully trained tensors (``modules_to_save``, biases, a fresh
head) and attaching.

``export_peft(tuned, out, rank=R)`` writes any weight-side delta (sparse, dense, low-rank, DoRA, sums of forms) as a
LoRA adapter: each changed weight matrix becomes the truncated SVD of its ΔW at rank R, biases and norm weights
travel as trained values, and ``export-report.json`` gives ‖ΔW − B·A‖_F / ‖ΔW‖_F per tensor (``svd_adapter``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import types
import typing
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from deltatune.core import artifact, registry
from deltatune.core.forms.base import WeightDelta
from deltatune.core.forms.dense import Dense
from deltatune.core.forms.lowrank import ConvLowRank, LowRank, ParamLowRank, layout_of
from deltatune.core.targeting import ALL_LINEAR, all_linear, layer_index, match_name, module_types
from deltatune.core.tuned import Tuned, attach, carried_by, register_config_converter
from deltatune.data import models
from deltatune.errors import DeltatuneError
from deltatune.methods._lowrank import ResidualLowRank, default_targets, pattern_value, residual_init
from deltatune.methods._token_rows import PEFT_TENSOR, TokenRows
from deltatune.methods.dora import DoRA
from deltatune.version import __version__

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CARD_FILE = "README.md"  # the model card PEFT's save_pretrained writes next to the adapter
PEFT_VERSION = "0.21.2"  # the version whose format we write and test against
MAGNITUDE = "lora_magnitude_vector"  # DoRA's magnitude vector, PEFT's key on disk (no ".weight")
REPORT_FILE = "export-report.json"  # what an SVD export did to each tensor (PEFT ignores the file)

# (artifact.OUTPUT_KINDS["peft"] lists REPORT_FILE: a second SVD export replaces the first without --overwrite)

_TASKS = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),  # GPT-2 and friends
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
)


def task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for a transformers model class (None: a plain ``PeftModel``)."""
    name = type(model).__name__
    if name.endswith("ForConditionalGeneration"):  # T5/BART are seq2seq; LLaVA-style models are causal
        return "SEQ_2_SEQ_LM" if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else "CAUSAL_LM"
    return next((task for suffix, task in _TASKS if name.endswith(suffix)), None)


# modules PEFT's task classes add to modules_to_save on their own
_TASK_SAVED = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def _unparametrized(key: str) -> str:
    """A state-dict key as the model has it without torch parametrisations (deltatune's dense deltas)."""
    return re.sub(r"(^|\.)parametrizations\.([^.]+)\.original$", r"\1\2", key)


def _module_of(form_name: str) -> str:
    return form_name.rsplit(".", 1)[0]


def _number(x: float) -> int | float:
    """PEFT types ``lora_alpha`` as int: write integral values as ints."""
    return int(x) if float(x).is_integer() else float(x)


@dataclass
class _Layer:
    """One PEFT LoRA layer as the adapter file holds it: ΔW = (alpha / r) · B A (alpha / √r with rsLoRA)."""

    A: torch.Tensor
    B: torch.Tensor
    r: int
    alpha: float
    layout: str  # LowRank's layouts: "linear", "conv1d", "embedding", "conv", "param" or "experts"
    dropout: float = 0.0
    magnitude: torch.Tensor | None = None  # DoRA's magnitude vector
    param: str | None = None  # a target parameter's attribute on its module (its layer is keyed by its full name)


@dataclass
class _Adapter:
    """What an export writes: LoRA layers by module path, and fully trained tensors by "<module path>.<tensor>"
    (their trained values, as PEFT stores them)."""

    layers: dict[str, _Layer]
    trained: dict[str, torch.Tensor]
    rslora: bool = False
    dora: bool = False
    # LoRA's trainable_token_indices: embedding module path -> (token ids, the rows' trained values)
    tokens: dict[str, tuple[list[int], torch.Tensor]] = dataclasses.field(default_factory=dict)


def export_peft(tuned: Tuned, out: str | os.PathLike, *, rank: int | None = None, overwrite: bool = False) -> Path:
    """Write ``tuned``'s delta as a PEFT adapter (``PeftModel.from_pretrained`` loads it unchanged) at ``out``:
    a new or empty folder, or a PEFT adapter (replaced atomically); ``overwrite`` replaces any other folder.

    Without ``rank`` a low-rank delta is written exactly as it is (its own factors), as a LoRA adapter, and a method
    with a PEFT type of its own (``registry.PeftFormat``) as an adapter of that type. With ``rank`` every weight-side
    delta (sparse, dense, low-rank, DoRA, sums of them) becomes a LoRA of that rank by truncated SVD of each
    tensor's ΔW (see ``svd_adapter``), and ``export-report.json`` beside the adapter gives the error per tensor."""
    if tuned.merged:
        raise DeltatuneError("the delta is merged into the base; unmerge() before exporting it")
    report: dict[str, Any] | None = None
    codec = tuned.method.peft
    if rank is None and codec is not None:  # the method's own PEFT type: exact
        tensors, config = _method_files(tuned, codec)
    elif rank is None:
        tensors, config = _adapter_files(tuned.model, _exact_adapter(tuned))
    else:
        adapter, report = svd_adapter(tuned, rank)
        tensors, config = _adapter_files(tuned.model, adapter)
    base = base_reference(getattr(getattr(tuned.model, "config", None), "_name_or_path", None))
    config["base_model_name_or_path"] = base.path
    card = model_card(base, config, tuned.method.name, out, svd_rank=rank)
    json_files: dict[str, Any] = {CONFIG_FILE: config, **({REPORT_FILE: report} if report else {})}
    with artifact.destination(out, "peft", overwrite=overwrite) as dest:
        dest.write_tensors(tensors, WEIGHTS_FILE, json_files, text_files={CARD_FILE: card})
    return Path(out)


def _method_files(tuned: Tuned, codec: registry.PeftFormat) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter of a method that declares its own PEFT type (``registry.PeftFormat``): its layers as the method
    writes them, its dense deltas (``modules_to_save``, biases, a fresh head) as trained values."""
    forms = tuned.forms()
    dense = {n: f for n, f in forms.items() if isinstance(f, Dense) and f.kind == Dense.kind}
    layers, fields = codec.export(tuned.method_config, {n: f for n, f in forms.items() if n not in dense}, tuned.model)
    adapted = {_module_of(k) for k in layers}
    tensors = {PREFIX + k: v.detach().contiguous() for k, v in layers.items()}
    more, task, bias_modules, saved_modules = _trained_files(tuned.model, _dense_values(tuned.model, dense.values()),
                                                             adapted)
    tensors.update(more)
    bias_mode = "none"
    if bias_modules:
        if codec.bias_only is None:
            raise DeltatuneError(f"PEFT's {codec.peft_type} adapter has no bias option: it cannot hold the trained "
                                 f"bias of {sorted(bias_modules)[0]}")
        bias_mode = codec.bias_only if bias_modules <= adapted else "all"
    # a type whose method trains no module fully has no modules_to_save in PEFT's config either (TRAINABLE_TOKENS)
    has_saved = "modules_to_save" in {f.name for f in dataclasses.fields(tuned.method.config_cls)}
    if saved_modules and not has_saved:
        raise DeltatuneError(f"PEFT's {codec.peft_type} adapter has no modules_to_save: it cannot hold the fully "
                             f"trained {saved_modules[0]}")
    config: dict[str, Any] = {"peft_type": codec.peft_type, "task_type": task, "base_model_name_or_path": None,
                              "revision": None, "inference_mode": True, **fields,
                              **({"bias": bias_mode} if codec.bias_only is not None else {}),
                              **({"modules_to_save": saved_modules or None} if has_saved else {}),
                              "peft_version": PEFT_VERSION}
    if task is None:  # AutoPeftModel finds the model class here when no task type names it (PEFT writes it too)
        config["auto_mapping"] = {"base_model_class": type(tuned.model).__name__,
                                  "parent_library": type(tuned.model).__module__}
    return tensors, config


def _weight_side(form: Any) -> bool:
    """A delta added to a base tensor that merge can fold into it (what an SVD export can express)."""
    return isinstance(form, WeightDelta) and form.mergeable


def _first_names(model: nn.Module) -> dict[int, str]:
    """id(module) -> its first name (a module reachable under two names is named once)."""
    names: dict[int, str] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), n)
    return names


def _exact_adapter(tuned: Tuned) -> _Adapter:
    """The delta's own LoRA / DoRA factors, plus its dense tensors as trained values: no approximation."""
    forms = tuned.forms()
    low = {n: f for n, f in forms.items()
           if isinstance(f, LowRank) and f.kind in (LowRank.kind, DoRA.kind, ResidualLowRank.kind)}
    dense = {n: f for n, f in forms.items() if isinstance(f, Dense) and f.kind == Dense.kind}
    rows = {n: f for n, f in forms.items() if isinstance(f, TokenRows) and tuned.method.name == "lora"}
    other = [n for n in forms if n not in low and n not in dense and n not in rows]
    if not low or other:
        svd = all(_weight_side(f) for f in forms.values()) and forms
        raise DeltatuneError(
            f"method {tuned.method.name!r} has no PEFT LoRA equivalent (PEFT export needs low-rank deltas, "
            f"plus optional dense ones{'; found ' + forms[other[0]].kind + ' at ' + other[0] if other else ''})"
            + ("; pass rank=R (--rank R) to export its ΔW as a rank-R LoRA by truncated SVD" if svd else "")
        )
    rslora = {f.use_rslora for f in low.values()}
    if len(rslora) > 1:
        raise DeltatuneError("PEFT has one use_rslora flag per adapter; this delta mixes both scalings")
    dora = {n for n, f in low.items() if isinstance(f, DoRA)}
    if dora and len(dora) != len(low):
        raise DeltatuneError("PEFT has one use_dora flag per adapter; this delta mixes LoRA and DoRA modules")
    for name, f in low.items():
        if isinstance(f, ConvLowRank):
            _check_peft_conv(name, f.sites[0][0])
    layers = {
        name if isinstance(f, ParamLowRank) else _module_of(name):
        _residual_layer(f) if isinstance(f, ResidualLowRank) else
        _Layer(f.A, f.B, f.r, f.alpha, f.layout, float(getattr(f.dropout, "p", 0.0)),
               f.magnitude if isinstance(f, DoRA) else None, f.param_name if isinstance(f, ParamLowRank) else None)
        for name, f in low.items()
    }
    tokens = {_module_of(n): (list(f.tokens), f.rows().to(f.base.dtype)) for n, f in rows.items()}
    return _Adapter(layers, _dense_values(tuned.model, dense.values()), rslora=rslora.pop(), dora=bool(dora),
                    tokens=tokens)


def _check_peft_conv(name: str, module: nn.Module) -> None:
    """PEFT's conv layer builds A from the base's kernel size, stride and padding only: a dilated or non-zero-padded
    convolution computes something else there."""
    if any(d != 1 for d in module.dilation) or module.padding_mode != "zeros":
        raise DeltatuneError(
            f"{name}: PEFT's conv LoRA layer ignores dilation={tuple(module.dilation)} and "
            f"padding_mode={module.padding_mode!r}, so it would compute another delta; serve this one with deltatune"
        )


def _to_peft_factors(layer: _Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's (lora_A.weight, lora_B.weight) as PEFT stores them: an expert stack's (E, r, in) / (E, out, r) pairs
    become PEFT's (E·r, in) / (out, r·E) (``ParamWrapper.get_delta_weight``'s reshapes), anything else as it is."""
    if layer.layout != "experts":
        return layer.A, layer.B
    experts, r, d_in = layer.A.shape
    return (layer.A.reshape(experts * r, d_in).contiguous(),
            layer.B.permute(1, 2, 0).reshape(layer.B.shape[1], r * experts).contiguous())


def _from_peft_factors(a: torch.Tensor, b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (E·r, in) / (out, r·E) expert factors as (E, r, in) / (E, out, r)."""
    r = a.shape[0] // experts
    return a.reshape(experts, r, a.shape[1]), b.reshape(b.shape[0], r, experts).permute(2, 0, 1)


def _wrapper_paths(owners: dict[str, list[str]]) -> dict[str, str]:
    """Parameter full name -> the module path of its PEFT ``ParamWrapper`` (``owners``: module -> its targeted
    parameters' full names in the module's parameter order; PEFT wraps them in that order, each around the last)."""
    return {name: module + ".base_layer" * (len(names) - 1 - i)
            for module, names in owners.items() for i, name in enumerate(names)}


def _residual_layer(f: ResidualLowRank) -> _Layer:
    """A PiSSA / OLoRA delta s·(B·A − B₀·A₀) as the plain LoRA PEFT converts it to for the original base
    (``save_pretrained(path_initial_model_for_weight_conversion=...)``, peft_model.py / lora ``subtract_mutated_init``):
    A' = [A; A₀], B' = [B, −B₀], so B'·A' = B·A − B₀·A₀, at rank 2r with alpha 2·alpha (√2·alpha with rsLoRA), which
    keeps the scale. Exact; PEFT's dropout would then act on the A₀ half too, which only matters in training."""
    a = torch.cat([f.A.detach(), f.A0.to(f.A.dtype)], dim=0)
    b = torch.cat([f.B.detach(), -f.B0.to(f.B.dtype)], dim=1)
    alpha = f.alpha * (math.sqrt(2) if f.use_rslora else 2)
    return _Layer(a, b, 2 * f.r, alpha, f.layout, float(getattr(f.dropout, "p", 0.0)))


def _dense_values(model: nn.Module, dense: Any) -> dict[str, torch.Tensor]:
    """Dense deltas as PEFT stores them: trained values, not differences, under every module that holds the tensor
    (a tied weight is trained at each of its sites)."""
    module_names = _first_names(model)
    trained: dict[str, torch.Tensor] = {}
    for f in dense:
        value = (f.base + f.delta).detach()
        for m, attr in f.sites:
            trained[f"{module_names[id(m)]}.{attr}"] = value
    return trained


def _adapter_files(model: nn.Module, adapter: _Adapter) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The adapter's safetensors (PEFT's keys) and adapter_config.json (without base_model_name_or_path)."""
    tensors: dict[str, torch.Tensor] = {}
    owners: dict[str, list[str]] = {}  # the layers' order is the forms', built in the model's parameter order
    for name, layer in adapter.layers.items():
        if layer.param is not None:
            owners.setdefault(_module_of(name), []).append(name)
    wrappers = _wrapper_paths(owners)
    for module, layer in adapter.layers.items():
        path = PREFIX + wrappers.get(module, module)
        if layer.layout == "embedding":
            tensors[f"{path}.lora_embedding_A"], tensors[f"{path}.lora_embedding_B"] = layer.A, layer.B
        else:
            tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"] = _to_peft_factors(layer)
        if layer.magnitude is not None:
            tensors[f"{path}.{MAGNITUDE}"] = layer.magnitude
    for module, (_, values) in adapter.tokens.items():  # PEFT saves a tied head's rows under the embedding only
        tensors[f"{PREFIX}{module}.{TOKEN_ADAPTER}.{PEFT_TENSOR}"] = values.contiguous()

    modules = {m for m, layer in adapter.layers.items() if layer.param is None}
    more, task, bias_modules, saved_modules = _trained_files(model, adapter.trained, modules | set(owners))
    tensors.update(more)
    bias_mode = "none"
    if bias_modules:
        bias_mode = "lora_only" if bias_modules <= modules else "all"
    return tensors, _adapter_config(model, adapter, task, bias_mode, saved_modules)


def _trained_files(model: nn.Module, trained: dict[str, torch.Tensor], adapted: set[str]
                   ) -> tuple[dict[str, torch.Tensor], str | None, set[str], list[str]]:
    """Fully trained tensors (by "<module path>.<tensor>") as PEFT saves them next to the adapter layers of the
    modules ``adapted``: their tensors, the task type, the modules whose bias alone trained (PEFT's ``bias`` option)
    and the ``modules_to_save`` entries."""
    # A module with a trained non-bias tensor becomes a modules_to_save entry (PEFT trains a copy of the whole
    # module); a lone trained bias is PEFT's `bias` option.
    tensors: dict[str, torch.Tensor] = {}
    all_modules = [n for n, _ in model.named_modules(remove_duplicate=False)]
    saved_modules = {_module_of(k) for k in trained if not k.endswith(".bias")}
    clash = sorted(saved_modules & adapted)
    if clash:
        raise DeltatuneError(
            f"{clash[0]} carries an adapter layer and a fully trained tensor; PEFT cannot hold both on one module"
        )
    task = task_type(model)
    # PEFT wraps every module whose name *ends with* (no dot needed) a modules_to_save entry, adds its own entries
    # for classification heads, and then insists on a saved value for each tensor of each wrapped module.
    auto = list(_TASK_SAVED.get(task or "", ()))
    if any(p.endswith(a) for p in adapted for a in auto):
        task, auto = None, []  # LoRA on the head: PEFT's task class would wrap it instead; the plain class does not
    entries = sorted(saved_modules) + auto
    wrapped = {n for n in all_modules if n and any(n.endswith(e) for e in entries)}
    hit = sorted(p for p in adapted if any(p == w or p.startswith(w + ".") for w in wrapped))
    if hit:
        raise DeltatuneError(
            f"PEFT would treat {hit[0]} as (part of) a fully trained module, as its name ends with a "
            "modules_to_save entry, and drop its adapter layer"
        )
    state = {_unparametrized(k): v for k, v in model.state_dict(keep_vars=True).items()}
    for key, value in state.items():
        if any(key.startswith(w + ".") for w in wrapped):
            tensors[PREFIX + key] = trained.get(key, value).detach()
    bias_modules: set[str] = set()
    for key, value in trained.items():
        path = _module_of(key)
        if PREFIX + key in tensors:
            continue  # inside a wrapped module
        if not key.endswith(".bias"):
            raise DeltatuneError(f"{key} is fully trained but PEFT could only hold it as a module to save")
        bias_modules.add(path)
        inner = ".base_layer" if path in adapted else ""  # PEFT's adapter layer keeps the original as base_layer
        tensors[f"{PREFIX}{path}{inner}.bias"] = value
    return tensors, task, bias_modules, sorted(saved_modules)


def _adapter_config(model: nn.Module, adapter: _Adapter, task: str | None, bias_mode: str,
                    saved_modules: list[str]) -> dict[str, Any]:
    layers = adapter.layers
    ranks = {m: layer.r for m, layer in layers.items()}
    alphas = {m: layer.alpha for m, layer in layers.items()}
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    layouts = {layer.layout for layer in layers.values()}
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": r0,
        "lora_alpha": _number(a0),
        "lora_dropout": max(layer.dropout for layer in layers.values()),
        "target_modules": sorted(m for m, layer in layers.items() if layer.param is None),
        "exclude_modules": None,
        "bias": bias_mode,
        # PEFT corrects the flag per layer (with a warning) when an adapter mixes Conv1D and Linear targets
        "fan_in_fan_out": "conv1d" in layouts,
        "use_rslora": adapter.rslora,
        "use_dora": adapter.dora,
        "init_lora_weights": True,
        "modules_to_save": saved_modules or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {re.escape(m): r for m, r in ranks.items() if r != r0},
        "alpha_pattern": {re.escape(m): _number(a) for m, a in alphas.items() if a != a0},
        "lora_bias": False,
        "peft_version": PEFT_VERSION,
    }
    if adapter.tokens:  # a list: the input embedding's rows (PEFT's default); else {module: ids}
        embedding = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
        (first, (ids, _)), *more = adapter.tokens.items()
        config["trainable_token_indices"] = list(ids) if not more and model.get_submodule(first) is embedding else \
            {m: list(t) for m, (t, _) in adapter.tokens.items()}
    params = sorted(m for m, layer in layers.items() if layer.param is not None)
    if params:  # exact full names: PEFT matches a name or a dotted suffix; rank_pattern is keyed by them too
        config["target_parameters"] = params
    if task is None:  # AutoPeftModel finds the model class here when no task type names it (PEFT writes it too)
        config["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    return config


# -- any weight-side delta as a LoRA: truncated SVD per tensor ---------------------------------------------------
# ΔW = U S Vᵀ; its best rank-r approximation in the Frobenius norm (Eckart–Young) is U_r S_r V_rᵀ, written as
# B = U_r S_r, A = V_rᵀ with lora_alpha = r, so PEFT's scale alpha / r is 1 and B·A is the approximation as it is.
# The SVD runs in float64 (a tensor's tail energy is then exact to ~1e-15 of its norm); the factors are stored at
# the precision LoRA factors train in (float32, float64 for a float64 base).


def check_rank(rank: Any) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise DeltatuneError(f"rank={rank!r} must be a positive integer (the LoRA rank of the exported adapter)")
    return rank


def svd_factors(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors of ``matrix`` (m, n): A = V_kᵀ (k, n), B = U_k S_k (m, k) with
    k = min(rank, m, n) (there are no more singular values), computed in ``matrix``'s dtype."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    k = min(rank, s.numel())
    return vh[:k], u[:, :k] * s[:k]


def svd_adapter(tuned: Tuned, rank: int) -> tuple[_Adapter, dict[str, Any]]:
    """Every weight-side delta of ``tuned`` as a PEFT adapter of LoRA layers at ``rank`` (clamped to min(m, n) per
    matrix, where the SVD is exact), and the report of what each tensor became. A weight matrix of a Linear /
    GPT-2 Conv1D / Embedding becomes a LoRA layer at every module that holds it (a tied weight trained at both of
    its modules gets one at each); any other tensor (a bias, a norm's weight) has no LoRA form and travels as its
    trained value (PEFT's ``bias`` option, or its module as a ``modules_to_save`` copy), exactly."""
    rank = check_rank(rank)
    forms = tuned.forms()
    for name, form in forms.items():
        if not _weight_side(form):
            raise DeltatuneError(
                f"{name} is a {form.kind!r} delta ({form.why_not_mergeable()}): no LoRA can express it, so "
                f"method {tuned.method.name!r} cannot be exported to PEFT by SVD (that takes weight-side deltas: "
                "low-rank, sparse, dense and their sums); serve it attached, with dt.load"
            )
    module_names = _first_names(tuned.model)
    layers: dict[str, _Layer] = {}
    trained: dict[str, torch.Tensor] = {}
    rows: list[dict[str, Any]] = []
    unchanged: list[str] = []
    for tensor, group in _by_base_tensor(tuned.model, forms).items():
        delta = _summed_delta(group)
        if not bool(delta.any()):
            unchanged.append(tensor)  # a sparse tensor with no entry, a dense one that never trained
            continue
        sites = _common_sites(tensor, group)
        modules = [module_names[id(m)] for m, _ in sites]
        layouts = _matrix_layouts(sites, delta)
        if layouts is None:
            value = _trained_value(sites)
            for module, (_, attr) in zip(modules, sites, strict=True):
                trained[f"{module}.{attr}"] = value
            rows.append(_row(tensor, modules, delta, "bias" if sites[0][1] == "bias" else "modules_to_save"))
            continue
        dtype = torch.float64 if group[0].base.dtype == torch.float64 else torch.float32
        a, b = svd_factors(delta, rank)  # ΔW (as the base tensor holds it) ≈ b @ a
        a, b = a.to(dtype), b.to(dtype)
        for module, layout in zip(modules, layouts, strict=True):
            # a LoRA layer holds (out, in) = B A; Conv1D and Embedding hold ΔW transposed: (B A)ᵀ = Aᵀ Bᵀ
            pair = (a, b) if layout == "linear" else (b.T.contiguous(), a.T.contiguous())
            layers[module] = _Layer(pair[0], pair[1], a.shape[0], float(a.shape[0]), layout)
        rows.append(_row(tensor, modules, delta, "lora", rank=a.shape[0], approx=b.double() @ a.double()))
    if not layers:
        changed = ", ".join(row["tensor"] for row in rows[:3]) + (", ..." if len(rows) > 3 else "")
        raise DeltatuneError(
            "the delta changes no tensor at all: there is nothing to export" if not rows else
            f"the delta changes no weight matrix of a Linear, Conv1D or Embedding (only {changed}), and a PEFT LoRA "
            "adapter needs at least one: serve it merged (deltatune merge; --format gguf for a Llama model)"
        )
    return _Adapter(layers, trained), _report(tuned, rank, rows, unchanged)


def _by_base_tensor(model: nn.Module, forms: dict[str, Any]) -> dict[str, list[WeightDelta]]:
    """Base tensor name (model order) -> the forms that change it (several: a sum of forms, as DSEE's)."""
    names = {id(p): _unparametrized(n) for n, p in model.named_parameters()}
    found: dict[str, list[WeightDelta]] = {}
    for name, form in forms.items():
        key = names.get(id(form.base), name)
        found.setdefault(key, []).append(form)
    order = {n: i for i, n in enumerate(names.values())}
    return {n: found[n] for n in sorted(found, key=lambda n: order.get(n, len(order)))}


def _summed_delta(group: list[WeightDelta]) -> torch.Tensor:
    """ΔW of one base tensor in float64: the sum of its forms' deltas (a sum form has several)."""
    with torch.no_grad():
        total = group[0].delta_weight().detach().double()
        for form in group[1:]:
            total = total + form.delta_weight().detach().double()
    return total


def _common_sites(tensor: str, group: list[WeightDelta]) -> list[tuple[nn.Module, str]]:
    sites = group[0].sites
    key = [(id(m), a) for m, a in sites]
    if any([(id(m), a) for m, a in f.sites] != key for f in group[1:]):
        raise DeltatuneError(f"the deltas on {tensor} apply at different modules (a tied weight changed at one of "
                             "them by one delta and at all by another); PEFT cannot express that")
    return sites


def _matrix_layouts(sites: list[tuple[nn.Module, str]], delta: torch.Tensor) -> list[str] | None:
    """The LoRA layout of each site, when the tensor is the weight matrix of modules a LoRA layer can sit on."""
    if delta.dim() != 2 or any(attr != "weight" for _, attr in sites):
        return None
    try:
        return [layout_of(m) for m, _ in sites]
    except DeltatuneError:
        return None


def _trained_value(sites: list[tuple[nn.Module, str]]) -> torch.Tensor:
    """W0 + ΔW as the module sees it: a bias or norm delta acts through a parametrisation (reading the attribute
    computes W0 + ΔW) or in place (the attribute is the trained tensor), never through a hook."""
    module, attr = sites[0]
    return getattr(module, attr).detach().clone()


def _row(tensor: str, modules: list[str], delta: torch.Tensor, became: str, rank: int | None = None,
         approx: torch.Tensor | None = None) -> dict[str, Any]:
    norm = float(torch.linalg.norm(delta))
    error = 0.0 if approx is None else float(torch.linalg.norm(delta - approx)) / norm
    row: dict[str, Any] = {"tensor": tensor, "modules": modules, "shape": list(delta.shape), "as": became,
                           "rank": rank, "delta_norm": norm, "relative_error": error}
    if approx is not None:
        row["residual_norm"] = error * norm
    return row


_AS = {
    "lora": "a LoRA layer B·A at each module that holds the tensor (B = U_r S_r, A = V_rᵀ, lora_alpha = r)",
    "bias": "its trained value, under PEFT's bias option (exact; PEFT has no low-rank bias)",
    "modules_to_save": "its trained value, its module a modules_to_save copy (exact; no LoRA form for a non-matrix "
                       "tensor)",
}


def _report(tuned: Tuned, rank: int, rows: list[dict[str, Any]], unchanged: list[str]) -> dict[str, Any]:
    """export-report.json: per tensor, what it became and ‖ΔW − B·A‖_F / ‖ΔW‖_F; overall, the same over every
    tensor that became a LoRA layer (their residuals and norms pooled)."""
    lora = [r for r in rows if r["as"] == "lora"]
    total = math.sqrt(sum(r["delta_norm"] ** 2 for r in lora))
    residual = math.sqrt(sum(r["residual_norm"] ** 2 for r in lora))
    clamped = [r["tensor"] for r in lora if r["rank"] < rank]
    notes = [f"{kind}: {_AS[kind]}" for kind in _AS if any(r["as"] == kind for r in rows)]
    if clamped:
        notes.append(f"rank {rank} exceeds min(out, in) of {len(clamped)} tensor(s) ({clamped[0]}, ...): those are "
                     "exported at full rank min(out, in), exactly (rank_pattern says so per module)")
    return {
        "format": "peft",
        "method": tuned.method.name,
        "rank": rank,
        "relative_error": residual / total if total else 0.0,
        "max_relative_error": max(r["relative_error"] for r in lora),
        "tensors": rows,
        "unchanged": unchanged,
        "notes": notes,
    }


# -- where the base model of an exported adapter is -------------------------------------------------------------
# The model card names a shipped model's Hub id (deltatune.data.models.SHIPPED); the shipped SmolLM2 is
# SmolLM2-135M-Instruct's Q4_1 GGUF de-quantised: close to the Hub's weights, not equal to them, so its card says so.


@dataclass(frozen=True)
class BaseReference:
    """How an exported adapter names its base model."""

    path: str | None  # adapter_config.json's base_model_name_or_path: what AutoPeftModel loads
    hub_id: str | None  # the Hub id where known (the model card's base_model)
    note: str | None  # how the Hub's weights differ from the trained-on ones, if they do


def base_reference(name: str | None) -> BaseReference:
    """``base_model_name_or_path`` must be something ``from_pretrained`` resolves without the network, or PEFT goes
    to the Hub for it: a shipped name becomes its local folder (the exact weights the delta was trained on), a
    relative folder an absolute one. A name that is no local folder (a Hub id) stays as it is."""
    if not name:
        return BaseReference(None, None, None)
    if name in models.SHIPPED:
        shipped = models.SHIPPED[name]
        hub_id, note = shipped.hub_id, shipped.hub_note
        try:
            return BaseReference(os.path.abspath(models.resolve(name)), hub_id, note)
        except DeltatuneError:  # its package is not installed here (a model renamed by hand): the Hub id, if any
            return BaseReference(hub_id or name, hub_id, note)
    if os.path.isdir(name):
        return BaseReference(os.path.abspath(name), None, None)
    return BaseReference(name, name, None)


_AUTO_CLASSES = {"CAUSAL_LM": "AutoPeftModelForCausalLM", "SEQ_CLS": "AutoPeftModelForSequenceClassification",
                 "TOKEN_CLS": "AutoPeftModelForTokenClassification", "QUESTION_ANS": "AutoPeftModelForQuestionAnswering",
                 "SEQ_2_SEQ_LM": "AutoPeftModelForSeq2SeqLM"}


def _card_metadata(shown: str | None, task: str | None, peft_type: str = "LORA") -> list[str]:
    """The model card's YAML lines as PEFT's ``create_or_update_model_card`` sets them (values JSON-quoted; PEFT tags
    only its LORA type by name)."""
    kind = ["lora"] if peft_type == "LORA" else []
    tags = ["transformers", *kind, *([f"base_model:adapter:{shown}"] if shown else []), "deltatune"]
    meta = ([f"base_model: {json.dumps(shown)}"] if shown else []) + ["library_name: peft"]
    if task == "CAUSAL_LM":
        meta.append("pipeline_tag: text-generation")
    return ["---", *meta, "tags:", *(f"- {json.dumps(t)}" for t in tags), "---"]


def model_card(base: BaseReference, config: dict[str, Any], method: str, out: str | os.PathLike,
               svd_rank: int | None = None) -> str:
    """The README.md PEFT's ``save_pretrained`` writes (metadata: base_model, library_name, tags; its framework
    versions line), with how to load the adapter here and elsewhere instead of PEFT's empty template.
    ``svd_rank``: the adapter is the delta's truncated SVD at that rank (said on the card)."""
    shown = base.hub_id or base.path
    auto = _AUTO_CLASSES.get(config["task_type"] or "", "AutoPeftModel")
    where = os.fspath(out)
    peft_type = config["peft_type"]
    if peft_type == "LORA":
        title = "DoRA" if config["use_dora"] else "LoRA"
        sizes = f"r={config['r']}, lora_alpha={config['lora_alpha']}, "
    else:  # a method's own type (registry.PeftFormat)
        title, sizes = peft_type, "".join(f"{k}={config[k]}, " for k in ("r", "alpha") if k in config)
    lines = [*_card_metadata(shown, config["task_type"], peft_type), "",
             f"# {title} adapter" + (f" for {shown}" if shown else ""), "",
             f"Exported by deltatune {__version__} from a `{method}` delta: {sizes}"
             f"{len(config['target_modules'])} target modules"
             + (f" and {len(config['target_parameters'])} target parameters" if config.get("target_parameters") else "")
             + ".", "",
             *([f"Each tensor's ΔW is its truncated SVD at rank {svd_rank}; {REPORT_FILE} gives the relative "
                "error ‖ΔW − B·A‖_F / ‖ΔW‖_F of each.", ""] if svd_rank is not None else []),
             "## How to load", "", "```python", f"from peft import {auto}", "",
             f"model = {auto}.from_pretrained({where!r})", "```", ""]
    if base.path:
        lines += [f"This reads the base model from `{base.path}` (`base_model_name_or_path` in adapter_config.json)."]
        if base.hub_id and base.hub_id != base.path:
            lines += [f"Where that folder does not exist, load the base from the Hub (`{base.hub_id}`) and "
                      f"pass it: `PeftModel.from_pretrained(base_model, {where!r})`."]
        if base.note:
            lines += ["", f"Note: {base.note}."]
        lines += [""]
    lines += ["### Framework versions", "", f"- PEFT {PEFT_VERSION}", f"- deltatune {__version__}", ""]
    return "\n".join(lines)


def read_peft(adapter: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    path = Path(adapter)
    cfg_path, w_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not path.is_dir():
        raise DeltatuneError(f"{path} is not a PEFT adapter folder: no such folder")
    if not cfg_path.is_file():
        raise DeltatuneError(f"{path} is not a PEFT adapter folder: {CONFIG_FILE} is missing")
    if not w_path.is_file():
        legacy = (
            " (only a pickled adapter_model.bin is there: deltatune never reads pickle; re-save the adapter "
            "with safetensors, e.g. PeftModel.from_pretrained(...).save_pretrained(dir, safe_serialization=True))"
        )
        raise DeltatuneError(f"{w_path} is missing{legacy if (path / 'adapter_model.bin').exists() else ''}")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DeltatuneError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise DeltatuneError(f"{cfg_path} is not a PEFT config (a JSON object)")
    _check_config_types(cfg_path, config)
    try:
        tensors = load_file(w_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise DeltatuneError(f"{w_path} is truncated or corrupted: {e}") from e
    return config, tensors


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_integer(value: Any) -> bool:
    return _is_number(value) and float(value).is_integer()


# the adapter_config.json fields the import reads, what each must hold (null means PEFT's default), and that in words
_CONFIG_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "r": (lambda v: _is_integer(v) and v > 0, "a positive integer"),
    "lora_alpha": (_is_number, "a number"),
    "lora_dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: isinstance(v, bool), "true or false"),
    "bias": (lambda v: isinstance(v, str), "a string (none, all or lora_only)"),
    "rank_pattern": (lambda v: isinstance(v, dict) and all(_is_integer(x) and x > 0 for x in v.values()),
                     "an object of module patterns to positive integers"),
    "alpha_pattern": (lambda v: isinstance(v, dict) and all(_is_number(x) for x in v.values()),
                      "an object of module patterns to numbers"),
}


def _check_config_types(cfg_path: Path, config: dict[str, Any]) -> None:
    """Every field the import reads has the type PEFT writes, so a hand-edited config fails here, naming the field."""
    bad = [f"{key}={config[key]!r} must be {what}" for key, (ok, what) in _CONFIG_TYPES.items()
           if config.get(key) is not None and not ok(config[key])]
    if bad:
        raise DeltatuneError(
            f"{cfg_path} is not a valid PEFT config: {'; '.join(bad)}; fix the file or re-save the adapter with PEFT"
        )


_LORA_KEY = re.compile(
    r"^(?P<mod>.+)\.(?P<t>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)$"
)

# config options that change what the adapter computes in ways a plain LoRA delta cannot express
_UNSUPPORTED = (
    ("lora_bias", "lora_bias (a bias on B)"),
    ("layer_replication", "layer_replication (it duplicates base layers)"),
    ("alora_invocation_tokens", "aLoRA (activated only after invocation tokens)"),
    ("use_bdlora", "BD-LoRA"),
    ("arrow_config", "Arrow routing"),
    ("velora_config", "VeLoRA"),
    ("monteclora_config", "MonteCLoRA"),
    ("kasa_config", "KaSA"),
)
# inits that move the base weights (W <- W - s·B0·A0 or a re-quantised W): the adapter only fits that moved base
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def _normalise_key(key: str) -> str | None:
    """A saved key without PEFT's prefix, adapter name and wrapper infixes; None for keys to skip."""
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    key = re.sub(r"\.lora_(A|B)\.[^.]+\.weight$", r".lora_\1.weight", key)  # adapter name left in (old files)
    key = re.sub(r"\.lora_embedding_(A|B)\.[^.]+$", r".lora_embedding_\1", key)
    key = re.sub(r"\.lora_magnitude_vector(\.[^.]+)*$", ".lora_magnitude_vector", key)  # in-memory DoRA names
    if _LORA_KEY.match(key):
        return key
    if ".original_module." in key:  # ModulesToSaveWrapper's untouched original: the base itself
        return None
    key = re.sub(r"\.modules_to_save\.[^.]+\.", ".", key)  # old files: <path>.modules_to_save.<adapter>.<param>
    # bias="all" also saves the wrapped copy's biases as <path>.modules_to_save.<param>: the same trained value
    key = re.sub(r"\.modules_to_save\.([^.]+)$", r".\1", key)
    return key.replace(".base_layer.", ".")  # the original module inside a LoRA layer


def peft_types() -> list[str]:
    """The PEFT adapter types deltatune imports and exports: LORA (lora, dora) and those methods declare."""
    return ["LORA", *sorted(m.peft.peft_type for m in map(registry.get, registry.names()) if m.peft is not None)]


def import_peft(model: nn.Module, adapter: str | os.PathLike) -> Tuned:
    """Attach a PEFT adapter to ``model`` as a deltatune delta (same logits as PEFT): a LoRA adapter as ``lora``, or
    ``dora`` when it was saved with ``use_dora``; another type as the method that declares it (``registry.PeftFormat``)."""
    config, raw = read_peft(adapter)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        method = registry.for_peft_type(peft_type)
        if method is None or method.peft is None:
            raise DeltatuneError(
                f"{adapter} is a {config.get('peft_type')!r} adapter; deltatune imports PEFT's "
                f"{', '.join(peft_types())} adapters (peft_type in adapter_config.json)"
            )
        return _import_method(model, adapter, config, raw, method, method.peft)
    for key, why in _UNSUPPORTED:
        if config.get(key):
            raise DeltatuneError(f"{adapter} uses {why}, which deltatune does not import")
    init = config.get("init_lora_weights", True)
    residual = _residual_import_init(adapter, config)
    if residual is None and isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise DeltatuneError(
            f"{adapter} was initialised with {init!r}, which rewrites the base weights: convert it to a plain "
            "LoRA with PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...)) before importing"
        )

    params, raw = _parameter_layers(adapter, model, config, raw)
    token_rows, raw = _token_layers(adapter, model, config, raw)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in raw.items():
        nk = _normalise_key(k)
        if nk is None:
            continue
        if nk in tensors and not torch.equal(tensors[nk], v):
            raise DeltatuneError(f"{adapter} holds two tensors for {nk!r} (the second is {k!r})")
        tensors[nk] = v
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if m := _LORA_KEY.match(k):
            lora.setdefault(m.group("mod"), {})[m.group("t")] = v
    if not lora and not params and not token_rows:
        raise DeltatuneError(f"{adapter} holds no LoRA tensors (keys like '<module>.lora_A.weight')")
    use_dora = bool(config.get("use_dora"))
    for mod, parts in lora.items():
        pair = ("lora_embedding_A", "lora_embedding_B") if "lora_embedding_A" in parts else ("lora_A.weight", "lora_B.weight")
        if use_dora and MAGNITUDE not in parts:
            raise DeltatuneError(
                f"{adapter} says use_dora but module {mod!r} has no {MAGNITUDE}: not a complete DoRA adapter"
            )
        if not use_dora and MAGNITUDE in parts:
            raise DeltatuneError(
                f"{adapter} holds a DoRA {MAGNITUDE} for {mod!r} but its config says use_dora: false; fix the config"
            )
        if set(parts) - {MAGNITUDE} != set(pair):
            raise DeltatuneError(f"{adapter}: module {mod!r} has {sorted(parts)}, not a LoRA pair {list(pair)}")
    lora_modules = sorted(lora)
    have = {n for n, _ in model.named_modules()}
    missing = [m for m in lora_modules if m not in have]
    if missing:
        raise DeltatuneError(
            f"{adapter} has LoRA tensors for {missing[0]!r}, which this {type(model).__name__} does not have "
            f"({len(missing)} of {len(lora_modules)} modules missing): it was made for another base model"
        )

    saved, base_state = _saved_values(adapter, model, {k: v for k, v in tensors.items() if not _LORA_KEY.match(k)},
                                      set(lora), "LoRA")
    modules_to_save = sorted({_module_of(k) for k in saved if not k.endswith(".bias")})
    loose_biases = {_module_of(k) for k in saved if k.endswith(".bias")} - set(modules_to_save)
    bias = config.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        bias = "none"
    if loose_biases - set(lora):
        bias = "all"
    elif loose_biases and bias == "none":
        bias = "lora_only"

    alpha = float(config.get("lora_alpha", 8))
    alpha_pattern = config.get("alpha_pattern") or {}
    ranks = {mod: int(parts.get("lora_A.weight", parts.get("lora_embedding_A")).shape[0]) for mod, parts in lora.items()}
    ranks |= {name: _parameter_rank(adapter, model, name, a) for name, (a, _) in params.items()}
    previous = carried_by(model)  # put back on if the adapter is refused below, as dt.load does
    tuned = attach(
        model,
        "dora" if use_dora else "lora",
        r=int(config.get("r", 8)),
        alpha=alpha,
        dropout=float(config.get("lora_dropout") or 0.0),
        targets=lora_modules,
        target_parameters=sorted(params) or None,
        use_rslora=bool(config.get("use_rslora", False)),
        bias=bias,
        rank_pattern={re.escape(m): r for m, r in ranks.items()},
        alpha_pattern={re.escape(m): float(pattern_value(alpha_pattern, m, alpha)) for m in [*lora_modules, *params]},
        modules_to_save=modules_to_save or None,
        # an unconverted PiSSA / OLoRA adapter: attach computes A₀, B₀ from the original base as PEFT's init did;
        # a LoftQ one: attach computes LoftQ's Q from the original base, kept in the delta (PEFT wrote it into W)
        **({"init": residual} if residual else {}),
        **({"loftq_iter": int((config.get("loftq_config") or {}).get("loftq_iter", 1))} if residual == "loftq" else {}),
        **({"trainable_token_indices": config["trainable_token_indices"]} if token_rows else {}),
    )
    try:
        forms = tuned.forms()
        unexpected = sorted((set(f"{m}.weight" for m in lora_modules) | set(params)) - set(forms))
        if unexpected:
            raise DeltatuneError(f"the LoRA modules {unexpected[:3]} did not become LoRA deltas")
        with torch.no_grad():
            for mod, parts in lora.items():
                form = forms[f"{mod}.weight"]
                assert isinstance(form, LowRank)
                emb = form.layout == "embedding"
                if emb != ("lora_embedding_A" in parts):
                    raise DeltatuneError(
                        f"{adapter}: {mod!r} is {'an embedding' if emb else 'not an embedding'} in this model but "
                        f"the adapter stores {'linear' if emb else 'embedding'} LoRA tensors for it"
                    )
                a, b = (parts["lora_embedding_A"], parts["lora_embedding_B"]) if emb else (
                    parts["lora_A.weight"], parts["lora_B.weight"])
                form.load_stored({"A": a, "B": b} | ({"magnitude": parts[MAGNITUDE]} if use_dora else {}))
            for name, (a, b) in params.items():
                form = forms[name]
                assert isinstance(form, ParamLowRank)
                if form.layout == "experts":
                    a, b = _from_peft_factors(a, b, form.experts)
                form.load_stored({"A": a, "B": b})
            _load_token_rows(adapter, forms, token_rows)
            _load_saved(adapter, model, forms, saved, base_state, "a LoRA delta")
    except Exception:
        tuned.detach()
        if previous is not None:
            previous.reattach()
        raise
    return tuned


def _parameter_layers(adapter: str | os.PathLike, model: nn.Module, config: dict[str, Any], raw: dict[str, torch.Tensor]
                      ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor]]:
    """An adapter saved with ``target_parameters``: its ``ParamWrapper`` layers as parameter full name -> PEFT's
    (lora_A.weight, lora_B.weight), found where PEFT nests them (``_wrapper_paths``); and the adapter's other tensors.
    The parameters are those PEFT picks: a module's own parameter whose full name is a target or ends with
    ``.<target>``, in the model's module order and each module's parameter order."""
    targets = config.get("target_parameters") or []
    if not targets:
        return {}, raw
    if isinstance(targets, str) or not all(isinstance(t, str) for t in targets):
        raise DeltatuneError(f"{adapter}: target_parameters={targets!r} must be a list of parameter names")
    owners: dict[str, list[str]] = {}
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            key = f"{module_name}.{pname}" if module_name else pname
            if key in targets or any(key.endswith(f".{t}") for t in targets):
                owners.setdefault(module_name, []).append(key)
    if not owners:
        raise DeltatuneError(f"{adapter}: its target_parameters {sorted(targets)} match no parameter of this "
                             f"{type(model).__name__}: it was made for another base model")
    by_path = {path: name for name, path in _wrapper_paths(owners).items()}
    found: dict[str, dict[str, torch.Tensor]] = {name: {} for name in by_path.values()}
    rest: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        k = re.sub(r"\.lora_(A|B)\.[^.]+\.weight$", r".lora_\1.weight", k)  # adapter name left in (old files)
        m = re.fullmatch(r"(?P<path>.+)\.lora_(?P<t>A|B)\.weight", k)
        if m and m.group("path") in by_path:
            found[by_path[m.group("path")]][m.group("t")] = value
        else:
            rest[key] = value
    for name, parts in found.items():
        if set(parts) != {"A", "B"}:
            path = next(p for p, n in by_path.items() if n == name)
            raise DeltatuneError(f"{adapter} has no lora_A / lora_B pair for the target parameter {name!r} (PEFT's "
                                 f"{path}.lora_A.weight): it was made for another base model or is incomplete")
    return {name: (parts["A"], parts["B"]) for name, parts in found.items()}, rest


TOKEN_ADAPTER = "token_adapter"  # PEFT's TrainableTokensWrapper keeps LoRA's trainable_token_indices rows here
_TOKEN_KEY = re.compile(rf"^(?:{re.escape(PREFIX)})?(?P<mod>.+)\.{TOKEN_ADAPTER}\.{PEFT_TENSOR}(\.[^.]+)?$")


def _token_layers(adapter: str | os.PathLike, model: nn.Module, config: dict[str, Any], raw: dict[str, torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """LoRA's ``trainable_token_indices`` rows: module path -> the rows' values (one entry per weight tensor: a tied
    head's copy is dropped when it equals its embedding's), and the adapter's other tensors."""
    found: dict[str, torch.Tensor] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if m := _TOKEN_KEY.match(key):
            found[m.group("mod")] = value
        else:
            rest[key] = value
    tokens = config.get("trainable_token_indices")
    if not found:
        if tokens:
            raise DeltatuneError(f"{adapter} sets trainable_token_indices but holds no '<embedding>.{TOKEN_ADAPTER}."
                                 f"{PEFT_TENSOR}' rows: it is incomplete")
        return {}, raw
    if not tokens:
        raise DeltatuneError(f"{adapter} holds trainable-token rows but its config has no trainable_token_indices: "
                             "fix the config or re-save the adapter with PEFT")
    have = {n for n, _ in model.named_modules()}
    by_tensor: dict[int, str] = {}
    rows: dict[str, torch.Tensor] = {}
    embedding = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    for module in sorted(found, key=lambda n: n not in have or model.get_submodule(n) is not embedding):
        if module not in have:
            raise DeltatuneError(f"{adapter} has trainable-token rows for {module!r}, which this {type(model).__name__} "
                                 "does not have: it was made for another base model")
        weight = model.get_submodule(module).weight
        if id(weight) in by_tensor:  # a tied head's copy of its embedding's rows
            if not torch.equal(found[module], found[by_tensor[id(weight)]]):
                raise DeltatuneError(f"{adapter} holds other trainable-token rows for {module} than for "
                                     f"{by_tensor[id(weight)]}, which share one weight (tied)")
            continue
        by_tensor[id(weight)] = module
        rows[module] = found[module]
    return rows, rest


def _load_token_rows(adapter: str | os.PathLike, forms: dict[str, Any], rows: dict[str, torch.Tensor]) -> None:
    """PEFT's rows' values into the ``TokenRows`` forms the import attached (deltatune holds ΔW = rows − W0[ids])."""
    for module, values in rows.items():
        form = forms.get(f"{module}.weight")
        if not isinstance(form, TokenRows):
            raise DeltatuneError(f"{adapter}: the trainable-token rows of {module!r} did not become a token-rows delta "
                                 "(trainable_token_indices names other modules than the saved rows)")
        shape = (len(form.tokens), form.width)
        if tuple(values.shape) != shape:
            raise DeltatuneError(f"{adapter}: the trainable-token rows of {module!r} have shape {tuple(values.shape)}, "
                                 f"{len(form.tokens)} token ids of a {form.width}-wide embedding need {shape}")
        ids = torch.tensor(form.tokens, dtype=torch.long, device=form.base.device)
        base = form.base.detach()[ids]
        form.load_stored({"values": values.to(form.values.dtype) - base.to(form.values.dtype)})


def _parameter_rank(adapter: str | os.PathLike, model: nn.Module, name: str, a: torch.Tensor) -> int:
    """The rank of a ``ParamWrapper`` layer: PEFT's lora_A holds r rows per expert of a 3-D stack."""
    param = model.get_parameter(name)
    experts = int(param.shape[0]) if param.dim() == 3 else 1
    if a.dim() != 2 or a.shape[0] % experts:
        raise DeltatuneError(f"{adapter}: lora_A of {name!r} has shape {tuple(a.shape)}, not (r·{experts}, in) for "
                             f"a parameter of shape {tuple(param.shape)}: it was made for another base model")
    return int(a.shape[0]) // experts


def _residual_import_init(adapter: str | os.PathLike, config: dict[str, Any]) -> str | None:
    """``pissa`` / ``olora`` / ``loftq`` for an adapter saved unconverted with that init, else None. A PiSSA / OLoRA
    adapter's factors fit PEFT's rewritten base W − s·B₀A₀; deltatune rebuilds B₀, A₀ from the original base (a full
    SVD or QR, deterministic) and imports the delta as ``lora`` with that init: s·(B·A − B₀·A₀) on the original W
    gives PEFT's model. A LoftQ adapter's factors fit PEFT's base rewritten into Q, LoftQ's NF4 weight, which is a
    function of W (``methods/_loftq.py``): the delta (Q − W0) + s·B·A on the original W gives PEFT's model."""
    init, use_dora = config.get("init_lora_weights", True), bool(config.get("use_dora"))
    if not isinstance(init, str):
        return None
    name = init.lower()
    if name == "loftq":
        bits = int((config.get("loftq_config") or {}).get("loftq_bits", 4))
        if use_dora or bits != 4:
            raise DeltatuneError(
                f"{adapter} was initialised with LoftQ at {bits} bits{' with use_dora' if use_dora else ''}; deltatune "
                "rebuilds LoftQ's 4-bit NF4 weight for a plain LoRA only: convert it to a plain LoRA with PEFT "
                "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) before importing")
        return name
    if name.startswith("pissa_niter"):
        raise DeltatuneError(
            f"{adapter} was initialised with {init!r}, which rewrites the base weights with factors from a "
            "randomised SVD: they cannot be drawn again and the adapter does not hold them. Convert it to a plain "
            "LoRA with PEFT (save_pretrained(..., path_initial_model_for_weight_conversion=...)) before importing, "
            "or train with init_lora_weights='pissa' (a full SVD, which deltatune recomputes)"
        )
    if residual_init(name) is None:
        return None
    if use_dora:
        raise DeltatuneError(f"{adapter} combines init_lora_weights={init!r} with use_dora, which deltatune's dora "
                             "does not take: convert it to a plain DoRA with PEFT before importing")
    return name


def _import_method(model: nn.Module, adapter: str | os.PathLike, config: dict[str, Any], raw: dict[str, torch.Tensor],
                   method: registry.Method, codec: registry.PeftFormat) -> Tuned:
    """A PEFT adapter of a type a method declares (``registry.PeftFormat``): its layers' tensors by module go to the
    method, which gives its options and its forms' tensors; fully trained tensors become its dense deltas."""
    kind = codec.peft_type
    names = "|".join(re.escape(n) for n in sorted(codec.tensors, key=len, reverse=True))
    layer_key = re.compile(rf"^(?P<mod>.+)\.(?P<t>{names})(\.[^.]+)?$")  # in-memory names end in the adapter name
    top = "|".join(re.escape(n) for n in codec.top_level) or "(?!)"
    top_key = re.compile(rf"^base_model\.(?P<t>{top})(\.[^.]+)?$")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if m := top_key.match(key):
            extra[m.group("t")] = value
            continue
        nk = _normalise_key(key)
        if nk is None:
            continue
        if m := layer_key.match(nk):
            parts = layers.setdefault(m.group("mod"), {})
            if m.group("t") in parts:
                raise DeltatuneError(f"{adapter} holds two tensors for {nk!r} (the second is {key!r})")
            parts[m.group("t")] = value
        elif nk in saved and not torch.equal(saved[nk], value):
            raise DeltatuneError(f"{adapter} holds two tensors for {nk!r} (the second is {key!r})")
        else:
            saved[nk] = value
    if not layers:
        raise DeltatuneError(f"{adapter} holds no {kind} tensors (keys like '<module>.{codec.tensors[0]}')")
    have = {n for n, _ in model.named_modules()}
    missing = [m for m in sorted(layers) if m not in have]
    if missing:
        raise DeltatuneError(
            f"{adapter} has {kind} tensors for {missing[0]!r}, which this {type(model).__name__} does not have "
            f"({len(missing)} of {len(layers)} modules missing): it was made for another base model"
        )
    saved, base_state = _saved_values(adapter, model, saved, set(layers), kind)
    modules_to_save = sorted({_module_of(k) for k in saved if not k.endswith(".bias")})
    loose_biases = {_module_of(k) for k in saved if k.endswith(".bias")} - set(modules_to_save)
    options, loaded = codec.import_(config, layers, extra, model)
    if loose_biases or (codec.bias_only is not None and config.get("bias", "none") != "none"):
        if codec.bias_only is None:
            raise DeltatuneError(f"{adapter} saves the bias of {sorted(loose_biases)[0]!r}, which PEFT's {kind} "
                                 "adapter has no option for: it was not saved by PEFT")
        # the import's own reading of what trained, as PEFT's option says it loosely (a bias saved under "all")
        options["bias"] = "all" if loose_biases - set(layers) else (codec.bias_only if loose_biases else "none")
    if "modules_to_save" in {f.name for f in dataclasses.fields(method.config_cls)}:
        options["modules_to_save"] = modules_to_save or None
    elif modules_to_save:
        raise DeltatuneError(f"{adapter} trains {modules_to_save[0]!r} fully, which a {method.name} delta cannot hold "
                             f"(PEFT's {kind} adapter has no modules_to_save): it was not saved by PEFT")
    previous = carried_by(model)  # put back on if the adapter is refused below, as dt.load does
    tuned = attach(model, method.name, **options)
    try:
        forms = tuned.forms()
        with torch.no_grad():
            for name, values in loaded.items():
                form = forms.get(name)
                if form is None:
                    raise DeltatuneError(f"{adapter}: {name} did not become a {method.name} delta")
                expected = set(form.stored_tensors_names())
                if set(values) != expected:
                    raise DeltatuneError(
                        f"{adapter}: {_module_of(name)!r} has {kind} tensors {sorted(values)}, but this model's "
                        f"{method.name} delta there holds {sorted(expected)} (its config gives another structure)"
                    )
                form.load_stored(values)
            _load_saved(adapter, model, forms, saved, base_state, f"a {method.name} delta")
    except Exception:
        tuned.detach()
        if previous is not None:
            previous.reattach()
        raise
    return tuned


def _saved_values(adapter: str | os.PathLike, model: nn.Module, saved: dict[str, torch.Tensor], adapted: set[str],
                  what: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The adapter's fully trained tensors (by model key), checked against the model, without the copies of the
    adapted modules' own base weights; and the model's state (parametrised names as the model has them)."""
    # A layer's own base weight is saved by PEFT when an embedding is targeted (save_embedding_layers): it must be the
    # model's weight, or the adapter changes the base.
    base_state = model.state_dict(keep_vars=True)
    for key, value in saved.items():
        if key not in base_state:
            raise DeltatuneError(f"{adapter} saves {key!r}, which this model does not have: is it the right base model?")
        if tuple(base_state[key].shape) != tuple(value.shape):
            raise DeltatuneError(
                f"{adapter} saves {key!r} with shape {tuple(value.shape)}, the model has {tuple(base_state[key].shape)} "
                "(a resized vocabulary?): it was made for another base model"
            )
    saved = dict(saved)
    for key in [k for k in saved if _module_of(k) in adapted and not k.endswith(".bias")]:
        if not torch.equal(saved[key].to(base_state[key].dtype), base_state[key].detach()):
            raise DeltatuneError(
                f"{adapter} saves a changed base weight {key!r} under its {what} layer (e.g. an embedding trained or "
                f"resized next to {what}): deltatune cannot hold a dense and a {what} delta on one tensor"
            )
        del saved[key]
    return saved, base_state


def _load_saved(adapter: str | os.PathLike, model: nn.Module, forms: dict[str, Any], saved: dict[str, torch.Tensor],
                base_state: dict[str, torch.Tensor], what: str) -> None:
    """The adapter's fully trained tensors into the dense deltas the import attached (``modules_to_save``, biases);
    a saved value no dense delta holds must be the base's (``what``: the delta that cannot hold it)."""
    # a dense delta applies at every site of its tensor: each site must hold the same saved value
    module_names: dict[int, str] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        module_names.setdefault(id(m), n)
    site_form: dict[str, Dense] = {}
    for form in forms.values():
        if isinstance(form, Dense):
            for m, attr in form.sites:
                site_form[f"{module_names[id(m)]}.{attr}"] = form
    done: dict[int, str] = {}
    for name, value in saved.items():
        form = site_form.get(name)
        if form is None:
            if torch.equal(value.to(base_state[name].dtype), base_state[name].detach()):
                continue  # e.g. a buffer of a module to save: the base value
            raise DeltatuneError(f"{adapter} saves a changed {name!r}, which {what} cannot hold")
        sites = sorted(k for k, f in site_form.items() if f is form)
        if len(sites) > 1 and not all(k in saved and torch.equal(saved[k], value) for k in sites):
            raise DeltatuneError(
                f"{adapter} trains {name!r}, whose tensor the model shares with {sorted(set(sites) - {name})} "
                "(tied weights), at one site only; deltatune trains a tied tensor at all its sites. Save the "
                "adapter with LoraConfig(ensure_weight_tying=True), or untie the weights of the base model"
            )
        if id(form) not in done:
            form.delta.copy_(value.to(form.base.dtype) - form.base)
            done[id(form)] = name


# -- PEFT's config objects given to dt.attach ----------------------------------------------------------------
# PEFT is a test-only dependency: the object is recognised by its class's module and its peft_type, never imported.

# fields that describe an adapter on disk or how PEFT runs, not what the delta computes
_METADATA_FIELDS = frozenset({"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                              "revision", "runtime_config"})
_RENAMED = {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "use_rslora": "use_rslora", "bias": "bias",
            "rank_pattern": "rank_pattern", "alpha_pattern": "alpha_pattern"}
# read below with their own conversion; fan_in_fan_out is a layout PEFT corrects per layer from the layer type, as
# deltatune always does, and deltatune trains a tied tensor at all its sites, as ensure_weight_tying=True asks
_CONVERTED = frozenset({"target_modules", "exclude_modules", "modules_to_save", "layers_to_transform", "layers_pattern",
                        "init_lora_weights", "use_dora", "fan_in_fan_out", "ensure_weight_tying", "target_parameters",
                        "trainable_token_indices", "loftq_config", "eva_config"})
# what to do instead, for fields deltatune cannot honour (any other field set away from its default gets a plain line)
_CANNOT_HONOUR = {
    "inference_mode": "dt.attach makes a trainable delta: leave it False (dt.load attaches a saved one to serve)",
    "init_lora_weights": "deltatune's LoRA starts from True, 'gaussian', False, 'pissa', 'pissa_niter_K', 'olora', "
                         "'loftq' or 'eva' (the last five without use_dora); for CorDA use dt.attach(model, 'corda', "
                         "...), other inits (LoRA-GA, ...) have no deltatune conversion",
    "layers_pattern": "deltatune takes a module's layer index from the first number in its name, which is not the "
                      "number after this pattern here; pick the layers with targets instead",
    "layer_replication": "it duplicates base layers; deltatune never changes the base model",
    "lora_bias": "a bias on B has no deltatune equivalent",
    "corda_config": "use dt.attach(model, 'corda', ...), deltatune's CorDA",
    "lora_ga_config": "LoRA-GA initialises from gradients; no deltatune equivalent",
    "kasa_config": "use dt.attach(model, 'kasa', ...), deltatune's KaSA",
    "use_qalora": "QA-LoRA needs a quantised base; no deltatune equivalent",
    "megatron_config": "Megatron parallel layers are not supported",
}
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def _is_peft_config(obj: Any) -> bool:
    return type(obj).__module__.split(".")[0] == "peft" and hasattr(obj, "peft_type") and dataclasses.is_dataclass(obj)


def _enum_value(x: Any) -> Any:
    return getattr(x, "value", x)


def _field_defaults(config: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(config):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _patterns(value: Any) -> list[str] | None:
    """PEFT's target_modules / exclude_modules: a list matches names or dotted suffixes (as deltatune's plain
    patterns do), a single string is a regular expression on the full name."""
    if value is None:
        return None
    if isinstance(value, str):
        return [f"re:{value}"]
    return sorted(value)


def _all_linear_targets(config: Any, model: nn.Module) -> list[str]:
    """deltatune's "all-linear" leaves out a classifier head when the model has no LM head; PEFT does that only
    for task_type SEQ_CLS, so otherwise the head is named too, to adapt exactly what PEFT adapts."""
    if _enum_value(config.task_type) == "SEQ_CLS":
        return [ALL_LINEAR]
    ours = set(all_linear(model))
    out_emb = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    linear = module_types()["linear"] + module_types()["conv1d"]
    theirs = [n for n, m in model.named_modules() if n and isinstance(m, linear) and m is not out_emb]
    return [ALL_LINEAR, *(n for n in theirs if n not in ours)]


def _layers_pattern_agrees(model: nn.Module, pattern: str | list[str]) -> bool:
    """PEFT's layer index under ``layers_pattern`` (the number after ``<pattern>.``) is deltatune's (the first number
    in the name) for every module inside a numbered layer."""
    pats = [pattern] if isinstance(pattern, str) else list(pattern)
    for name, _ in model.named_modules():
        if not re.search(r"\.\d+\.", name):
            continue
        # PEFT's own expression (tuners_utils.check_target_module_exists)
        found = (re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name) for p in pats)
        theirs = next((int(m.group("idx")) for m in found if m), None)
        if theirs != layer_index(name):
            return False
    return True


def peft_config_options(config: Any, model: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """A PEFT config object as deltatune's (method name, options), for ``dt.attach(model, XConfig(...))``: PEFT's
    ``LoraConfig`` as lora / dora, any other type as the method whose ``PeftFormat`` declares its config fields; None
    for an object that is no PEFT config. Fields set away from PEFT's default that deltatune cannot honour are refused,
    all of them in one error."""
    if not _is_peft_config(config):
        return None
    kind = str(_enum_value(config.peft_type)).upper()
    if kind == "LORA":
        return lora_config_options(config, model)
    method = registry.for_peft_type(kind)
    if method is None or method.peft is None or not method.peft.config_fields:
        converted = ["LORA", *sorted(m.peft.peft_type for m in map(registry.get, registry.names())
                                     if m.peft is not None and m.peft.config_fields)]
        raise DeltatuneError(
            f"PEFT's {type(config).__name__} (peft_type {kind}) has no deltatune conversion (deltatune converts the "
            f"configs of PEFT's {', '.join(converted)}): attach a deltatune method by name instead (deltatune methods "
            "lists them)"
        )
    return method.name, _method_config_options(config, model, method)


# the fields every PEFT type that picks modules shares, and the option of the same meaning in a method's config
_SHARED_FIELDS = {"target_modules": "targets", "exclude_modules": "exclude", "layers_to_transform": "layers",
                  "modules_to_save": "modules_to_save"}


def _method_config_options(config: Any, model: nn.Module, method: registry.Method) -> dict[str, Any]:
    """The options of ``method`` from PEFT's config object of its type: the shared fields converted here, the type's
    own through its ``PeftFormat.config_fields``."""
    assert method.peft is not None
    values = {f.name: _enum_value(getattr(config, f.name)) for f in dataclasses.fields(config)}
    defaults = {k: _enum_value(v) for k, v in _field_defaults(config).items()}
    hints = typing.get_type_hints(method.config_cls)
    own = dict(method.peft.config_fields)
    options: dict[str, Any] = {}
    problems: list[str] = []
    for name, value in values.items():
        if name in _METADATA_FIELDS or name == "fan_in_fan_out":  # a layout PEFT corrects per layer, as deltatune does
            continue
        if name == "layers_pattern":
            if value and not _layers_pattern_agrees(model, value):
                problems.append(f"layers_pattern={value!r}: {_CANNOT_HONOUR['layers_pattern']}")
            continue
        if name in own and own[name] is None:  # changes nothing deltatune computes
            continue
        option = own.get(name, _SHARED_FIELDS.get(name))
        if option is None or option not in hints:
            if value != defaults.get(name, value):
                problems.append(f"{name}={value!r}: {_CANNOT_HONOUR.get(name, 'deltatune has no equivalent')}")
            continue
        if name == "target_modules" and isinstance(value, str) and value.lower() == ALL_LINEAR:
            options[option] = _all_linear_targets(config, model)
        elif name in _SHARED_FIELDS and name != "layers_to_transform" and value is not None:
            options[option] = _patterns(value)
        elif isinstance(value, str) and _takes_names(hints[option]):
            options[option] = [f"re:{value}"]  # PEFT: one string where names go is a regex on the full name
        elif name == "layers_to_transform":
            options[option] = _layers(value, values.get("target_modules"))
        elif isinstance(value, set | frozenset):
            options[option] = sorted(value)
        elif isinstance(value, list | tuple):
            options[option] = list(value)  # in order (PEFT's token_indices)
        elif isinstance(value, dict):
            options[option] = dict(value)
        else:
            options[option] = value
    heads = _task_heads(config, model, options.get("modules_to_save"))
    if heads and "modules_to_save" in hints:
        options["modules_to_save"] = sorted({*(options.get("modules_to_save") or []), *heads})
    elif heads:
        problems.append(f"task_type={_enum_value(config.task_type)!r}: PEFT trains the task head {heads[0]!r} fully next "
                        f"to the adapter, which deltatune's {method.name} has no modules_to_save for")
    if problems:
        _refuse(config, problems)
    return options


def _layers(layers: Any, targets: Any) -> list[int] | None:
    """PEFT's layers_to_transform as deltatune's layers; PEFT applies it only to a list of target names (a regular
    expression picks its modules alone: tuners_utils.check_target_module_exists), and so does the conversion."""
    if layers is None or (isinstance(targets, str) and targets.lower() != ALL_LINEAR):
        return None
    return [layers] if isinstance(layers, int) else list(layers)


def _takes_names(hint: Any) -> bool:
    """Whether an option of this type takes a list of names but not one name (deltatune's module patterns)."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return str not in args and any(typing.get_origin(a) is list and typing.get_args(a) == (str,) for a in args)


def _task_heads(config: Any, model: nn.Module, saved: list[str] | None) -> list[str]:
    """The heads PEFT's task classes train fully on their own (PeftModelForSequenceClassification & co.) that
    ``saved`` does not name yet."""
    names = [n for n, _ in model.named_modules() if n]
    return [head for head in _TASK_HEADS.get(str(_enum_value(config.task_type)), ())
            if head not in (saved or []) and any(match_name(head, n) for n in names)]


def _refuse(config: Any, problems: list[str]) -> None:
    raise DeltatuneError(
        f"PEFT {type(config).__name__} fields deltatune cannot honour (drop them, or set PEFT's default):\n  "
        + "\n  ".join(problems)
    )


def _peft_table_targets(model: nn.Module, params: list[str]) -> list[str]:
    """The target_modules PEFT adds next to ``target_parameters`` when target_modules is None. On a model with
    fused 3-D expert stacks (Mixtral, Qwen3-MoE, ...) PEFT's transformers-5 conversion of MoE configs clears it: the
    parameters alone. Elsewhere its per-architecture table (``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``)
    fills it where it has the model type, read from the PEFT that made the config object, never imported."""
    names = {n for n, p in model.named_parameters() if p.dim() == 3}
    if any(match_name(t, n) for t in params for n in names):
        return []
    constants = sys.modules.get("peft.utils.constants")
    table = getattr(constants, "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING", None) or {}
    found = table.get(getattr(getattr(model, "config", None), "model_type", None))
    if found is None:
        return []
    return [f"re:{found}"] if isinstance(found, str) else sorted(found)


def lora_config_options(config: Any, model: nn.Module) -> tuple[str, dict[str, Any]]:
    """PEFT's ``LoraConfig`` as deltatune's ("lora" or "dora", options)."""
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    defaults = _field_defaults(config)
    problems = [f"{name}={value!r}: {_CANNOT_HONOUR.get(name, 'deltatune has no equivalent')}"
                for name, value in values.items()
                if name not in _METADATA_FIELDS | _CONVERTED | set(_RENAMED) and value != defaults.get(name, value)]
    init = values["init_lora_weights"]
    if isinstance(init, str):
        init = init.lower()  # PEFT compares the name case-insensitively
    # PiSSA / OLoRA: lora's own init of that name (a residual, the base never rewritten); DoRA takes none of them
    residual = residual_init(init) is not None and not values["use_dora"]
    loftq = dict(values.get("loftq_config") or {})
    if init == "loftq" and not values["use_dora"]:  # lora's own LoftQ (Q kept in the delta, the base never rewritten)
        if int(loftq.get("loftq_bits", 4)) != 4:
            problems.append(f"loftq_config={loftq!r}: deltatune's LoftQ quantizes to 4-bit NF4 (loftq_bits=4)")
    elif not (isinstance(init, bool) or init == "gaussian" or residual or (init == "eva" and not values["use_dora"])):
        problems.append(f"init_lora_weights={init!r}: {_CANNOT_HONOUR['init_lora_weights']}")
    elif loftq:
        problems.append(f"loftq_config={loftq!r}: it only acts with init_lora_weights='loftq'")
    eva = values.get("eva_config")
    if init == "eva" and values.get("target_parameters"):
        problems.append("init_lora_weights='eva' with target_parameters: EVA initialises Linear layers from their inputs")
    elif eva is not None and init != "eva":
        problems.append(f"eva_config={eva!r}: it only acts with init_lora_weights='eva'")
    pattern = values["layers_pattern"]
    if pattern and not _layers_pattern_agrees(model, pattern):
        problems.append(f"layers_pattern={pattern!r}: {_CANNOT_HONOUR['layers_pattern']}")
    params = values.get("target_parameters")
    if params and values["layers_to_transform"] is not None:
        problems.append(f"layers_to_transform={values['layers_to_transform']!r} with target_parameters: PEFT applies "
                        "it to target_modules only, deltatune's layers to both; pick the layers in the names instead")
    if params and values["use_dora"]:
        problems.append("use_dora=True with target_parameters: PEFT's parameter wrappers take no DoRA")
    if problems:
        _refuse(config, problems)

    options: dict[str, Any] = {ours: values[theirs] for theirs, ours in _RENAMED.items()}
    options["rank_pattern"], options["alpha_pattern"] = dict(options["rank_pattern"]), dict(options["alpha_pattern"])
    options["bias"] = str(_enum_value(options["bias"]))
    targets = values["target_modules"]
    if params:  # PEFT's names match a full name or a dotted suffix, as deltatune's plain patterns do
        options["target_parameters"] = sorted(params)
    if targets is None and params:  # PEFT adds its own per-architecture modules only where its table has the type
        options["targets"] = _peft_table_targets(model, sorted(params))
    elif targets is None:  # PEFT's per-architecture default (explicit, as DoRA's own default differs from PEFT's)
        options["targets"] = default_targets(model)
    elif isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        options["targets"] = _all_linear_targets(config, model)
    else:
        options["targets"] = _patterns(targets)
    options["exclude"] = _patterns(values["exclude_modules"])
    options["layers"] = _layers(values["layers_to_transform"], targets)
    options["init"] = init
    if init == "loftq":
        options["loftq_iter"] = int(loftq.get("loftq_iter", 1))
    if init == "eva":  # PEFT's EvaConfig as lora's eva block; the calibration batches come with eva.data
        options["eva"] = {k: _enum_value(v) for k, v in dataclasses.asdict(eva).items()} if eva is not None else {}
    # PEFT's task classes train the task head fully on their own (PeftModelForSequenceClassification & co.)
    saved = list(values["modules_to_save"] or [])
    saved += _task_heads(config, model, saved)
    options["modules_to_save"] = saved or None
    tokens = values.get("trainable_token_indices")
    if tokens is not None:
        if values["use_dora"]:
            _refuse(config, ["trainable_token_indices with use_dora: deltatune's dora takes no token rows; train them "
                             "with a lora delta, or method trainable_tokens"])
        options["trainable_token_indices"] = dict(tokens) if isinstance(tokens, dict) else list(tokens)
    return ("dora" if values["use_dora"] else "lora"), options


register_config_converter(peft_config_options)
