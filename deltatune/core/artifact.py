"""Artifacts on disk: ``deltatune.json`` + ``delta.safetensors``, written atomically, read without pickle.

Also the base-model fingerprint: an artifact records which base it was trained on (architecture,
every parameter's shape and a hash of every tensor the delta touches) and refuses another.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import secrets
import shutil
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from deltatune.core import quantized
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
    found = {
        "architecture": architecture(model),
        "model_type": getattr(cfg, "model_type", None),
        "name_or_path": portable_name_or_path(getattr(cfg, "_name_or_path", None) or None),
        "num_parameters": quantized.num_parameters(model),  # a packed 4-bit weight counts as its matrix
        "shapes": shapes,
        "tensors": {name: tensor_hash(t) for name, t in sorted(base_tensors.items())},
    }
    head = head_record(model)
    if head is not None:
        found["head"] = head
    return found


CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")  # transformers class names of causal LMs
CLASSIFIER_SUFFIX = "ForSequenceClassification"
# image / audio classifiers (ViT, Swin, AST), as deltatune.data.models.load(task=...) names them
MEDIA_CLASSIFIERS = {"ForImageClassification": "image_classification",
                     "ForAudioClassification": "audio_classification"}


def model_task(class_name: str) -> str | None:
    """What a transformers model class is, in the words ``deltatune.data.models.load(task=...)`` takes:
    "causal_lm", "classification" (a sequence-classification head), "image_classification" /
    "audio_classification" (ViT, Swin, AST classifiers) or "encoder" (a bare ``AutoModel`` class such as
    ``BertModel``); None for any other head (masked LM, token classification, ...)."""
    if class_name.endswith(CAUSAL_SUFFIXES):
        return "causal_lm"
    if class_name.endswith(CLASSIFIER_SUFFIX):
        return "classification"
    for suffix, task in MEDIA_CLASSIFIERS.items():
        if class_name.endswith(suffix):
            return task
    if class_name.endswith("Model") and "For" not in class_name:
        return "encoder"
    return None


def head_record(model: nn.Module) -> dict[str, Any] | None:
    """Which model class a delta was made on, and for a classification head its size and labels: the shipped
    MiniLM loads as a bare ``BertModel``, so a verb that loads the base for an artifact trained with a fresh head
    (``export``, ``merge``, ``eval``, ...) needs this to load ``BertForSequenceClassification`` with the same
    number of labels. None for a model that is not a ``transformers`` one (nothing to choose)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return None
    name = architecture(model)
    record: dict[str, Any] = {"class": name, "task": model_task(name)}
    if record["task"] in ("classification", *MEDIA_CLASSIFIERS.values()):
        record["num_labels"] = int(cfg.num_labels)
        # JSON object keys are strings; id2label's keys are the class indices
        record["id2label"] = {str(k): str(v) for k, v in sorted((getattr(cfg, "id2label", None) or {}).items())}
    # a quantized base (``deltatune.core.quantized``): how it was quantized, so that the verbs which load the
    # base for an artifact (export, merge, eval, ...) load it the same way, and another quantization is refused
    quantization = quantized.record(model)
    if quantization is not None:
        record["quantization"] = quantization
    return record


def quantization_of(fp: dict[str, Any]) -> dict[str, Any] | None:
    """The quantization a fingerprint records (None: a full-precision base, or an artifact older than the
    record)."""
    return (fp.get("head") or {}).get("quantization")


def portable_name_or_path(name: str | None) -> str | None:
    """The base model's name as an artifact records it: a relative local folder made absolute, so ``deltatune
    export`` / ``merge`` / ``eval`` find the base from any working directory; a name that is no folder here (a
    shipped name such as ``smollm2-135m``, a Hub id) stays as it is. Only a hint: the tensor hashes are the check."""
    if not name or os.path.isabs(name) or not os.path.isdir(name):
        return name
    return os.path.abspath(name)


def compare_fingerprints(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences; empty when the base model is the one the artifact was made on."""
    saved_q, current_q = quantization_of(saved), quantization_of(current)
    if quantized.storage(saved_q) != quantized.storage(current_q):
        # the parameter names, shapes and bytes all follow from it: this is the one difference worth saying
        fix = quantized.load_options(saved_q)
        keywords = ", ".join(f"{k}={_spoken_value(v)}" for k, v in fix.items())
        how = f"load it with dt.models.load(name, {keywords})" if fix else "load it without quantize"
        return [f"it was trained on a base quantized as {quantized.spoken(saved_q)}, this base is "
                f"{quantized.spoken(current_q)}: {how}"]
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


def _spoken_value(value: Any) -> str:
    return f"torch.{str(value).removeprefix('torch.')}" if isinstance(value, torch.dtype) else repr(value)


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


def _temporaries(path: Path) -> list[Path]:
    return list(path.parent.glob(f".{glob.escape(path.name)}.tmp-*"))


_CARRIED = ".carried"  # inside a temporary dir: the sub-folders moved over from the previous version


def recover(path: str | os.PathLike) -> None:
    """Finish a swap that a killed process left half done. Only the folder's owner may call it (a writer in
    ``destination``, or a reader that took the lock: ``_recover_to_read``), since a live writer's swap looks
    the same as a broken one.

    The previous version is put back if it was moved aside, sub-folders that had already been carried into
    an unfinished temporary directory (e.g. a run's ``checkpoints/``) go back home, and what is left of
    unfinished temporary directories is removed.
    """
    path = Path(path)
    prev = _previous(path)
    if prev.is_dir():
        if path.exists():
            shutil.rmtree(prev, ignore_errors=True)
        else:
            os.rename(prev, path)
    for tmp in _temporaries(path):
        marker = tmp / _CARRIED
        if marker.is_file():
            if not path.is_dir():
                continue  # the carried sub-folders have no home to go back to: keep them where they are
            for name in marker.read_text().split("\n"):
                if name and (tmp / name).exists() and not (path / name).exists():
                    os.rename(tmp / name, path / name)
        shutil.rmtree(tmp, ignore_errors=True)


def fresh_dir(parent: Path, prefix: str) -> Path:
    """A new, empty, uniquely named folder in ``parent`` with the mode the umask gives, as ``os.makedirs``
    would: ``tempfile.mkdtemp`` makes it 0700, and renamed into place that would hide the output from
    every other user and service."""
    while True:
        candidate = parent / f"{prefix}{secrets.token_hex(6)}"
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate


def save_tensor_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """``safetensors.torch.save_file`` for a file written on its own (not inside an atomic folder), with the
    mode the umask gives new files: safetensors leaves its output 0600."""
    save_file(tensors, os.fspath(path))
    umask = os.umask(0)  # os.umask is the only way to read the umask: set it, then put it back
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _open_files_to_umask(folder: Path) -> None:
    """Give every file under ``folder`` (a ``fresh_dir``) the mode the umask gives new files: safetensors
    writes through a temporary file of its own and leaves its output 0600, unreadable to anyone else.
    ``folder`` was made with mode 0777 & ~umask, so its mode without the execute bits is that mode."""
    mode = stat.S_IMODE(folder.stat().st_mode) & 0o666
    for file in folder.rglob("*"):
        if file.is_file() and not file.is_symlink() and stat.S_IMODE(file.stat().st_mode) != mode:
            os.chmod(file, mode)


def atomic_dir(path: str | os.PathLike, fill: Callable[[Path], None], *, carry: bool = True) -> None:
    """Let ``fill(tmp)`` write into a temporary sibling of ``path``, then swap it in with renames.

    The previous directory is removed only after the new one is in place, so an interrupted
    write (crash, Ctrl-C, full disk) never destroys what was there. With ``carry``, sub-folders of the
    previous version that the new one does not have (a training run's ``checkpoints/``) are carried over.
    Between the renames the previous version sits at ``.<name>.previous``; ``recover`` puts things back
    if a process was killed right there. The caller owns ``path`` (``destination``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    if path.exists() and not path.is_dir():
        raise DeltatuneError(f"{path} exists and is not a directory: choose another output path")
    tmp = fresh_dir(path.parent, f".{path.name}.tmp-")
    prev = _previous(path)
    moved = False
    carried: list[str] = []
    try:
        fill(tmp)
        _open_files_to_umask(tmp)
        if path.is_dir() and carry:
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


# -- one writer per folder, and nothing replaced that is not the writer's own --------------------
REPORT_MARKER = "deltatune-report.json"  # names the writer of a report folder (report_folder)


@dataclass(frozen=True)
class OutputKind:
    """What a writer writes, so that ``destination`` knows what it may replace without being told to."""

    what: str  # how messages name it
    marker: str | None = None  # a folder holding this file is this kind's output (None: only an empty folder is)
    files: frozenset[str] | None = None  # every file such a folder holds at its top (None: any)
    fix: str = "pass --overwrite to replace it (overwrite=True in Python)"

    def owns(self, path: Path, names: list[str]) -> bool:
        """``path`` (holding ``names``) is an output of this kind: its own files, and sub-folders (which stay)."""
        if self.marker is None or self.marker not in names:
            return False
        return self.files is None or all(n in self.files or (path / n).is_dir() for n in names)


OUTPUT_KINDS = {
    "artifact": OutputKind("a deltatune artifact", META_FILE, frozenset({META_FILE, TENSOR_FILE})),
    # (an SVD export adds its report, export-report.json: still the export's own kind of output)
    "peft": OutputKind("a PEFT adapter", "adapter_config.json",
                       frozenset({"adapter_config.json", "adapter_model.safetensors", "README.md",
                                  "export-report.json"})),
    "gguf": OutputKind("a GGUF export", "model.gguf", frozenset({"model.gguf"})),
    "model": OutputKind("a saved model (a save_pretrained folder)", "config.json"),
    "data": OutputKind("a data step's output", "manifest.json", frozenset({"manifest.json", "data.jsonl"})),
    # a folder of many outputs written over a long time (the demo's report, a study script's runs): see report_folder
    "report": OutputKind("a deltatune report folder", REPORT_MARKER, fix="remove it first"),
    # a run adds to its folder as it goes (checkpoints, then the artifact): it starts in an empty one
    "run": OutputKind("a training run", fix="pass --resume to continue the run there or --overwrite to replace it "
                                            "(resume=True / overwrite=True in Python)"),
}


@dataclass
class Destination:
    """A folder one writer owns (see ``destination``); its writes swap the new contents in atomically."""

    path: Path
    kind: str
    carry: bool  # a write keeps the sub-folders of what is there (a run's checkpoints/); not when replacing it

    def write(self, fill: Callable[[Path], None]) -> Path:
        atomic_dir(self.path, fill, carry=self.carry)
        return self.path

    def write_tensors(self, tensors: dict[str, torch.Tensor], tensor_file: str, json_files: dict[str, Any], *,
                      checksum_into: str | None = None, text_files: dict[str, str] | None = None) -> Path:
        write_tensor_dir(self.path, tensors, tensor_file, json_files, checksum_into=checksum_into, carry=self.carry,
                         text_files=text_files)
        return self.path


class _Busy(DeltatuneError):
    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is in use by {holder} (a deltatune process writing it): wait until it is done, "
                         "or write to another folder")
        self.holder = holder


_OWNED: dict[Path, tuple[int, Destination]] = {}  # folders this process owns: the owning thread, the destination


def _lock_file(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        pid = ""
    return f"PID {pid}" if pid.isdigit() else "another process"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _lock(path: Path) -> int:
    """Take the advisory lock of ``path`` (the file ``.<name>.lock`` beside it) without waiting; its holder
    writes its PID into it, for the message another process gets. The kernel releases it when the process
    dies, so a killed run never leaves its folder locked."""
    lock = _lock_file(path)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise _Busy(path, holder) from None
        if _same_file(fd, lock):  # else its last holder removed it as we opened it: take the new one
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _unlock(path: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(_lock_file(path))  # removed while still held: nothing is left beside the folder
    os.close(fd)


def _refuse_overlap(path: Path, inputs: Iterable[Any]) -> None:
    """Refuse an output that is an input, lies inside one (the base model's folder) or holds one: replacing
    it would destroy what the writer reads."""
    real = path.resolve()
    for item in inputs:
        if not isinstance(item, str | os.PathLike) or not os.path.exists(item):
            continue  # a shipped model's name, an in-memory model: nothing on disk to protect
        source = Path(item).resolve()
        where = "is" if real == source else "lies inside" if source in real.parents else \
            "holds" if real in source.parents else None
        if where is not None:
            raise DeltatuneError(f"the output {path} {where} {item}, which this command reads: "
                                 "write the output to a folder apart from its inputs")


def _make_room(path: Path, kind: str, overwrite: bool, resume: bool) -> bool:
    """Check what ``path`` holds against what a ``kind`` writer may replace; returns whether its sub-folders stay."""
    if path.exists() and not path.is_dir():
        raise DeltatuneError(f"{path} exists and is not a folder: choose another output path")
    names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    spec = OUTPUT_KINDS[kind]
    if not names or resume or spec.owns(path, names):
        return True
    if overwrite:
        if spec.marker is None:  # a run writes into its folder as it goes: the old contents go now
            shutil.rmtree(path)
            return True
        return False
    listing = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    not_own = f" and is not {spec.what}" if spec.marker is not None else ""
    raise DeltatuneError(f"{path} is not empty{not_own} (it holds {listing}): choose another output folder, or {spec.fix}")


@contextlib.contextmanager
def destination(out: str | os.PathLike, kind: str, *, inputs: Iterable[Any] = (), overwrite: bool = False,
                resume: bool = False) -> Iterator[Destination]:
    """Own the folder ``out`` for writing a ``kind`` output (``OUTPUT_KINDS``) until the block ends: the one
    gate of every writer.

    It takes the folder's lock (another process gets "in use by PID N"), finishes a swap that a killed writer
    left half done, refuses ``out`` when it is, lies inside or holds one of ``inputs`` (what the writer reads:
    artifacts, the base model's folder, data), and refuses a folder that holds anything but this kind's own
    output unless ``overwrite`` (then all of it is replaced) or ``resume`` (a run continued where it stopped).
    Writes go through the ``Destination`` it yields (atomic swaps). A writer called inside the block for the
    same folder (a run saving its artifact) shares it without checking again.
    """
    path = Path(os.path.abspath(out))
    owned = _OWNED.get(path)
    if owned is not None and owned[0] == threading.get_ident():
        yield owned[1]
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock(path)
    try:
        recover(path)
        _refuse_overlap(path, inputs)
        dest = Destination(path, kind, carry=_make_room(path, kind, overwrite, resume))
        _OWNED[path] = (threading.get_ident(), dest)
        try:
            yield dest
        finally:
            del _OWNED[path]
    finally:
        _unlock(path, fd)


def replace_text(path: Path, text: str) -> None:
    """Write ``path`` whole (UTF-8) through a temporary sibling and a rename: a crash leaves the old file or the
    new one."""
    replace_bytes(path, text.encode("utf-8"))


def replace_bytes(path: Path, data: bytes) -> None:
    """Write ``path`` whole through a temporary sibling and a rename: a crash leaves the old file or the new one.
    (``open`` gives it the umask's mode, as every output of a run.)"""
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(6)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def report_folder(out: str | os.PathLike, writer: str, *, resume: bool = False) -> Iterator[Path]:
    """Own ``out`` for ``writer`` (the demo, a study script), which fills it with many outputs over a long time:
    runs, reports, plots. Taken: a new or empty folder, or one holding an earlier report of the same writer (its
    marker ``REPORT_MARKER`` says whose). Without ``resume`` the earlier report goes first, so that no output of an
    older run mixes with the new ones; with it, what is there stays for the writer to reuse. Refused: a folder
    holding anything else, or another writer's report. The folder stays locked against other processes until the
    block ends (runs inside it own their sub-folders with their own locks)."""
    with destination(out, "report") as dest:
        marker = dest.path / REPORT_MARKER
        if marker.is_file():
            try:
                kept = json.loads(marker.read_text()).get("writer")
            except (json.JSONDecodeError, AttributeError):
                kept = None
            if kept != writer:
                raise DeltatuneError(f"{out} holds the output of {kept or 'another writer'}, not of {writer}: "
                                     "choose another output folder, or remove it first")
            if not resume:
                for child in dest.path.iterdir():
                    (shutil.rmtree if child.is_dir() and not child.is_symlink() else os.unlink)(child)
        dest.path.mkdir(parents=True, exist_ok=True)
        replace_text(marker, json.dumps({"writer": writer}) + "\n")
        yield dest.path


def _recover_to_read(path: Path) -> None:
    """Before a read: finish a swap a killed writer left half done, but never one that a live writer is making
    (it holds the lock: its swap is in progress, not broken, and its temporary folder is its work)."""
    if Path(os.path.abspath(path)) in _OWNED or not (_previous(path).is_dir() or _temporaries(path)):
        return
    try:
        fd = _lock(path)
    except _Busy as busy:
        if not path.exists():
            raise DeltatuneError(f"{path} is being replaced right now by {busy.holder}: read it again when "
                                 "that process is done") from None
        return
    except OSError:
        return  # a folder this process may not write to: read what is there
    try:
        recover(path)
    finally:
        _unlock(path, fd)


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


def check_file(path: Path, expected: dict[str, Any], record: str) -> None:
    """Raise unless ``path`` has the size and sha256 that ``record`` (the JSON file beside it) says it was
    written with; a record without them (written by an older deltatune) checks nothing."""
    size = path.stat().st_size
    if "bytes" in expected and size != expected["bytes"]:
        raise DeltatuneError(f"{path} is truncated or corrupted: {size} bytes, {record} says {expected['bytes']}")
    if "sha256" in expected and sha256_file(path) != expected["sha256"]:
        raise DeltatuneError(f"{path} is corrupted: its checksum does not match {record}")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def write_tensor_dir(path: str | os.PathLike, tensors: dict[str, torch.Tensor], tensor_file: str,
                     json_files: dict[str, Any], *, checksum_into: str | None = None, carry: bool = True,
                     text_files: dict[str, str] | None = None) -> None:
    """Atomically write a folder of one safetensors file (streamed to disk, not built in memory), JSON files
    and text files (a model card); ``checksum_into`` names the JSON file that records the tensor file's size and sha256
    (``check_file`` checks it on reading). The caller owns ``path`` (``destination``)."""

    def fill(tmp: Path) -> None:
        save_file(_for_saving(tensors), str(tmp / tensor_file), metadata={"format": "pt"})
        if checksum_into is not None:
            json_files[checksum_into] = dict(json_files[checksum_into])
            json_files[checksum_into]["files"] = {
                tensor_file: {"bytes": (tmp / tensor_file).stat().st_size, "sha256": sha256_file(tmp / tensor_file)}
            }
        for name, doc in json_files.items():
            (tmp / name).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        for name, text in (text_files or {}).items():
            (tmp / name).write_text(text)
        for name in [tensor_file, *json_files, *(text_files or {})]:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())

    atomic_dir(path, fill, carry=carry)


def check_whole(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse tensors that are not the whole delta: a DTensor (one rank's shard), or empty tensors (shape [0]: what a
    parameter partitioned by DeepSpeed ZeRO-3 or FSDP looks like on a rank that did not gather it) where they cannot
    be the delta's own: every tensor empty (PEFT's "adapter saved empty"), or an empty tensor next to a non-empty one
    of the same form (a low-rank A without its B). A form whose tensors are all empty next to others that are not
    is a real delta: a sparse layer that was given no entries."""
    from torch.distributed.tensor import DTensor

    for name, t in tensors.items():
        if isinstance(t, DTensor):
            raise DeltatuneError(
                f"artifact tensor {name!r} is one rank's shard of a sharded (FSDP) tensor, not the whole tensor: "
                "gather the delta first (DTensor.full_tensor(), or train with deltatune's loop, which does)")
    empty = [n for n, t in tensors.items() if t.numel() == 0]
    filled_forms = {n.rsplit(".", 1)[0] for n, t in tensors.items() if t.numel()}
    suspect = empty if len(empty) == len(tensors) else [n for n in empty if n.rsplit(".", 1)[0] in filled_forms]
    if suspect:
        t = tensors[suspect[0]]
        raise DeltatuneError(
            f"artifact tensor {suspect[0]!r} is empty (shape {list(t.shape)}): a parameter partitioned by ZeRO-3 / "
            "FSDP and not gathered before saving; gather the parameters first (nothing was written)")


def write_artifact(path: str | os.PathLike, meta: dict[str, Any], tensors: dict[str, torch.Tensor], *,
                   overwrite: bool = False) -> None:
    """Write an artifact at ``path``: a new or empty folder, or one holding an artifact (replaced atomically);
    ``overwrite`` replaces any other folder. Tensors that are not whole are refused before anything is written
    (``check_whole``)."""
    check_whole(tensors)
    with destination(path, "artifact", overwrite=overwrite) as dest:
        dest.write_tensors(tensors, TENSOR_FILE, {META_FILE: meta}, checksum_into=META_FILE)


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    _recover_to_read(path)
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
    check_file(tensor_path, meta.get("files", {}).get(TENSOR_FILE, {}), META_FILE)
    try:
        return load_file(tensor_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise DeltatuneError(f"{tensor_path} cannot be read ({e}): the file is truncated or corrupted") from e


def read_artifact(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    meta = read_meta(path)
    return meta, read_tensors(path, meta)
