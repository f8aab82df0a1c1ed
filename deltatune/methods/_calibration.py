"""Calibration data for the methods that look at the task before training (SPT's sensitivity, CorDA's
covariances, IST's probes): the method's ``data`` option is a run-config data section, tokenized with the
model's own tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from deltatune.errors import DeltatuneError

LossFn = Callable[[nn.Module, Any], torch.Tensor]


def data_config(data: dict[str, Any]) -> Any:
    """A method's ``data:`` option as a run-config data section (a bad key is one error naming the option)."""
    from deltatune.data.tasks import DataConfig

    try:
        return DataConfig(**data)
    except TypeError as e:
        raise DeltatuneError(f"method data: {e}; it takes the keys of the run's data section") from e
    except DeltatuneError as e:
        raise DeltatuneError(f"method {e}") from e


def task_batches(
    model: nn.Module, data: dict[str, Any], *, tokenizer: str | None = None, batches: int = 8, batch_size: int = 32,
    seed: int = 0,
) -> tuple[list[dict[str, torch.Tensor]], LossFn]:
    """Calibration batches from a run-config ``data`` mapping: the first ``batches`` batches of a seeded
    shuffle of its training split, and the task's loss."""
    from deltatune.data import models, tasks

    cfg = data_config(data)
    name = tokenizer or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        raise DeltatuneError(
            "the model does not say which tokenizer it has (config._name_or_path is empty): set the method's "
            "tokenizer option to a shipped model name or a folder with the tokenizer"
        )
    task = tasks.build_task(cfg, models.load_tokenizer(name), model)
    order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(seed)).tolist()
    size = min(batch_size, len(order))
    chunks = [order[i:i + size] for i in range(0, len(order) - size + 1, size)][:batches]
    return [task.collate([task.train[i] for i in c]) for c in chunks], lambda m, b: task.loss(m, b)[0]


def padded_batches(seqs: list[list[int]], batch_size: int, *, drop_last: bool = False,
                   always_mask: bool = True) -> list[dict[str, torch.Tensor]]:
    """Token-id sequences as right-padded batches with an attention mask (padding stays out of the statistics).
    ``drop_last``: no short final batch (PEFT's EVA dataloader drops it); ``always_mask=False``: a batch with no
    padding carries input_ids alone."""
    out = []
    stop = len(seqs) - batch_size + 1 if drop_last else len(seqs)
    for i in range(0, max(stop, 0), batch_size):
        chunk = seqs[i:i + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, :len(s)] = torch.tensor(s)
            mask[j, :len(s)] = 1
        out.append({"input_ids": ids} if not always_mask and bool(mask.all()) else
                   {"input_ids": ids, "attention_mask": mask})
    return out
