"""Artifacts on disk: ``deltatune.json`` + ``delta.safetensors``, written atomically, read without pickle.

Also the base-model fingerprint: an artifact records which base it was trained on (architecture,
every parameter's shape and a hash of every tensor the delta touches) and refuses another.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deltatune.errors import DeltatuneError

META_FILE = "deltatune.json"
TENSOR_FILE = "delta.safetensors"
FORMAT_VERSION = 1


# -- fingerprint ---------------------------------------------------------------------------
def tensor_hash(t: torch.Tensor) -> str:
    """A short content hash of a tensor's exact bytes (dtype-aware, device-independent)."""
    data = t.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{data.dtype}{tuple(data.shape)}".encode())
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


def shapes_hash(model: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=8)
    for name, p in model.state_dict().items():
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    return h.hexdigest()


def architecture(model: nn.Module) -> str:
    return type(model).__name__


def fingerprint(model: nn.Module, base_tensors: dict[str, torch.Tensor], shapes: str) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    return {
        "architecture": architecture(model),
        "model_type": getattr(cfg, "model_type", None),
        "name_or_path": getattr(cfg, "_name_or_path", None) or None,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "shapes": shapes,
        "tensors": {name: tensor_hash(t) for name, t in sorted(base_tensors.items())},
    }


def compare_fingerprints(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences; empty when the base model is the one the artifact was made on."""
    diffs = []
    if saved.get("architecture") != current.get("architecture"):
        diffs.append(f"architecture {saved.get('architecture')} != {current.get('architecture')}")
    if saved.get("shapes") != current.get("shapes"):
        diffs.append("parameter names or shapes differ (another model size or config)")
    s_t, c_t = saved.get("tensors", {}), current.get("tensors", {})
    missing = sorted(set(s_t) - set(c_t))
    changed = sorted(k for k in s_t if k in c_t and s_t[k] != c_t[k])
    if missing:
        diffs.append(f"{len(missing)} targeted tensor(s) missing: {', '.join(missing[:10])}")
    if changed:
        diffs.append(f"{len(changed)} targeted tensor(s) have other values: {', '.join(changed[:10])}"
                     + (" ..." if len(changed) > 10 else ""))
    return diffs


# -- atomic directory write ----------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _previous(path: Path) -> Path:
    return path.parent / f".{path.name}.previous"


_CARRIED = ".carried"  # inside a temporary dir: the sub-folders moved over from the previous version


def recover(path: str | os.PathLike) -> None:
    """Finish a swap that a killed process left half done.

    The previous version is put back if it was moved aside, and sub-folders that had already been
    carried into an unfinished temporary directory (e.g. a run's ``checkpoints/``) go back home.
    """
    path = Path(path)
    prev = _previous(path)
    if prev.is_dir():
        if path.exists():
            shutil.rmtree(prev, ignore_errors=True)
        else:
            os.rename(prev, path)
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        marker = tmp / _CARRIED
        if path.is_dir() and marker.is_file():
            for name in marker.read_text().split("\n"):
                if name and (tmp / name).exists() and not (path / name).exists():
                    os.rename(tmp / name, path / name)
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_dir(path: str | os.PathLike, fill) -> None:
    """Let ``fill(tmp)`` write into a temporary sibling of ``path``, then swap it in with renames.

    The previous directory is removed only after the new one is in place, so an interrupted
    write (crash, Ctrl-C, full disk) never destroys what was there. Sub-folders of the previous
    version that the new one does not have (a training run's ``checkpoints/``) are carried over.
    Between the renames the previous version sits at ``.<name>.previous``; ``recover`` (run by
    every reader and writer) puts things back if a process was killed right there.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    if path.exists() and not path.is_dir():
        raise DeltatuneError(f"{path} exists and is not a directory: choose another output path")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    prev = _previous(path)
    moved = False
    carried: list[str] = []
    try:
        fill(tmp)
        if path.is_dir():
            carried = sorted(d.name for d in path.iterdir() if d.is_dir() and not (tmp / d.name).exists())
        if carried:
            (tmp / _CARRIED).write_text("\n".join(carried))
            _fsync_dir(tmp)
            for name in carried:
                os.rename(path / name, tmp / name)
        _fsync_dir(tmp)
        if path.exists():
            os.rename(path, prev)
            moved = True
        os.rename(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if moved and not path.exists():
            os.rename(prev, path)
        for name in carried:
            if (tmp / name).exists() and path.is_dir() and not (path / name).exists():
                os.rename(tmp / name, path / name)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (path / _CARRIED).unlink(missing_ok=True)
    if moved:
        shutil.rmtree(prev, ignore_errors=True)


def _for_saving(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that own their storage (safetensors refuses views and shared storage);
    only those that need it are copied, so a large delta is not duplicated in memory."""
    out, seen = {}, set()
    for k, v in tensors.items():
        t = v.detach().contiguous().cpu()
        storage = t.untyped_storage()
        if storage.nbytes() != t.numel() * t.element_size() or t.storage_offset() or storage.data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def write_tensor_dir(path: str | os.PathLike, tensors: dict[str, torch.Tensor], tensor_file: str,
                     json_files: dict[str, Any], *, checksum_into: str | None = None) -> None:
    """Atomically write a folder of one safetensors file (streamed to disk, not built in memory) and
    JSON files; ``checksum_into`` names the JSON file that records the tensor file's size and sha256."""

    def fill(tmp: Path) -> None:
        save_file(_for_saving(tensors), str(tmp / tensor_file), metadata={"format": "pt"})
        if checksum_into is not None:
            json_files[checksum_into] = dict(json_files[checksum_into])
            json_files[checksum_into]["files"] = {
                tensor_file: {"bytes": (tmp / tensor_file).stat().st_size, "sha256": sha256_file(tmp / tensor_file)}
            }
        for name, doc in json_files.items():
            (tmp / name).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        for name in [tensor_file, *json_files]:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())

    atomic_dir(path, fill)


def write_artifact(path: str | os.PathLike, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    write_tensor_dir(path, tensors, TENSOR_FILE, {META_FILE: meta}, checksum_into=META_FILE)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    recover(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        hint = " (it looks like a PEFT adapter: use import_peft / `deltatune import`)" if (path / "adapter_config.json").exists() else ""
        raise DeltatuneError(f"{path} is not a deltatune artifact: {META_FILE} is missing{hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DeltatuneError(f"{meta_path} is corrupted (not valid JSON: {e}); restore it or re-save the artifact") from e
    if not isinstance(meta, dict) or "method" not in meta or "config" not in meta:
        raise DeltatuneError(f"{meta_path} is not a deltatune artifact description (no 'method'/'config')")
    if meta.get("format_version", 1) > FORMAT_VERSION:
        raise DeltatuneError(f"{path} was written by a newer deltatune (format {meta['format_version']}); upgrade deltatune")
    return meta


def read_tensors(path: str | os.PathLike, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    path = Path(path)
    tensor_path = path / TENSOR_FILE
    if not tensor_path.is_file():
        raise DeltatuneError(f"{tensor_path} is missing: the artifact is incomplete")
    expected = meta.get("files", {}).get(TENSOR_FILE, {})
    blob = tensor_path.read_bytes()
    if "bytes" in expected and len(blob) != expected["bytes"]:
        raise DeltatuneError(
            f"{tensor_path} is truncated or corrupted: {len(blob)} bytes, the artifact says {expected['bytes']}"
        )
    if "sha256" in expected and hashlib.sha256(blob).hexdigest() != expected["sha256"]:
        raise DeltatuneError(f"{tensor_path} is corrupted: its checksum does not match {META_FILE}")
    try:
        return load_file(tensor_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise DeltatuneError(f"{tensor_path} cannot be read ({e}): the file is truncated or corrupted") from e


def read_artifact(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    meta = read_meta(path)
    return meta, read_tensors(path, meta)
