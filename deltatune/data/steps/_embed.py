"""Sentence embeddings for the data steps: a shipped or local encoder, mean pooling over the real tokens.

The default is the shipped ``minilm-l6`` (all-MiniLM-L6-v2: sentence-transformers pools it by the mean and
L2-normalises, as here). Used by GOT-D (the OT geometry), DEALRec (the surrogate's inputs) and EDA (word
neighbours come from the same encoder's input embeddings).
"""

from __future__ import annotations

import torch

from deltatune.data.steps._base import Progress, no_progress

DEFAULT_ENCODER = "minilm-l6"


@torch.no_grad()
def embed_texts(texts: list[str], encoder: str = DEFAULT_ENCODER, *, batch_size: int = 64, max_length: int = 128,
                normalize: bool = True, progress: Progress = no_progress) -> torch.Tensor:
    """(len(texts), d) float32 embeddings: the mean of the last hidden states over each text's real tokens, L2
    normalised unless ``normalize`` is False. Texts are batched in length order (less padding), returned in the
    order given."""
    from deltatune.data import models

    model = models.load(encoder, task="encoder")
    tokenizer = models.load_tokenizer(encoder)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        out[idx] = torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled
        progress("embed", min(start + batch_size, len(texts)), len(texts))
    return out
