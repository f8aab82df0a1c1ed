"""The dev split a search scores its trials on, carved from the training data: never the reported eval split.

The idea of ``deltatune demo --lr-grid`` (``cli/demo.py``'s ``search_data``), for any data section but editing:
the data splits as every run splits it (``data.eval_fraction``, ``data.seed``) and only its training part is used.
A pool of T + D of those examples (D: ``search.dev_size``, by default as many as the eval split holds, capped by
``data.max_eval``; T: ``data.max_train`` or the rest; stratified for classification, a seeded sample of rows
otherwise) is written to ``OUT/data/pool.jsonl``, and every trial reads that file with ``eval_fraction``
D / (T + D): the data layer's own split holds out the D dev examples, and a trial's final evaluation is its dev
score. Classification spells labels and prompt out, so the file's classes keep the order (and a causal LM the
label words) of the original data; text, chat and preference rows are written as the file holds them. A list of
data sets (a mix) gets one pool per part (``pool-<i>.jsonl``, D and T per part as above): a trial mixes their
training parts by the parts' weights and scores on every part's dev rows, as a run does with eval splits. The
data steps of a section (select, prune, ...) stay in it: they run in each trial on the pool's training part.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deltatune.core.artifact import replace_text
from deltatune.errors import DeltatuneError

POOL = Path("data") / "pool.jsonl"  # under the study folder


def dev_data(data: Any, out: Path, dev_size: int | None, *, who: str = "deltatune search",
             smaller: str = "search.dev_size") -> tuple[Any, dict[str, int]]:
    """The trials' data section and the sizes ``{"train": T, "dev": D}`` (summed over the parts of a mix); writes
    the pool file(s) under ``out/data/``. ``who`` and ``smaller`` name the command and the option in errors (the
    demo's ``--lr-grid`` carves its split here too)."""
    from deltatune.data.config import DataConfig

    if not isinstance(data, dict | list) or not data:
        raise DeltatuneError(f"{who} carves its dev split from the config's data section (a mapping with name or "
                             f"path, or a list of them); got data={data!r}")
    cfg = DataConfig(mix=list(data)) if isinstance(data, list) else DataConfig(**data)
    if cfg.mix is None:
        return _carve(data, cfg, out / POOL, dev_size, who, smaller)
    raw_parts = data if isinstance(data, list) else data["mix"]
    sections, sizes = [], {"train": 0, "dev": 0}
    for i, (raw, part) in enumerate(zip(raw_parts, cfg.parts(), strict=True)):
        section, n = _carve(raw if isinstance(raw, dict) else {}, part, out / POOL.with_name(f"pool-{i}.jsonl"),
                            dev_size, who, smaller, where=f"data[{i}]")
        sections.append(section)
        sizes = {k: sizes[k] + n[k] for k in sizes}
    return (sections if isinstance(data, list) else {**data, "mix": sections}), sizes


def _carve(raw: dict[str, Any], cfg: Any, path: Path, dev_size: int | None, who: str, smaller: str,
           where: str = "data") -> tuple[dict[str, Any], dict[str, int]]:
    """One data set's pool: D dev + T training examples of its training part, written to ``path``; the section
    that reads it (``eval_fraction`` D / (T + D): the trial's own split holds out exactly the D)."""
    if cfg.task == "edit":
        raise DeltatuneError(f"{who}: {where} is task 'edit', which has no held-out part (every edit trains and is "
                             "scored); search an edit run by its edit success on a data set of its own")
    labelled = cfg.task == "classification" or cfg.pairs_from_labels  # preference pairs are built after the carve
    if labelled:
        pool_of, labels, held, n_train = _classification_pool(cfg)
    else:
        pool_of, labels, held, n_train = _row_pool(cfg)
    dev = dev_size or (min(cfg.max_eval, held) if cfg.max_eval else held)
    train = min(cfg.max_train or n_train, n_train - dev)
    if train < 1 or dev < 1:
        raise DeltatuneError(f"the training split of {where} holds {n_train} examples, too few to carve a dev split "
                             f"of {dev} from it; use more data or a smaller {smaller}")
    lines = pool_of(dev + train if dev + train < n_train else None)  # a seeded subset (stratified: classification)
    path = path.resolve()
    write_text(path, "".join(json.dumps(line) + "\n" for line in lines))
    section = {k: v for k, v in raw.items() if k not in ("name", "path", "text_field", "label_field")}
    section.update(path=str(path), eval_fraction=dev / (dev + train), max_train=None, max_eval=None,
                   seed=cfg.seed)
    if labelled:
        section.update(labels=labels, prompt=cfg.resolved_prompt())
    elif cfg.name is not None or cfg.task == "text":
        section["text_field"] = "text"
    return section, {"train": train, "dev": dev}


def _classification_pool(cfg: Any) -> tuple[Any, list[str], int, int]:
    """A stratified pool of the labelled training part: (lines(n), label names, eval size, train size)."""
    from deltatune.data import rows

    labelled = rows.classification_data(cfg)
    train_part, held = labelled.split(cfg.eval_fraction, seed=cfg.seed)
    names = list(labelled.label_names)

    def lines(n: int | None) -> list[dict[str, Any]]:
        pool = train_part if n is None else train_part.subset(n, seed=cfg.seed)
        return [{"text": t, "label": names[y]} for t, y in zip(pool.texts, pool.labels, strict=True)]

    return lines, names, len(held), len(train_part)


def _row_pool(cfg: Any) -> tuple[Any, None, int, int]:
    """A seeded pool of the training part's rows as they are in the file (text, chat, preference: a trial reads
    them with the section's own fields); a shipped set's texts as ``{"text": ...}`` rows."""
    import random

    from deltatune.data import rows

    if cfg.name is not None or cfg.task == "text":
        table = [{"text": t} for t in rows.texts(cfg)]
    else:
        table = list(rows.records(cfg).rows)
    train_idx, eval_idx = rows.split_indices(len(table), cfg.eval_fraction, cfg.seed)

    def lines(n: int | None) -> list[dict[str, Any]]:
        chosen = train_idx if n is None else random.Random(cfg.seed).sample(train_idx, n)
        return [table[i] for i in chosen]

    return lines, None, len(eval_idx), len(train_idx)


def write_text(path: Path, text: str) -> None:
    """Write a file whole through a temporary sibling and a rename (several workers may write the same folder: a
    reader sees the old file or the new one); an unchanged file is left alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.read_text() == text:
        return
    replace_text(path, text)
