"""Sentence embeddings for the data steps: a shipped or local encoder, mean pooling over the real tokens.

The default is the shipped ``minilm-l6`` (all-MiniLM-L6-v2: sentence-transformers pools it by the mean and
L2-normalises, as here). Used by GOT-D (the OT geometry), DEALRec (the surrogate's inputs) and EDA (word
neighbours come from the same encoder's input embeddings).

Embeddings are cached per text, so GOT-D over 38k tweets embeds them once for every budget, seed and target (the
encoder is most of a step's time on a CPU: 40 minutes of 41 for the whole tweets set). The cache is one
safetensors file per encoder under the data steps' cache root (``$DELTATUNE_DATA_CACHE``): the sha256 of each
text and its pooled, unnormalised embedding. Its name holds what decides an embedding: a hash of the encoder's
weights (a changed local folder is another encoder), the pooling and ``max_length``. A new text is computed and
the file rewritten whole (atomically, through a rename): two processes writing at once lose one another's
additions, never the file. ``cache=False`` turns it off (``DELTATUNE_EMBED_CACHE=0`` too).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

import torch
from safetensors.torch import load_file

from deltatune.data.steps._base import Progress, no_progress

DEFAULT_ENCODER = "minilm-l6"


def cache_enabled() -> bool:
    """False when ``DELTATUNE_EMBED_CACHE=0``: the per-text caches (these embeddings, DEALRec's effort) are off."""
    return os.environ.get("DELTATUNE_EMBED_CACHE", "1") != "0"


def sha256_rows(blobs: list[bytes]) -> torch.Tensor:
    """(n, 32) uint8: each blob's sha256, the keys of a ``VectorStore``."""
    digests = b"".join(hashlib.sha256(b).digest() for b in blobs)
    return torch.frombuffer(bytearray(digests), dtype=torch.uint8).view(len(blobs), 32)


def text_hashes(texts: list[str]) -> torch.Tensor:
    """(n, 32) uint8: each text's sha256."""
    return sha256_rows([t.encode("utf-8") for t in texts])


def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class VectorStore:
    """One cache file, a vector per key: an encoder's embeddings by the sha256 of each text (module docstring),
    or DEALRec's effort by the sha256 of each row's tokens."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.index: dict[bytes, int] = {}
        self.hashes = torch.empty(0, 32, dtype=torch.uint8)
        self.vectors: torch.Tensor | None = None
        if path.is_file():
            try:
                saved = load_file(os.fspath(path))
                self.hashes, self.vectors = saved["hashes"], saved["vectors"]
                self.index = {bytes(h.tolist()): i for i, h in enumerate(self.hashes)}
            except Exception:  # noqa: BLE001 - a damaged cache file is recomputed and replaced, never an error
                self.hashes, self.vectors, self.index = torch.empty(0, 32, dtype=torch.uint8), None, {}

    def lookup(self, hashes: torch.Tensor) -> list[int | None]:
        return [self.index.get(bytes(h.tolist())) for h in hashes]

    def add(self, hashes: torch.Tensor, vectors: torch.Tensor) -> None:
        start = len(self.hashes)
        self.hashes = torch.cat([self.hashes, hashes])
        self.vectors = vectors.clone() if self.vectors is None else torch.cat([self.vectors, vectors])
        self.index.update({bytes(h.tolist()): start + i for i, h in enumerate(hashes)})

    def save(self) -> None:
        from deltatune.core.artifact import save_tensor_file

        assert self.vectors is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{secrets.token_hex(6)}")
        try:
            save_tensor_file({"hashes": self.hashes.contiguous(), "vectors": self.vectors.contiguous()}, tmp)
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)


def _store_for(encoder: str, model: torch.nn.Module, max_length: int) -> VectorStore:
    from deltatune.data.steps._manifest import cache_root

    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(encoder).name)[:40]
    return VectorStore(cache_root() / "embeddings" / f"{name}-{weights_hash(model)}-mean-{max_length}.safetensors")


@torch.no_grad()
def embed_texts(texts: list[str], encoder: str = DEFAULT_ENCODER, *, batch_size: int = 64, max_length: int = 128,
                normalize: bool = True, progress: Progress = no_progress, cache: bool = True) -> torch.Tensor:
    """(len(texts), d) float32 embeddings: the mean of the last hidden states over each text's real tokens, L2
    normalised unless ``normalize`` is False. Texts are batched in length order (less padding), returned in the
    order given; texts embedded before by the same encoder come from the cache (module docstring)."""
    from deltatune.data import models

    model = models.load(encoder, task="encoder")
    tokenizer = models.load_tokenizer(encoder)
    cache = cache and cache_enabled()
    store = _store_for(encoder, model, max_length) if cache and texts else None
    hashes = text_hashes(texts) if store is not None else None
    found = store.lookup(hashes) if store is not None else [None] * len(texts)
    todo = [i for i, j in enumerate(found) if j is None]
    pooled = torch.empty(len(texts), model.config.hidden_size)
    if store is not None and len(todo) < len(texts):
        have = [i for i, j in enumerate(found) if j is not None]
        pooled[have] = store.vectors[[found[i] for i in have]]  # type: ignore[index]
    order = sorted(todo, key=lambda i: len(texts[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled[idx] = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        progress("embed", min(start + batch_size, len(order)), len(order))
    if store is not None and todo:
        first = {}  # one entry per distinct new text
        for i in todo:
            first.setdefault(bytes(hashes[i].tolist()), i)  # type: ignore[index]
        new = sorted(first.values())
        store.add(hashes[new], pooled[new])  # type: ignore[index]
        store.save()
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled
