"""GGUF export: a merged Llama-architecture causal LM as one GGUF file, for llama.cpp and the servers built on it.

The file is written with the ``gguf`` package's ``GGUFWriter`` (the writer llama.cpp's own converter uses) and holds
what llama.cpp's ``convert_hf_to_gguf.py`` writes for a ``LlamaForCausalLM``:

- tensors under llama.cpp's names, from ``gguf``'s own name map (``model.layers.3.self_attn.q_proj.weight`` ->
  ``blk.3.attn_q.weight``); the query and key projections permuted as the converter permutes them (llama.cpp's rotary
  embedding pairs dimensions (i, i + d/2) within each head where transformers pairs halves, so the rows of each head
  are interleaved: ``_permute``; transformers' GGUF loader undoes it); no ``output.weight`` when the LM head is
  tied to the embedding (a loader ties them again);
- ``f32``: every tensor in float32; ``f16``: the matrices in float16 and the 1-d tensors (norm weights) in float32,
  as llama.cpp's ``--outtype f16`` does;
- the ``llama.*`` hyperparameters and the tokenizer as GGUF metadata: its tokens with their types (special added
  tokens CONTROL, other added tokens USER_DEFINED, the rows of the embedding past the tokenizer ``[PAD<i>]``
  UNUSED, as the converter pads), its merges, special token ids, add-BOS flag and chat template (those through
  ``gguf.SpecialVocab``, which reads them from a saved tokenizer folder as the converter does).

Only byte-level BPE tokenizers (GPT-2 / Llama 3 / SmolLM style: GGUF's ``gpt2`` tokenizer model) are written;
SentencePiece-style ones are refused with the way to convert them. Anything but a plain Llama (biases, a rope
scaling, another activation) is refused: a file llama.cpp would load and run differently is worse than none.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from deltatune.core import artifact
from deltatune.errors import DeltatuneError

GGUF_FILE = "model.gguf"
DTYPES = ("f32", "f16")
ARCHITECTURE = "llama"



def export_gguf(model: nn.Module, tokenizer: Any, out: str | os.PathLike, *, dtype: str = "f32",
                name: str | None = None, inputs: Iterable[Any] = (), overwrite: bool = False) -> Path:
    """Write ``model`` (a plain ``LlamaForCausalLM``: merge a delta first) and ``tokenizer`` as ``out/model.gguf``.
    ``out`` is a new or empty folder or an earlier GGUF export (replaced atomically); ``overwrite`` replaces any
    other folder. ``inputs``: what the caller read (refused as ``out``). Everything is checked before writing."""
    import gguf

    if dtype not in DTYPES:
        raise DeltatuneError(f"dtype={dtype!r}: GGUF export writes {' or '.join(DTYPES)} (quantise the file with "
                             "llama.cpp's llama-quantize afterwards)")
    config = check_llama(model)
    vocab = gguf_vocab(tokenizer, config.vocab_size)
    tensors = dict(gguf_tensors(model, dtype))
    with artifact.destination(out, "gguf", inputs=inputs, overwrite=overwrite) as dest:

        def fill(tmp: Path) -> None:
            writer = gguf.GGUFWriter(tmp / GGUF_FILE, ARCHITECTURE)
            _write_hyperparameters(writer, config, dtype, name or _model_name(config))
            vocab.write(writer)
            for key, array in tensors.items():
                writer.add_tensor(key, array)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()
            with open(tmp / GGUF_FILE, "rb") as f:
                os.fsync(f.fileno())

        dest.write(fill)
    return Path(out)


# -- the model ------------------------------------------------------------------------------------------------
def check_llama(model: nn.Module) -> Any:
    """The model's config, when it is a Llama causal LM that llama.cpp's ``llama`` architecture runs as transformers
    does; otherwise an error naming what differs."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind != ARCHITECTURE or not type(model).__name__.endswith("ForCausalLM"):
        raise DeltatuneError(
            f"GGUF export writes Llama-architecture causal LMs (LlamaForCausalLM: SmolLM2, Llama, TinyLlama, ...); "
            f"this model is a {type(model).__name__} (model_type {kind!r}). Merge it (deltatune merge) and convert "
            "the folder with llama.cpp's convert_hf_to_gguf.py, which knows more architectures"
        )
    rope = _rope(config)
    problems = [
        *(["attention_bias=True (llama.cpp's llama has no q/k/v/o biases)"] if config.attention_bias else []),
        *(["mlp_bias=True (llama.cpp's llama has no MLP biases)"] if getattr(config, "mlp_bias", False) else []),
        *([f"hidden_act={config.hidden_act!r} (llama.cpp's llama uses silu)"] if config.hidden_act != "silu" else []),
        *([f"rope type {rope.get('rope_type')!r} (only the default rotary embedding is written)"]
          if rope.get("rope_type", "default") != "default" else []),
    ]
    if problems:
        raise DeltatuneError("this Llama differs from what GGUF's llama architecture runs: " + "; ".join(problems)
                             + ". Merge it (deltatune merge) and convert it with llama.cpp's convert_hf_to_gguf.py")
    return config


def _rope(config: Any) -> dict[str, Any]:
    """The rotary embedding's parameters: ``rope_parameters`` (transformers 5) or the older flat attributes."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return {**params, "rope_theta": 10000.0 if theta is None else float(theta)}


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _permute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute``: within each of the ``n_head`` heads, interleave the two halves of its rows
    (transformers rotates dimension i with i + d/2, llama.cpp's rope_norm rotates 2i with 2i + 1)."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def gguf_tensors(model: nn.Module, dtype: str = "f32") -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, array) of every parameter, in the model's order, as llama.cpp's converter writes them. A tied LM
    head is the embedding's own Parameter, so ``named_parameters`` yields it once: no ``output.weight``."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for key, param in model.named_parameters():
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise DeltatuneError(f"{key} has no place in a GGUF llama file; GGUF export takes a plain "
                                 "LlamaForCausalLM (merge the delta first)")
        w = param.detach().float().cpu()
        if target.endswith("attn_q.weight"):
            w = _permute(w, config.num_attention_heads)
        elif target.endswith("attn_k.weight"):
            w = _permute(w, config.num_key_value_heads)
        yield target, _cast(w, dtype, key)


def _cast(w: torch.Tensor, dtype: str, key: str) -> np.ndarray:
    if dtype == "f32" or w.dim() == 1:
        return w.numpy()
    if bool((w.abs() > torch.finfo(torch.float16).max).any()):
        raise DeltatuneError(f"{key} has values beyond float16's range (±65504): write it with dtype='f32'")
    return w.half().numpy()


def _model_name(config: Any) -> str:
    source = str(getattr(config, "_name_or_path", "") or "model")
    return f"{Path(source.rstrip('/')).name or 'model'} (merged by deltatune)"


def _write_hyperparameters(writer: Any, config: Any, dtype: str, name: str) -> None:
    """What llama.cpp's ``LlamaModel.set_gguf_parameters`` writes for a plain Llama."""
    import gguf

    head_dim = _head_dim(config)
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope(config)["rope_theta"])
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:  # llama.cpp assumes hidden / heads otherwise
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# -- the tokenizer --------------------------------------------------------------------------------------------
@dataclass
class GGUFVocab:
    """The tokenizer as GGUF metadata: tokens and their types here, the rest from ``gguf.SpecialVocab``."""

    tokens: list[str]
    types: list[int]
    pre: str  # tokenizer.ggml.pre: which split llama.cpp applies before the merges
    space_prefix: bool | None  # tokenizer.ggml.add_space_prefix (None: the tokenizer does not say)
    special: Any  # gguf.SpecialVocab: merges, special token ids, add_bos / add_eos, chat template

    def write(self, writer: Any) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        if self.space_prefix is not None:
            writer.add_add_space_prefix(self.space_prefix)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        self.special.add_to_gguf(writer, quiet=True)


def gguf_vocab(tokenizer: Any, vocab_size: int) -> GGUFVocab:
    """llama.cpp's ``get_vocab_base`` + ``SpecialVocab`` for a byte-level BPE tokenizer of a model with
    ``vocab_size`` embedding rows."""
    import gguf

    spec = _tokenizer_json(tokenizer)
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    if reverse and max(reverse) >= vocab_size:
        raise DeltatuneError(f"the tokenizer has token id {max(reverse)} but the model only {vocab_size} embedding "
                             "rows: pass the tokenizer the model was trained with")
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(reverse[i])
            types.append(int(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(reverse[i])
            types.append(int(gguf.TokenType.NORMAL))
    with tempfile.TemporaryDirectory() as folder:  # SpecialVocab reads tokenizer.json / tokenizer_config.json
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise DeltatuneError("the tokenizer has no BPE merges to write: GGUF export takes byte-level BPE tokenizers")
    # whether a BOS / EOS is added, as the tokenizer does it (not every tokenizer says so in its config; a GGUF
    # without the flag leaves it to each reader's default)
    for kind, added in _adds_special(tokenizer).items():
        special.add_special_token.setdefault(kind, added)
    return GGUFVocab(tokens, types, _pre_tokenizer(spec.get("pre_tokenizer")), _prefix_space(spec), special)


def _adds_special(tokenizer: Any) -> dict[str, bool]:
    """{"bos": ..., "eos": ...}: whether encoding a text puts that token first / last."""
    ids = tokenizer("a").input_ids
    found = {}
    for kind, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id)):
        if token_id is not None and ids:
            found[kind] = (ids[0] if kind == "bos" else ids[-1]) == token_id
    return found


def _prefix_space(spec: dict[str, Any]) -> bool | None:
    """The byte-level pre-tokenizer's add_prefix_space (``tokenizer.ggml.add_space_prefix``), when it has one."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return next((bool(s["add_prefix_space"]) for s in steps if s.get("type") == "ByteLevel"
                 and "add_prefix_space" in s), None)


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    """The fast tokenizer's definition, when it is a byte-level BPE (GGUF's ``gpt2`` model), else an error."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DeltatuneError(f"{type(tokenizer).__name__} is no fast tokenizer (tokenizer.json): GGUF export "
                             "reads the vocabulary and merges from one")
    spec = json.loads(backend.to_str())
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        raise DeltatuneError(
            f"GGUF export writes byte-level BPE tokenizers (GPT-2 / Llama 3 / SmolLM style); this one is a "
            f"{model.get('type')} model with a {decoder.get('type')} decoder (a SentencePiece-style vocabulary). "
            "Merge the delta (deltatune merge) and convert the folder with llama.cpp's convert_hf_to_gguf.py"
        )
    return spec


def _pre_tokenizer(pre: dict[str, Any] | None) -> str:
    """``tokenizer.ggml.pre``: "gpt-2" for GPT-2's own split (ByteLevel with its regex); for a split by a regular
    expression, the name transformers' GGUF loader gives that expression (llama-bpe, qwen2, ...); else "default"."""
    if pre is None:
        return "default"
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    regexes = [(s.get("pattern") or {}).get("Regex") for s in steps if s.get("type") == "Split"]
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # an older transformers: it reads no pre-tokenizer name anyway
        return "default"
    return next((n for n, r in GGUF_PRE_TOKENIZER_SPLITS.items() if regexes and regexes[0] == r), "default")
