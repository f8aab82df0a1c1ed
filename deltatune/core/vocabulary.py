"""A vocabulary resized before training (tokens added to the tokenizer, ``model.resize_token_embeddings``).

The added rows of the input embedding (and of an untied LM head) are part of the base the delta was trained on, but
no base checkpoint holds them: they were drawn when the model was resized. So a delta built for training on a resized
model records the vocabulary (``{"base": N0, "size": N1, "tied": ...}`` in ``deltatune.json``) and the values of every
added row (``__vocabulary__.embedding`` / ``__vocabulary__.head`` in the tensor file), and loading it onto the
un-resized base resizes that model to N1 first (a warning names the sizes) and puts those rows back, before the
base is fingerprinted: the logits are then the trained model's. A base of any other size is refused.

How the size before resizing (N0) is known: ``resize(model, n)`` here marks it; otherwise the ``config.json`` of the
folder the model was loaded from (``config._name_or_path``, read locally) gives it when its ``vocab_size`` is smaller
than the embedding's rows. A model with neither is taken as not resized."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from deltatune.errors import DeltatuneError

log = logging.getLogger(__name__)

MARK = "_deltatune_base_vocab"  # a plain attribute on the model: its vocabulary size before it was resized
KEY = "__vocabulary__"  # the tensor-file prefix of the added rows (no form is named so)


def _embeddings(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    return (get_in() if callable(get_in) else None), (get_out() if callable(get_out) else None)


def resize(model: nn.Module, size: int, **options: Any) -> None:
    """``model.resize_token_embeddings(size, **options)``, remembering the size before (for an in-memory model
    whose folder does not say it)."""
    embedding, _ = _embeddings(model)
    if embedding is None:
        raise DeltatuneError(f"{type(model).__name__} has no input embedding to resize")
    if getattr(model, MARK, None) is None:
        setattr(model, MARK, int(embedding.weight.shape[0]))
    model.resize_token_embeddings(size, **options)


def base_size(model: nn.Module) -> int | None:
    """The model's vocabulary size before it was resized, when known (see the module's note)."""
    mark = getattr(model, MARK, None)
    if isinstance(mark, int):
        return mark
    source = getattr(getattr(model, "config", None), "_name_or_path", None)
    config = Path(source) / "config.json" if source else None
    if config is None or not config.is_file():
        return None
    try:
        saved = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    vocab = saved.get("vocab_size", (saved.get("text_config") or {}).get("vocab_size"))
    return vocab if isinstance(vocab, int) and vocab > 0 else None


def record(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(the record, the added rows) of a resized model, None for one that was not resized."""
    embedding, head = _embeddings(model)
    if embedding is None or not isinstance(getattr(embedding, "weight", None), torch.Tensor):
        return None
    rows = int(embedding.weight.shape[0])
    base = base_size(model)
    if base is None or base >= rows:
        return None
    tied = head is not None and getattr(head, "weight", None) is embedding.weight
    tensors = {"embedding": embedding.weight.detach()[base:].clone()}
    if head is not None and not tied and getattr(head, "weight", None) is not None and head.weight.shape[0] == rows:
        tensors["head"] = head.weight.detach()[base:].clone()
    return {"base": base, "size": rows, "tied": tied}, tensors


def restore(model: nn.Module, info: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> None:
    """Make ``model`` the resized base ``info`` records: resize an un-resized one (a warning names the sizes), then
    put the added rows back. A model of any other vocabulary size is refused."""
    base, size = int(info["base"]), int(info["size"])
    embedding, head = _embeddings(model)
    rows = None if embedding is None else int(embedding.weight.shape[0])
    if rows not in (base, size):
        raise DeltatuneError(f"{where} was trained with the vocabulary resized from {base} to {size} tokens, but this "
                             f"model's embedding has {rows} rows: load it onto the base with {base} (it is resized to "
                             f"{size}) or {size} tokens")
    if rows == base:
        warnings.warn(f"{where} was trained with the vocabulary resized from {base} to {size} tokens: resizing this "
                      f"model's embeddings from {base} to {size} and restoring the {size - base} added rows",
                      stacklevel=4)
        model.resize_token_embeddings(size, mean_resizing=False)
        embedding, head = _embeddings(model)
    assert embedding is not None
    with torch.no_grad():
        embedding.weight[base:].copy_(tensors["embedding"].to(embedding.weight.dtype))
        if "head" in tensors:
            if head is None or head.weight is embedding.weight or head.weight.shape[0] != size:
                raise DeltatuneError(f"{where} holds the added rows of an untied LM head, which this model does not "
                                     "have: load it onto the model class it was trained with")
            head.weight[base:].copy_(tensors["head"].to(head.weight.dtype))
    setattr(model, MARK, base)
    log.info("%s: vocabulary %d -> %d, %d added rows restored", where, base, size, size - base)


def split(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An artifact's tensors as (the delta's, the added vocabulary rows by part)."""
    prefix = KEY + "."
    rows = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return {k: v for k, v in tensors.items() if not k.startswith(prefix)}, rows


def joined(tensors: dict[str, torch.Tensor], rows: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    return {**tensors, **{f"{KEY}.{k}": v for k, v in (rows or {}).items()}}
