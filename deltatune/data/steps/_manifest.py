"""A data step's output folder and its cache: ``data.jsonl`` (the rows) and ``manifest.json`` (what made them).

The manifest records the step, the method, its options, the seed, the sha256 of every input (the pool's rows and a
target's, each hashed as canonical JSON, so the same rows from a file or a shipped set hash alike), the chosen
indices and their scores, and what the step reports (``Outcome.info``). Its ``key`` (the sha256 of step, method,
options, seed and input hashes) names the cache entry, so an inline step in a training YAML runs once per distinct
input and reuses the result afterwards. Only JSON is read back.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from deltatune.core import artifact
from deltatune.errors import DeltatuneError
from deltatune.version import __version__

MANIFEST = "manifest.json"
ROWS = "data.jsonl"


def rows_sha256(rows: list[dict[str, Any]]) -> str:
    """The sha256 of rows as canonical JSON lines (sorted keys), the same for the same rows from any source."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def step_key(step: str, method: str, options: dict[str, Any], seed: int, inputs: dict[str, str]) -> str:
    """The cache key: what decides the output (not the time, not where it is written)."""
    blob = json.dumps({"step": step, "method": method, "options": options, "seed": seed, "inputs": inputs},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_root() -> Path:
    """``$DELTATUNE_DATA_CACHE``, else ``~/.cache/deltatune/data-steps``."""
    env = os.environ.get("DELTATUNE_DATA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deltatune" / "data-steps"


def write(folder: Path, rows: list[dict[str, Any]], manifest: dict[str, Any], *, overwrite: bool = False,
          inputs: tuple[Any, ...] = ()) -> Path:
    """Write ``data.jsonl`` and ``manifest.json`` into ``folder`` atomically (a killed write leaves what was there);
    a folder holding anything else is refused unless ``overwrite``."""
    def fill(tmp: Path) -> None:
        with open(tmp / ROWS, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False, default=str) + "\n")

    with artifact.destination(folder, "data", inputs=inputs, overwrite=overwrite) as dest:
        return dest.write(fill)


def read(folder: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows and the manifest of a step's output folder."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file() or not (folder / ROWS).is_file():
        raise DeltatuneError(f"{folder} is not a data step's output (it needs {ROWS} and {MANIFEST})")
    manifest = json.loads((folder / MANIFEST).read_text())
    with open(folder / ROWS, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if len(rows) != manifest.get("rows"):
        raise DeltatuneError(f"{folder}: {ROWS} holds {len(rows)} rows but its manifest says {manifest.get('rows')}; "
                             "the folder was changed by hand: run the step again")
    return rows, manifest


def cached(key: str) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """The rows and manifest cached under ``key``, if a complete entry is there."""
    folder = cache_root() / key
    if not (folder / MANIFEST).is_file():
        return None
    try:
        return read(folder)
    except (DeltatuneError, json.JSONDecodeError):
        return None  # a damaged entry is recomputed (and replaced)


def manifest_for(step: str, method: str, options: dict[str, Any], seed: int, inputs: dict[str, str],
                 pool_size: int, outcome: Any, seconds: float) -> dict[str, Any]:
    return {
        "step": step, "method": method, "options": options, "seed": seed, "inputs": inputs,
        "key": step_key(step, method, options, seed, inputs), "pool_size": pool_size, "rows": len(outcome.rows),
        "indices": outcome.indices, "scores": outcome.scores, "info": outcome.info, "seconds": round(seconds, 3),
        "deltatune": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
