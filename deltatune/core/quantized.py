"""Quantized base layers (bitsandbytes): what the core needs to know about them.

A base model loaded with ``deltatune.data.models.load(name, quantize="nf4" | "fp4" | "int8")`` holds
bitsandbytes layers in place of its ``nn.Linear`` layers (transformers' own ``BitsAndBytesConfig`` path, the
one PEFT users take): ``Linear4bit`` (QLoRA's NF4 or FP4 codes in blocks of 64 weights, each block with its
absmax; with double quantization the absmaxes are themselves quantized to 8 bits) or ``Linear8bitLt``
(LLM.int8(): int8 rows with one scale each). Their ``weight`` is packed storage (a 4-bit weight is a
``(out·in/2, 1)`` uint8 tensor), so nothing may read it as a matrix: this module gives the logical shape,
the dequantized matrix (a fresh tensor, used and dropped: nothing of size m·n is kept), the record an
artifact's fingerprint keeps, the bytes that identify a layer, and the way back and forth between a
quantized layer and a plain ``nn.Linear`` that ``Tuned.merge`` takes.

bitsandbytes is imported only when a model already holds its layers (or a caller quantizes one), so importing
deltatune does not pay for it.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from deltatune.errors import DeltatuneError

SCHEMES = ("nf4", "fp4", "int8")
FOUR_BIT = ("nf4", "fp4")
LIBRARY = "bitsandbytes"
INT8_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold, transformers' default (BitsAndBytesConfig)
# what decides the stored weights (compared when an artifact is loaded); the compute dtype only decides the
# arithmetic, so a delta trained computing in fp32 on a CPU loads onto the same base computing in bf16
STORAGE_KEYS = ("scheme", "double_quant", "blocksize")


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise DeltatuneError(f"quantize={scheme!r} is not supported: use one of {', '.join(SCHEMES)} "
                             "(or None for full precision)")


def _bnb() -> Any | None:
    """The bitsandbytes package if it is imported already (no model can hold its layers otherwise), else
    None."""
    return sys.modules.get("bitsandbytes")


def _import_bnb() -> Any:
    quiet_unused_cpu_kernel()
    try:
        import bitsandbytes
    except ImportError as e:  # a dependency of deltatune: only a broken install gets here
        raise DeltatuneError(f"quantized bases need bitsandbytes ({e}): pip install bitsandbytes==0.50.2"
                             ) from e
    return bitsandbytes


class _Once(logging.Filter):
    """Lets a record through the first time its message template is seen."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in self.seen:
            return False
        self.seen.add(record.msg)
        return True


class _NotTheFastCpuKernel(logging.Filter):
    """Drops bitsandbytes' import-time warning that the optional fused CPU kernel of its AVX-512 BF16 inference path
    (``kernels-community``, fetched from the Hub) is missing: deltatune switches that path off on every 4-bit layer
    (``keep_standard_layout``), and nothing may be downloaded at run time, so the advice cannot and need not be
    followed."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


def quiet_unused_cpu_kernel() -> None:
    """Before bitsandbytes is imported: no warning about a kernel deltatune does not use (``_NotTheFastCpuKernel``)."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _NotTheFastCpuKernel) for f in logger.filters):
        logger.addFilter(_NotTheFastCpuKernel())


def quiet_int8_casts() -> None:
    """bitsandbytes' int8 matmul logs "inputs will be cast ... to float16" at every call of every layer on a
    CPU; once per process says it (it is a property of LLM.int8() on this backend, not a fault of the run)."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Once) for f in logger.filters):
        logger.addFilter(_Once())


# -- detection ---------------------------------------------------------------------------------
def is_quantized(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes Linear whose weight is quantized (not one still holding its fp
    weight before ``.to(device)`` quantizes it, nor an int8 layer kept in fp16)."""
    bnb = _bnb()
    if bnb is None:
        return False
    if isinstance(module, bnb.nn.Linear4bit):
        return bool(getattr(module.weight, "bnb_quantized", False))
    if isinstance(module, bnb.nn.Linear8bitLt):
        return module.weight.dtype == torch.int8
    return False


def is_quantized_weight(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a bitsandbytes quantized weight (packed storage, not a matrix of values)."""
    bnb = _bnb()
    if bnb is None:
        return False
    if isinstance(tensor, bnb.nn.Params4bit):
        return bool(getattr(tensor, "bnb_quantized", False))
    return isinstance(tensor, bnb.nn.Int8Params) and tensor.dtype == torch.int8


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every quantized layer of ``model`` by name, in model order."""
    if _bnb() is None:
        return []
    return [(name, m) for name, m in model.named_modules() if is_quantized(m)]


def keep_standard_layout(model: nn.Module) -> None:
    """Keep every 4-bit layer of ``model`` in bitsandbytes' standard layout (codes in blocks of 64, float32 absmax).

    On a CPU with AVX-512 BF16, bitsandbytes 0.50's ``Linear4bit.forward`` repacks the weight in place at the first
    inference-mode call (``_convert_weight_packed_for_cpu``: another code order, the absmax cast to bf16). That
    rewrites what deltatune hashes into the base fingerprint, dequantizes to merge and exports, loses absmax
    precision, and fails outright on layers narrower than a block. Switching the layer's fast-path flag off keeps
    the standard kernel on every CPU. A layer already repacked is refused: bitsandbytes' inverse conversion does
    not give the weights back (tested), so only a fresh load can."""
    bnb = _bnb()
    if bnb is None:
        return
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            state = getattr(module.weight, "quant_state", None)
            if state is not None and getattr(state, "packing_format_for_cpu", False):
                raise DeltatuneError(
                    f"{name or type(module).__name__} was repacked by bitsandbytes' CPU inference path (an AVX-512 "
                    "BF16 layout deltatune cannot read back exactly): load the quantized model with "
                    "dt.models.load(..., quantize=...) and attach before running it")


def is_quantized_model(model: nn.Module) -> bool:
    return any(True for _ in quantized_layers(model))


def scheme_of(module: nn.Module) -> str:
    """"nf4", "fp4" or "int8" for a quantized layer."""
    if not is_quantized(module):
        raise DeltatuneError(f"{type(module).__name__} is not a quantized layer")
    return "int8" if module.weight.dtype == torch.int8 else str(module.weight.quant_type)


def features(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a quantized layer: its packed weight has another shape."""
    return int(module.out_features), int(module.in_features)


def weight_shape(module: nn.Module, attr: str, tensor: torch.Tensor) -> torch.Size:
    """The logical shape of ``module.<attr>`` (``tensor``): (out, in) for a quantized weight, else its own."""
    if attr == "weight" and is_quantized(module):
        return torch.Size(features(module))
    return tensor.shape


def weight_numel(module: nn.Module) -> int:
    """How many values ``module.weight`` stands for (a packed 4-bit weight holds two per byte)."""
    if is_quantized(module):
        out, inp = features(module)
        return out * inp
    return module.weight.numel()


def num_parameters(model: nn.Module) -> int:
    """The model's parameter count with every quantized weight counted as the matrix it stands for."""
    packed = {id(m.weight): m for _, m in quantized_layers(model)}
    return sum(weight_numel(packed[id(p)]) if id(p) in packed else p.numel() for p in model.parameters())


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the layer computes in: a 4-bit layer's ``compute_dtype``; an int8 layer computes in its
    input's dtype, so its bias's (or fp32)."""
    dtype = getattr(module, "compute_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    bias = getattr(module, "bias", None)
    return bias.dtype if bias is not None and bias.is_floating_point() else torch.float32


# -- values ------------------------------------------------------------------------------------
def _canonical_4bit(weight: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """(packed data, quant state) in bitsandbytes' storage layout. On a CPU with AVX512-BF16 an inference
    forward repacks a 4-bit weight for its kernel; the inverse gives the layout the layer was quantized
    into (what its state dict holds), so values and identity do not depend on which forwards ran before."""
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        return _convert_weight_packed_for_cpu_inverse(weight.data, state)
    return weight.data, state


def _int8_scales(module: nn.Module) -> torch.Tensor:
    """The per-row scales of an int8 layer: on the weight until its first forward, in its matmul state
    after."""
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = getattr(module.state, "SCB", None)
    if scb is None:
        raise DeltatuneError(f"the int8 layer {type(module).__name__} has no scales: it was never quantized")
    return scb


def dequantize(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """W0 of a quantized layer as an (out, in) matrix in ``dtype`` (default: its compute dtype), the values
    its forward computes with. A fresh tensor each call: use it and drop it."""
    dtype = dtype or compute_dtype(module)
    if scheme_of(module) == "int8":
        from bitsandbytes.functional import int8_vectorwise_dequant

        return int8_vectorwise_dequant(module.weight.data, _int8_scales(module).float()).to(dtype)
    from bitsandbytes.functional import dequantize_4bit

    data, state = _canonical_4bit(module.weight)
    return dequantize_4bit(data, state).to(dtype)


def identity(module: nn.Module) -> torch.Tensor:
    """Every stored byte of a quantized layer's weight (codes, scales and the double quantization's own state)
    as one uint8 tensor, for the fingerprint's content hash: exact on any device, unlike dequantized
    values."""
    if scheme_of(module) == "int8":
        parts = [module.weight.data, _int8_scales(module)]
    else:
        data, state = _canonical_4bit(module.weight)
        packed = state.as_dict(packed=True)
        parts = [data] + [packed[k] for k in sorted(packed) if isinstance(packed[k], torch.Tensor)]
    return torch.cat([p.detach().contiguous().cpu().reshape(-1).view(torch.uint8) for p in parts])


# -- the record an artifact keeps --------------------------------------------------------------
def describe(module: nn.Module) -> dict[str, Any]:
    """How one quantized layer is stored and computes."""
    scheme = scheme_of(module)
    four_bit = scheme in FOUR_BIT
    return {
        "scheme": scheme,
        "double_quant": bool(module.weight.quant_state.nested) if four_bit else False,
        "blocksize": int(module.weight.quant_state.blocksize) if four_bit else None,
        "compute_dtype": str(compute_dtype(module)).removeprefix("torch."),
    }


def record(model: nn.Module) -> dict[str, Any] | None:
    """What a fingerprint keeps of the model's quantization (None: not quantized): the library, the scheme,
    double quantization, block size, compute dtype and how many layers; ``scheme: mixed`` with ``schemes``
    when layers differ (a model quantized by hand)."""
    layers = quantized_layers(model)
    if not layers:
        return None
    kinds = {tuple(sorted(describe(m).items())): describe(m) for _, m in layers}
    bnb = _bnb()
    found: dict[str, Any] = {"library": LIBRARY, "version": getattr(bnb, "__version__", None)}
    if len(kinds) == 1:
        found.update(next(iter(kinds.values())))
    else:
        found.update(scheme="mixed", schemes=sorted(kinds.values(), key=lambda d: d["scheme"]))
    found["layers"] = len(layers)
    return found


def storage(rec: dict[str, Any] | None) -> tuple | None:
    """The part of a record that decides the stored weights (compared on load)."""
    if not rec:
        return None
    if rec.get("scheme") == "mixed":
        return ("mixed", tuple(tuple(d.get(k) for k in STORAGE_KEYS) for d in rec.get("schemes", [])))
    return tuple(rec.get(k) for k in STORAGE_KEYS)


def spoken(rec: dict[str, Any] | None) -> str:
    """A record in words: "nf4 (bitsandbytes, double quantization, blocks of 64, compute float32)"."""
    if not rec:
        return "not quantized"
    if rec.get("scheme") == "mixed":
        return "quantized with mixed schemes (" + ", ".join(d["scheme"] for d in rec.get("schemes", [])) + ")"
    details = [rec.get("library") or LIBRARY]
    if rec.get("scheme") in FOUR_BIT:
        details.append("double quantization" if rec.get("double_quant") else "no double quantization")
        details.append(f"blocks of {rec.get('blocksize')}")
    details.append(f"compute {rec.get('compute_dtype')}")
    return f"{rec.get('scheme')} ({', '.join(details)})"


def load_options(rec: dict[str, Any] | None) -> dict[str, Any]:
    """The ``deltatune.data.models.load`` keywords that quantize a base as ``rec`` records it ({} for
    none)."""
    if not rec or rec.get("scheme") not in SCHEMES:
        return {}
    options: dict[str, Any] = {"quantize": rec["scheme"]}
    if rec["scheme"] in FOUR_BIT:
        options["double_quant"] = bool(rec.get("double_quant"))
    dtype = getattr(torch, str(rec.get("compute_dtype")), None)
    if isinstance(dtype, torch.dtype):
        options["compute_dtype"] = dtype
    return options


# -- quantizing plain layers (merge(quantize=...)) ---------------------------------------------
def quantize_linear(weight: torch.Tensor, bias: torch.Tensor | None, scheme: str, *,
                    double_quant: bool = True, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A bitsandbytes layer computing ``x Wᵀ + b`` for an (out, in) ``weight``, quantized on ``weight``'s
    device the way transformers' ``BitsAndBytesConfig`` does (4-bit: blocks of 64, ``double_quant``,
    compute ``dtype``; int8: LLM.int8() with the outlier threshold 6.0)."""
    check_scheme(scheme)
    bnb = _import_bnb()
    out, inp = weight.shape
    w = weight.detach().to(dtype, copy=True)
    with torch.device("meta"):  # the layer's own random init is never needed
        layer = (bnb.nn.Linear4bit(inp, out, bias=bias is not None, compute_dtype=dtype,
                                   compress_statistics=double_quant, quant_type=scheme)
                 if scheme in FOUR_BIT else
                 bnb.nn.Linear8bitLt(inp, out, bias=bias is not None, has_fp16_weights=False,
                                     threshold=INT8_THRESHOLD))
    if scheme in FOUR_BIT:
        layer.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=double_quant,
                                         quant_type=scheme, module=layer)
    else:
        layer.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        quiet_int8_casts()
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().to(dtype, copy=True), requires_grad=False)
    layer = layer.to(weight.device)  # bitsandbytes quantizes when the layer moves to its device
    keep_standard_layout(layer)
    return layer


def quantizable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The plain Linear / GPT-2 Conv1D layers ``quantize_model`` replaces, in model order: all but the output
    head (``get_output_embeddings()``, which transformers and bitsandbytes keep in full precision) and any
    layer whose weight another module shares (quantizing it would untie it). Embeddings are never Linear
    layers."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    holders: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for _, p in m.named_parameters(recurse=False, remove_duplicate=False):
            holders[id(p)] = holders.get(id(p), 0) + 1
    found = []
    for name, m in model.named_modules():
        if not name or m is head or is_quantized(m):
            continue
        plain = type(m) is nn.Linear or (type(m).__name__ == "Conv1D" and hasattr(m, "nf"))
        if plain and holders.get(id(m.weight), 0) == 1:
            found.append((name, m))
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_model(model: nn.Module, scheme: str, *, double_quant: bool = True,
                   dtype: torch.dtype | None = None) -> nn.Module:
    """Replace the model's plain Linear / GPT-2 Conv1D layers (``quantizable``) by bitsandbytes layers of
    ``scheme``, in place, and return the model; layers quantized with another scheme are dequantized and
    quantized again. ``dtype``: the compute dtype (default: each layer's weight dtype)."""
    check_scheme(scheme)
    for name, m in quantized_layers(model):
        if scheme_of(m) != scheme or (scheme in FOUR_BIT and describe(m)["double_quant"] != double_quant):
            w, bias = dequantize(m), m.bias
            replace_module(model, name, quantize_linear(w, bias, scheme, double_quant=double_quant,
                                                        dtype=dtype or w.dtype))
    for name, m in quantizable(model):
        attached = m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__
        if attached or hasattr(m, "parametrizations"):
            raise DeltatuneError(f"{name} has a delta attached: merge it first "
                                 f"(tuned.merge(quantize={scheme!r}))")
        w = m.weight if isinstance(m, nn.Linear) else m.weight.T  # Conv1D holds (in, out)
        replace_module(model, name, quantize_linear(w, m.bias, scheme, double_quant=double_quant,
                                                    dtype=dtype or m.weight.dtype))
    return model


# -- a quantized model as a plain one and back (Tuned.merge / unmerge) --------------------------
@dataclass
class Dequantized:
    """A quantized layer turned into a plain ``nn.Linear`` in place, with what puts it back exactly."""

    module: nn.Module
    cls: type
    weight: nn.Parameter
    extra: dict[str, Any]


# the attributes transformers sets on a model it quantized (``HfQuantizer.remove_quantization_config`` takes
# the same ones off when it dequantizes): a plain model must not have them, or save_pretrained writes a
# quantization_config that from_pretrained would apply to the plain weights
_MODEL_MARKS = ("hf_quantizer", "quantization_method", "is_quantized", "is_loaded_in_4bit",
                "is_loaded_in_8bit")
_CONFIG_MARKS = ("quantization_config", "_is_quantized")


@dataclass
class PlainModel:
    """What ``to_plain`` changed on a model, for ``back_to_quantized``."""

    layers: list[Dequantized]
    model_marks: dict[str, Any]
    config_marks: dict[str, Any]


def to_plain(model: nn.Module) -> PlainModel:
    """Turn every quantized layer of ``model`` into a plain ``nn.Linear`` holding its dequantized weight at
    its compute dtype, and take transformers' quantization marks off the model, so it computes, saves and
    loads as a plain model. Each layer keeps its identity (its class is switched in place, as torch's
    parametrize does), so hooks and references that forms hold stay valid. Nothing may be attached to a
    layer while it switches."""
    layers = []
    for name, m in quantized_layers(model):
        if type(m).__name__.startswith("Parametrized"):
            raise DeltatuneError(f"{name} is parametrised: detach the delta before dequantizing its base")
        w = dequantize(m)
        saved = Dequantized(m, type(m), m.weight, {k: m.__dict__[k] for k in ("state",) if k in m.__dict__})
        m.__class__ = nn.Linear
        m.weight = nn.Parameter(w, requires_grad=False)
        if m.bias is not None and m.bias.dtype != w.dtype:
            m.bias.data = m.bias.data.to(w.dtype)
        layers.append(saved)
    config = getattr(model, "config", None)
    model_marks = {k: model.__dict__.pop(k) for k in _MODEL_MARKS if k in model.__dict__}
    config_marks = {k: config.__dict__.pop(k) for k in _CONFIG_MARKS
                    if config is not None and k in config.__dict__}
    return PlainModel(layers, model_marks, config_marks)


def back_to_quantized(model: nn.Module, plain: PlainModel) -> None:
    """Undo ``to_plain`` exactly: each layer gets its class and its quantized weight back."""
    for saved in plain.layers:
        m = saved.module
        m.__class__ = saved.cls
        m.weight = saved.weight
        m.__dict__.update(saved.extra)
    model.__dict__.update(plain.model_marks)
    config = getattr(model, "config", None)
    if config is not None:
        config.__dict__.update(plain.config_marks)


# -- methods on a quantized base ---------------------------------------------------------------
def refuse_method(model: nn.Module, method: Any, config: Any) -> None:
    """Before a method's delta is built on ``model``: a one-line error if the model is quantized and the
    method does not train on a quantized base (its ``quantized_base`` trait, ``Method.quantized_refusal``)."""
    rec = record(model)
    if rec is None:
        return
    keep_standard_layout(model)  # before the first forward of a delta on it (see there)
    reason = method.quantized_refusal(config)
    if reason is None:
        return
    # not at import: the registry imports the forms, which import this module
    from deltatune.core import registry

    able = [n for n in registry.names() if registry.get(n).quantized_refusal(None) is None]
    raise DeltatuneError(
        f"{method.name} cannot train on this quantized base ({spoken(rec)}): {reason}; load the base without "
        f"quantize, or use a method that trains on a quantized base: {', '.join(able)}"
    )
