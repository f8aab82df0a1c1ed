"""Checkpoints without pickle: nested state (optimizer, scheduler, policy, RNG) is split into a JSON
tree and a flat dict of tensors (safetensors), and joined back exactly."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from deltatune.core import artifact
from deltatune.errors import DeltatuneError

TENSOR = "__tensor__"
TUPLE = "__tuple__"
INTKEYS = "__intkeys__"
STEP_DIR = re.compile(r"^step-(\d+)$")


def split(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """A JSON-able copy of ``obj`` whose tensors are moved into ``tensors`` (by path)."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu()
        return {TENSOR: prefix}
    if isinstance(obj, dict):
        keys = list(obj)
        out = {str(k): split(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
        if keys and all(isinstance(k, int) for k in keys):
            return {INTKEYS: out}
        return out
    if isinstance(obj, tuple):
        return {TUPLE: [split(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [split(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix or 'top level'}")


def join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if TENSOR in obj:
            return tensors[obj[TENSOR]]
        if TUPLE in obj:
            return tuple(join(v, tensors) for v in obj[TUPLE])
        if INTKEYS in obj:
            return {int(k): join(v, tensors) for k, v in obj[INTKEYS].items()}
        return {k: join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [join(v, tensors) for v in obj]
    return obj


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Write ``folder/step-NNNNNN`` atomically, then drop all but the newest ``keep_last``."""
    tensors: dict[str, torch.Tensor] = {}
    tree = split(state, tensors)
    path = folder / f"step-{step:07d}"
    artifact.write_tensor_dir(path, tensors, "state.safetensors", {"state.json": tree})
    for old in checkpoints(folder)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        tree = json.loads((path / "state.json").read_text())
        tensors = load_file(path / "state.safetensors")
    except (OSError, ValueError, SafetensorError) as e:
        raise DeltatuneError(f"checkpoint {path} cannot be read ({e}); delete it to resume from an earlier one") from e
    return join(tree, tensors)
