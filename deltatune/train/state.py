"""Checkpoints without pickle: nested state (optimizer, scheduler, policy, RNG) is split into a JSON
tree and a flat dict of tensors (safetensors), and joined back exactly.

``state.json`` also records the size and sha256 of ``state.safetensors`` (under ``files``, as an artifact's
``deltatune.json`` does); a checkpoint that does not match them is corrupt, and a resumed run takes the newest
one that is intact (``newest_intact``)."""

from __future__ import annotations

import json
import os
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
STATE_JSON, STATE_TENSORS = "state.json", "state.safetensors"
FILES = "files"  # the key of state.json that records the tensor file's size and sha256
CORRUPT = ".corrupt"  # a corrupt checkpoint is renamed step-NNNNNNN.corrupt: kept to look at, never resumed from


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


def save_checkpoint(folder: Path, step: int, state: dict[str, Any], keep_last: int, keep: int | None = None
                    ) -> Path:
    """Write ``folder/step-NNNNNN`` atomically, then drop all but the newest ``keep_last`` and the checkpoint of
    step ``keep`` (the best one, with early stopping: the run ends with its delta)."""
    tensors: dict[str, torch.Tensor] = {}
    tree = split(state, tensors)
    path = folder / str(step_name(step))
    artifact.write_tensor_dir(path, tensors, STATE_TENSORS, {STATE_JSON: tree}, checksum_into=STATE_JSON)
    for old in checkpoints(folder)[:-keep_last]:
        if old.name != step_name(keep):
            shutil.rmtree(old, ignore_errors=True)
    return path


def step_name(step: int | None) -> str | None:
    """The folder name of step ``step``'s checkpoint."""
    return None if step is None else f"step-{step:07d}"


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if STEP_DIR.match(p.name) and (p / STATE_JSON).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def saved_config(run_folder: str | Path) -> dict[str, Any] | None:
    """The run config of the run that wrote ``run_folder``, read from its newest readable checkpoint's state.json;
    None when it keeps no checkpoint."""
    for path in reversed(checkpoints(Path(run_folder) / "checkpoints")):
        try:
            config = json.loads((path / STATE_JSON).read_text()).get("config")
        except (OSError, ValueError, AttributeError):
            continue  # a damaged checkpoint: an older one may still say
        if isinstance(config, dict):
            return config
    return None


def saved_data_section(run_folder: str | Path) -> dict[str, Any] | list | None:
    """The data section of the run that wrote ``run_folder`` (a ``deltatune train`` output: the artifact with its
    ``checkpoints/``), read from its newest checkpoint's state.json; None when it keeps no checkpoint."""
    data = (saved_config(run_folder) or {}).get("data")
    return data if isinstance(data, dict | list) else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state saved at ``path``, its tensor file checked against the size and sha256 ``state.json`` records."""
    try:
        tree = json.loads((path / STATE_JSON).read_text())
        files = tree.pop(FILES, None) if isinstance(tree, dict) else None
        expected = files.get(STATE_TENSORS, {}) if isinstance(files, dict) else {}
        artifact.check_file(path / STATE_TENSORS, expected, STATE_JSON)
        tensors = load_file(path / STATE_TENSORS)
    except (OSError, ValueError, SafetensorError, DeltatuneError) as e:
        raise DeltatuneError(f"checkpoint {path} cannot be read ({e})") from e
    return _check_state(path, join(tree, tensors))


# what a resumed run reads from a checkpoint, and the type each must have
_STATE_KEYS: dict[str, type | tuple[type, ...]] = {
    "step": int, "config": dict, "delta": dict, "trainable": dict, "policy": dict, "optimizer": dict,
    "scheduler": dict, "data": dict, "rng": (dict, list), "history": list,
}


def _check_state(path: Path, state: Any) -> dict[str, Any]:
    """The state a resume needs, or an error naming the damaged file (a state.json of ``{}`` would otherwise
    fail deep in the loop with a KeyError)."""
    where = path / "state.json"
    fix = f"delete {path} to resume from an earlier checkpoint"
    if not isinstance(state, dict):
        raise DeltatuneError(f"{where} holds a {type(state).__name__}, not a checkpoint's state; {fix}")
    missing = [key for key in _STATE_KEYS if key not in state]
    if missing:
        raise DeltatuneError(f"{where} lacks {', '.join(missing)}: the checkpoint is damaged; {fix}")
    wrong = [key for key, kind in _STATE_KEYS.items() if not isinstance(state[key], kind)]
    if "step" not in wrong and (isinstance(state["step"], bool) or state["step"] < 0):
        wrong.insert(0, "step")
    if wrong:
        raise DeltatuneError(f"{where} has a bad {', '.join(wrong)}: the checkpoint is damaged; {fix}")
    return state


def newest_intact(folder: Path, *, set_aside: bool) -> tuple[Path, dict[str, Any], list[str]] | None:
    """The newest checkpoint that reads back intact, its state, and a warning for each newer one that does not;
    None when there is no checkpoint. With ``set_aside`` (the process that owns the run) the corrupt ones are
    renamed ``step-NNNNNNN.corrupt``, so that pruning never keeps them over the good ones the run writes next."""
    corrupt: list[tuple[Path, str]] = []
    for path in reversed(checkpoints(folder)):
        try:
            state = load_checkpoint(path)
        except DeltatuneError as e:
            corrupt.append((path, " ".join(str(e).split())))
            continue
        notes = []
        for bad, why in corrupt:
            if set_aside:
                os.rename(bad, bad.with_name(bad.name + CORRUPT))
            kept = f"; renamed it {bad.name + CORRUPT}" if set_aside else ""
            notes.append(f"{why} -- the run resumes from the older {path.name} instead{kept}")
        return path, state, notes
    if corrupt:
        raise DeltatuneError(f"--resume: no checkpoint in {folder} is intact (the newest: {corrupt[0][1]}); "
                             "start the run again with --overwrite")
    return None


def recover(folder: Path) -> None:
    """Finish the swap of any checkpoint that a killed process left half done (for the run's owner only)."""
    for prev in folder.glob(".step-*.previous") if folder.is_dir() else []:
        artifact.recover(folder / prev.name[1:-len(".previous")])
