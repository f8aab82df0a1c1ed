"""The dev split a search scores its trials on, carved from the training data: never the reported eval split.

The idea of ``deltatune demo --lr-grid`` (``cli/demo.py``'s ``search_data``), for any classification data section:
the data splits as every run splits it (``data.eval_fraction``, ``data.seed``) and only its training part is used.
A stratified pool of T + D of those examples (D: ``search.dev_size``, by default as many as the eval split holds,
capped by ``data.max_eval``; T: ``data.max_train`` or the rest) is written to ``OUT/data/pool.jsonl``, and every
trial reads that file with ``eval_fraction`` D / (T + D): the data layer's own split holds out the D dev
examples, and a trial's final evaluation is its dev score. Labels and prompt are spelled out, so the file's
classes keep the order (and a causal LM the label words) of the original data.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

from deltatune.errors import DeltatuneError

POOL = Path("data") / "pool.jsonl"  # under the study folder


def dev_data(data: Any, out: Path, dev_size: int | None, *, who: str = "deltatune search",
             smaller: str = "search.dev_size") -> tuple[dict[str, Any], dict[str, int]]:
    """The trials' data section and the sizes ``{"train": T, "dev": D}``; writes ``out/data/pool.jsonl``. ``who``
    and ``smaller`` name the command and the option in errors (the demo's ``--lr-grid`` carves its split here too)."""
    from deltatune.data import rows
    from deltatune.data.config import DataConfig

    if not isinstance(data, dict):
        raise DeltatuneError(f"{who} carves its dev split from one classification data set (a data: "
                             f"mapping with name or path); got data={data!r}")
    cfg = DataConfig(**data)
    if cfg.mix is not None or cfg.task != "classification":
        raise DeltatuneError(f"{who} carves its dev split from one classification data set for now; "
                             f"this config's data is {'a mix' if cfg.mix is not None else 'task ' + repr(cfg.task)}")
    labelled = rows.classification_data(cfg)
    train_part, held = labelled.split(cfg.eval_fraction, seed=cfg.seed)
    dev = dev_size or (min(cfg.max_eval, len(held)) if cfg.max_eval else len(held))
    train = min(cfg.max_train or len(train_part), len(train_part) - dev)
    if train < 1 or dev < 1:
        raise DeltatuneError(f"the training split holds {len(train_part)} examples, too few to carve a dev split of "
                             f"{dev} from it; use more data or a smaller {smaller}")
    pool = train_part if dev + train >= len(train_part) else train_part.subset(dev + train, seed=cfg.seed)
    names = list(labelled.label_names)
    lines = "".join(json.dumps({"text": t, "label": names[y]}) + "\n"
                    for t, y in zip(pool.texts, pool.labels, strict=True))
    path = (out / POOL).resolve()
    write_text(path, lines)
    section = {k: v for k, v in data.items() if k not in ("name", "path", "text_field", "label_field")}
    section.update(path=str(path), eval_fraction=dev / len(pool), max_train=None, max_eval=None, labels=names,
                   prompt=cfg.resolved_prompt(), seed=cfg.seed)
    return section, {"train": len(pool) - dev, "dev": dev}


def write_text(path: Path, text: str) -> None:
    """Write a file whole through a temporary sibling and a rename (several workers may write the same folder: a
    reader sees the old file or the new one); an unchanged file is left alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
