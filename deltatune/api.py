"""The Python functions behind the CLI verbs (each verb calls the function of the same name)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from deltatune.core import artifact, registry
from deltatune.core.tuned import Tuned, load
from deltatune.errors import DeltatuneError
from deltatune.interop.peft import export_peft, import_peft, read_peft

FORMATS = ("peft",)


def methods() -> dict[str, str]:
    """Registered method names with a one-line description each."""
    return {name: registry.get(name).description for name in registry.names()}


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise DeltatuneError(f"unknown format {format!r}: supported formats are {', '.join(FORMATS)}")


def _base(base: str | nn.Module) -> nn.Module:
    if isinstance(base, nn.Module):
        return base
    from deltatune import models

    return models.load(str(base))


def inspect(path: str | os.PathLike) -> dict[str, Any]:
    """What an artifact holds: method, config, base fingerprint, trainable and stored sizes."""
    meta = artifact.read_meta(path)
    tensors = artifact.read_tensors(path, meta)
    fp = meta.get("fingerprint", {})
    return {
        "path": str(path),
        "method": meta["method"],
        "deltatune_version": meta.get("deltatune_version"),
        "config": meta["config"],
        "base": {
            "architecture": fp.get("architecture"),
            "model_type": fp.get("model_type"),
            "name_or_path": fp.get("name_or_path"),
            "num_parameters": fp.get("num_parameters"),
            "targeted_tensors": len(fp.get("tensors", {})),
            "shapes_hash": fp.get("shapes"),
        },
        "trainable": meta.get("sizes", {}).get("trainable"),
        "stored_tensors": len(tensors),
        "stored_values": sum(t.numel() for t in tensors.values()),
        "stored_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "file_bytes": meta.get("files", {}).get(artifact.TENSOR_FILE, {}).get("bytes"),
    }


def export(artifact_or_tuned: str | os.PathLike | Tuned, out: str | os.PathLike, *, base: str | nn.Module | None = None,
           format: str = "peft") -> Path:
    """Export an artifact (a path, with its base model) or a tuned model to another library's format."""
    _check_format(format)
    if isinstance(artifact_or_tuned, Tuned):
        return export_peft(artifact_or_tuned, out)
    meta = artifact.read_meta(artifact_or_tuned)  # a bad path fails before a model is loaded
    if base is None:
        base = meta.get("fingerprint", {}).get("name_or_path")
        if not base:
            raise DeltatuneError("the artifact does not say which base model it belongs to: pass base=...")
    return export_peft(load(_base(base), artifact_or_tuned), out)


def import_(adapter: str | os.PathLike, out: str | os.PathLike, *, base: str | nn.Module, format: str = "peft") -> Path:
    """Import another library's adapter into a deltatune artifact at ``out`` (``import`` is a Python keyword)."""
    _check_format(format)
    read_peft(adapter)  # a bad adapter fails before a model is loaded
    import_peft(_base(base), adapter).save(out)
    return Path(out)


def merge(path: str | os.PathLike, *, base: str | nn.Module, out: str | os.PathLike) -> Path:
    """Merge an artifact into its base and write a ``save_pretrained`` folder (a plain model)."""
    artifact.read_meta(path)  # a bad path fails before a model is loaded
    plain = load(_base(base), path).merge()
    if not hasattr(plain, "save_pretrained"):
        raise DeltatuneError(f"{type(plain).__name__} has no save_pretrained; merge in Python and save it yourself")

    def fill(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        _copy_tokenizer(base, tmp)

    artifact.atomic_dir(out, fill)
    return Path(out)


def _copy_tokenizer(base: str | nn.Module, folder: Path) -> None:
    """Ship the tokenizer with a merged model so the folder is usable on its own."""
    if isinstance(base, nn.Module):
        return
    try:
        from deltatune import models

        models.load_tokenizer(str(base)).save_pretrained(folder)
    except Exception:  # a base without a tokenizer (a plain weights folder) is still mergeable
        pass
