"""Where each architecture keeps its blocks and sublayers: one table, keyed by ``config.model_type``.

An ``Architecture`` lists its block ``Stack``s (an encoder-decoder has two; Swin one list of blocks per
stage, all matched by one pattern) in forward order, which gives every block one global index. Each stack
says, relative to a block, where its attention, cross-attention (T5 / BART decoders) and feed-forward
sublayers are (``Site``): ``reads`` is the module whose input is the sublayer input x (after a pre-LN),
``writes`` the module whose output is the sublayer output h (before dropout / residual / post-LN), ``out``
the Linear / Conv1D that produces h (its width; None where there is none, e.g. a mixture of experts).
The attention's ``reads`` module is also the one that calls transformers' attention function
(``ALL_ATTENTION_FUNCTIONS``), where the key/value hook of ``core/forms/attention.py`` sits.

An architecture missing from the table gets ``GENERIC``: the longest ``nn.ModuleList`` as its blocks and
the child names of Llama-style, GPT-2 and BERT-style blocks (what deltatune did before the table).

Adding an architecture is one entry here plus its row in tests/test_architectures.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn

from deltatune.errors import DeltatuneError

SiteKind = Literal["attention", "cross_attention", "ffn"]
Inputs = Literal["tokens", "pixels", "spectrogram"]


@dataclass(frozen=True)
class Site:
    """A sublayer, by dotted paths relative to its block (``writes`` None: the ``reads`` module itself)."""

    reads: str
    writes: str | None = None
    out: str | None = None

    @property
    def output(self) -> str:
        return self.writes or self.reads


@dataclass(frozen=True)
class Stack:
    """One kind of block: ``blocks`` is a regular expression for the dotted name of the ``nn.ModuleList``(s)
    that hold them, matched at the end of the name (``layers`` matches ``model.layers``)."""

    blocks: str
    attention: Site
    ffn: Site
    cross_attention: Site | None = None

    def site(self, kind: SiteKind) -> Site | None:
        return getattr(self, kind)


@dataclass(frozen=True)
class Architecture:
    """``query`` / ``key`` / ``value`` / ``qkv``: the projections' paths inside each attention site's ``reads``
    module (``qkv``: a fused one). ``inputs``: what the model is called with. ``kv_hook``: None where the
    attention's key/value hook works, else why it cannot (a method that needs it is refused with that reason)."""

    name: str
    stacks: tuple[Stack, ...]
    query: str | None = "q_proj"
    key: str | None = "k_proj"
    value: str | None = "v_proj"
    qkv: str | None = None
    inputs: Inputs = "tokens"
    kv_hook: str | None = None
    models: tuple[str, ...] = field(default=())  # model types that share this entry


_DECODER = Stack("layers", Site("self_attn", out="self_attn.o_proj"), Site("mlp", out="mlp.down_proj"))
_MOE = Stack("layers", Site("self_attn", out="self_attn.o_proj"), Site("mlp"))  # the sparse MoE block as a whole
_ENCODER = Stack(r"encoder\.layer", Site("attention.self", "attention.output.dense", out="attention.output.dense"),
                 Site("intermediate", "output.dense", out="output.dense"))
_VIT = Stack("layers", Site("attention", out="attention.o_proj"), Site("mlp", out="mlp.fc2"))
_SWIN_WHY = ("its stages differ in width and head count, which one prefix geometry cannot describe, and its "
             "attention runs on shifted windows, not on the sequence")

_ENTRIES = [
    Architecture("llama-style decoder", (_DECODER,),
                 models=("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text")),
    Architecture("phi3", (_DECODER,), query=None, key=None, value=None, qkv="qkv_proj", models=("phi3",)),
    Architecture("mixture of experts", (_MOE,), models=("qwen3_moe", "mixtral")),
    Architecture("gpt2", (Stack("h", Site("attn", out="attn.c_proj"), Site("mlp", out="mlp.c_proj")),),
                 query=None, key=None, value=None, qkv="c_attn", models=("gpt2",)),
    Architecture("gpt_neox", (Stack("layers", Site("attention", out="attention.dense"),
                                    Site("mlp", out="mlp.dense_4h_to_h")),),
                 query=None, key=None, value=None, qkv="query_key_value", models=("gpt_neox",)),
    Architecture("bert-style encoder", (_ENCODER,), query="query", key="key", value="value", models=("bert", "roberta")),
    Architecture("t5", (
        Stack(r"encoder\.block", Site("layer.0.SelfAttention", out="layer.0.SelfAttention.o"),
              Site("layer.1.DenseReluDense", out="layer.1.DenseReluDense.wo")),
        Stack(r"decoder\.block", Site("layer.0.SelfAttention", out="layer.0.SelfAttention.o"),
              Site("layer.2.DenseReluDense", out="layer.2.DenseReluDense.wo"),
              cross_attention=Site("layer.1.EncDecAttention", out="layer.1.EncDecAttention.o")),
    ), query="q", key="k", value="v", models=("t5", "mt5")),
    Architecture("bart", (
        Stack(r"encoder\.layers", Site("self_attn", out="self_attn.out_proj"), Site("fc1", "fc2", out="fc2")),
        Stack(r"decoder\.layers", Site("self_attn", out="self_attn.out_proj"), Site("fc1", "fc2", out="fc2"),
              cross_attention=Site("encoder_attn", out="encoder_attn.out_proj")),
    ), models=("bart", "mbart")),
    Architecture("vit", (_VIT,), inputs="pixels", models=("vit",)),
    Architecture("audio-spectrogram-transformer", (_VIT,), inputs="spectrogram",
                 models=("audio-spectrogram-transformer",)),
    Architecture("swin", (Stack(r"layers\.\d+\.blocks", Site("attention", out="attention.o_proj"),
                                Site("mlp", out="mlp.fc2")),),
                 inputs="pixels", kv_hook=_SWIN_WHY, models=("swin",)),
]

TABLE: dict[str, Architecture] = {t: a for a in _ENTRIES for t in a.models}
GENERIC = Architecture("generic", ())  # no stacks: blocks and sublayers are found by name (see module doc)


def of(model: nn.Module) -> Architecture:
    """The table's entry for ``model`` (by ``config.model_type``), else ``GENERIC``."""
    return TABLE.get(str(getattr(getattr(model, "config", None), "model_type", None)), GENERIC)


def supported() -> str:
    """The architectures the table covers, for error messages."""
    return ", ".join(sorted(TABLE)) + ", and Llama-, GPT-2- or BERT-like blocks of any other model"


def _find(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


# ---------------------------------------------------------------- blocks

@dataclass
class Block:
    index: int  # over all stacks, in forward order
    name: str
    module: nn.Module
    stack: Stack | None  # None: found by the generic fallback


def _generic_blocks(model: nn.Module) -> list[Block]:
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise DeltatuneError(
            f"{type(model).__name__} has no list of transformer blocks (an nn.ModuleList); activation-side methods "
            f"need a transformer with numbered blocks (supported: {supported()})"
        )
    return [Block(i, f"{best[0]}.{i}", m, None) for i, m in enumerate(best[1])]


def blocks(model: nn.Module) -> list[Block]:
    """Every transformer block of ``model``, stack after stack (encoder before decoder, Swin's stages in order)."""
    arch = of(model)
    found: list[Block] = []
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    for stack in arch.stacks:
        pattern = re.compile(rf"(.*\.)?{stack.blocks}")
        for name, modules in lists:
            if pattern.fullmatch(name):
                found += [Block(len(found) + i, f"{name}.{i}", m, stack) for i, m in enumerate(modules)]
    return found or _generic_blocks(model)


# ---------------------------------------------------------------- sites inside a block

@dataclass
class Located:
    """A sublayer found in a block: modules and the dotted name (in the model) of ``writes`` and ``out``."""

    reads: nn.Module
    writes: nn.Module
    name: str
    out: nn.Module | None


_ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")
_FFN_NAMES = ("mlp", "feed_forward", "ffn")


def _child(module: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | None:
    for n in names:
        m = getattr(module, n, None)
        if isinstance(m, nn.Module):
            return n, m
    return None


def _generic_site(block: Block, kind: SiteKind) -> Site | None:
    """Today's name-based guess for a block the table does not describe (Llama-, GPT-2-, BERT-like)."""
    b = block.module
    if kind == "attention":
        found = _child(b, _ATTENTION_NAMES)
        if found is not None:
            n, attn = found
            if isinstance(getattr(attn, "self", None), nn.Module) and isinstance(
                    getattr(getattr(attn, "output", None), "dense", None), nn.Module):
                return Site(f"{n}.self", f"{n}.output.dense")
            return Site(n)
    elif kind == "ffn":
        found = _child(b, _FFN_NAMES)
        if found is not None:
            return Site(found[0])
        if isinstance(getattr(b, "intermediate", None), nn.Module) and isinstance(
                getattr(getattr(b, "output", None), "dense", None), nn.Module):
            return Site("intermediate", "output.dense")
    return None


def site_of(block: Block, kind: SiteKind) -> Site | None:
    """Where the ``kind`` sublayer of ``block`` is (None: the block has none, e.g. no cross-attention)."""
    if block.stack is not None:
        return block.stack.site(kind)
    return _generic_site(block, kind) if kind != "cross_attention" else None


def locate(block: Block, kind: SiteKind) -> Located | None:
    """The modules of ``block``'s ``kind`` sublayer, None where the block has none; an error where the table
    names a module the block does not have (a model of another version) or the generic guess finds nothing."""
    site = site_of(block, kind)
    if site is None:
        if kind == "cross_attention" or block.stack is not None:
            return None
        raise DeltatuneError(
            f"cannot find the {kind} sublayer of block {block.name} ({type(block.module).__name__}, children "
            f"{[n for n, _ in block.module.named_children()]}); supported: {supported()}"
        )
    reads, writes = _find(block.module, site.reads), _find(block.module, site.output)
    if reads is None or writes is None:
        raise DeltatuneError(
            f"block {block.name} ({type(block.module).__name__}) has no module {site.reads!r} / {site.output!r} where "
            f"deltatune's architecture table puts its {kind}: the model comes from another transformers version; "
            "update deltatune/core/architectures.py"
        )
    out = _find(block.module, site.out) if site.out else None
    return Located(reads, writes, f"{block.name}.{site.output}", out)


def attention_callers(model: nn.Module) -> list[nn.Module] | None:
    """The modules that call the attention function (self- and cross-attention, block order) of a model the
    table describes; None for another model (the caller finds them its own way)."""
    arch = of(model)
    if not arch.stacks:
        return None
    found = []
    for block in blocks(model):
        for kind in ("attention", "cross_attention"):
            site = locate(block, kind)  # type: ignore[arg-type]
            if site is not None:
                found.append(site.reads)
    return found or None


def check_kv_hook(model: nn.Module, method: str) -> None:
    """Refuse ``method`` (one that hooks the attention's keys and values) on an architecture where that hook
    cannot work, before anything is built."""
    arch = of(model)
    if arch.kv_hook is not None:
        raise DeltatuneError(f"{method} cannot be used on {arch.name}: {arch.kv_hook}; use an adapter, lora or ia3")


def projections(model: nn.Module) -> dict[str, list[str]]:
    """The full names of the attention projections by role (query, key, value, qkv) and of the FFN output
    projections (ffn_out), from the table; {} for a model it does not describe."""
    arch = of(model)
    if not arch.stacks:
        return {}
    roles: dict[str, list[str]] = {"query": [], "key": [], "value": [], "qkv": [], "ffn_out": []}
    for block in blocks(model):
        for kind in ("attention", "cross_attention"):
            site = site_of(block, kind)  # type: ignore[arg-type]
            if site is None:
                continue
            for role in ("query", "key", "value", "qkv"):
                path = getattr(arch, role)
                if path and _find(block.module, f"{site.reads}.{path}") is not None:
                    roles[role].append(f"{block.name}.{site.reads}.{path}")
        ffn = site_of(block, "ffn")
        if ffn is not None and ffn.out and _find(block.module, ffn.out) is not None:
            roles["ffn_out"].append(f"{block.name}.{ffn.out}")
    return roles


# ---------------------------------------------------------------- inputs

def _pair(value: Any) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, list | tuple) else (int(value), int(value))


def probe_inputs(model: nn.Module, device: torch.device) -> dict[str, Any]:
    """The smallest inputs ``model`` runs on: two tokens (and two decoder tokens), one zero image, or one
    zero spectrogram, as its table entry says."""
    cfg = model.config
    arch = of(model)
    if arch.inputs == "pixels":
        h, w = _pair(cfg.image_size)
        return {"pixel_values": torch.zeros(1, int(getattr(cfg, "num_channels", 3)), h, w, device=device)}
    if arch.inputs == "spectrogram":
        return {"input_values": torch.zeros(1, int(cfg.max_length), int(cfg.num_mel_bins), device=device)}
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    inputs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
    if getattr(cfg, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    return inputs


def check_text_model(model: nn.Module, method: str) -> None:
    """Refuse ``method`` (one that puts soft tokens among the input embeddings) on a model that takes no tokens
    (pixels, spectrograms) or that is an encoder-decoder, before anything is built."""
    arch = of(model)
    others = "an adapter, lora or ia3" if arch.kv_hook else "prefix, an adapter, lora or ia3"
    if arch.inputs != "tokens":
        raise DeltatuneError(f"{method} puts soft tokens among token embeddings, but {arch.name} takes {arch.inputs}: "
                             f"use {others}")
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise DeltatuneError(f"{method} supports decoder-only and encoder-only models, and {arch.name} is an "
                             f"encoder-decoder: use {others}")
