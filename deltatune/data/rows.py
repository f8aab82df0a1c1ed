"""Reading a data config's rows, once: cached file reads, labelled texts, conversations, edits and plain
texts, and the deterministic train / eval split.

A file is read once per (path, modification time, size), so a model request that counts the labels, the
task that encodes them and a method that calibrates on the same data share one read.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

from deltatune import data
from deltatune.data.config import DataConfig
from deltatune.errors import DeltatuneError


def _stamp(path: str) -> tuple[int, int]:
    try:
        st = Path(path).expanduser().stat()
    except OSError:
        return (0, 0)
    return (st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _read_cached(path: str, stamp: tuple[int, int]) -> data.Records:
    return data.read_records(path)


def records(cfg: DataConfig) -> data.Records:
    """The rows of the local file ``data.path``."""
    assert cfg.path is not None
    return _read_cached(cfg.path, _stamp(cfg.path))


@functools.lru_cache(maxsize=4)
def _labelled_cached(
    name: str | None, path: str | None, stamp: tuple[int, int], text_field: str, label_field: str,
    labels: tuple[str, ...] | None,
) -> data.TextDataset:
    if name is not None:
        ds = data.load(name)
        return ds.keep_labels(list(labels)) if labels is not None else ds
    assert path is not None
    return data.labelled(
        _read_cached(path, stamp), text_field=text_field, label_field=label_field,
        labels=list(labels) if labels is not None else None, name=Path(path).name,
    )


def classification_data(cfg: DataConfig) -> data.TextDataset:
    """The labelled data, filtered to data.labels (cached: a method calibrating on the same data shares the read)."""
    labels = tuple(cfg.labels) if cfg.labels is not None else None
    stamp = _stamp(cfg.path) if cfg.path is not None else (0, 0)
    return _labelled_cached(cfg.name, cfg.path, stamp, cfg.text_field, cfg.label_field, labels)


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) row indices of a shuffle split, the same for the same seed on any machine."""
    k = int(n * eval_fraction + 0.5)
    if not 0 < k < n:
        raise DeltatuneError(
            f"data.eval_fraction={eval_fraction} of {n} rows leaves an empty train or eval part; "
            "use a fraction nearer 0.5 or more data"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[k:], order[:k]


def cut(items: list, n: int | None) -> list:
    """The first ``n`` items (all of them for None): ``data.max_train`` / ``data.max_eval``."""
    return items if n is None else items[:n]


def edits(table: data.Records) -> list[tuple[str, str]]:
    """(prompt, target) of every row; ``target_new`` (the CounterFact / zsRE name) is read too."""
    out = []
    for i, row in enumerate(table.rows):
        prompt, target = row.get("prompt"), row.get("target", row.get("target_new"))
        if not isinstance(prompt, str) or not isinstance(target, str) or not prompt or not target.strip():
            raise DeltatuneError(
                f"row {i + 1} of {table.source} is not an edit: task 'edit' needs a non-empty text in the fields "
                f"'prompt' and 'target' (or 'target_new'); its fields: {', '.join(map(str, row)) or 'none'}"
            )
        out.append((prompt, target))
    return out


def conversations(table: data.Records, cfg: DataConfig) -> list[list[dict]]:
    """Each row's messages: the messages field (a list, or its JSON text in a CSV), else prompt/response."""
    out = []
    for i, row in enumerate(table.rows):
        messages = row.get(cfg.messages_field)
        if messages is None:
            if row.get("prompt") is None or row.get("response") is None:
                raise DeltatuneError(
                    f"row {i + 1} of {table.source} has neither a {cfg.messages_field!r} field (a list of "
                    f"{{role, content}}) nor 'prompt' and 'response' fields (its fields: {', '.join(map(str, row))}); "
                    "set data.messages_field to the field that holds the messages"
                )
            messages = [{"role": "user", "content": str(row["prompt"])},
                        {"role": "assistant", "content": str(row["response"])}]
            if row.get("system"):
                messages.insert(0, {"role": "system", "content": str(row["system"])})
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError as e:
                raise DeltatuneError(
                    f"row {i + 1} of {table.source}: field {cfg.messages_field!r} is text but not JSON ({e}); "
                    'write it as a JSON list like [{"role": "user", "content": "..."}, ...]'
                ) from e
        good = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
        if not good:
            raise DeltatuneError(
                f"row {i + 1} of {table.source}: field {cfg.messages_field!r} must be a non-empty list of "
                f"{{\"role\": ..., \"content\": <text>}} messages, got {str(messages)[:120]}"
            )
        if not any(m["role"] == "assistant" for m in messages):
            raise DeltatuneError(
                f"row {i + 1} of {table.source} has no assistant message; chat training learns the "
                "assistant's turns, so every conversation needs at least one"
            )
        out.append([dict(m) for m in messages])
    return out


def texts(cfg: DataConfig) -> list[str]:
    """The texts of a shipped set, or the ``data.text_field`` column of a file."""
    if cfg.name is not None:
        return data.load(cfg.name).texts
    return [str(t) for t in records(cfg).column(cfg.text_field, "data.text_field", "the text")]

