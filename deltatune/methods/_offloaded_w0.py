"""The model's own tensors trained in place with W0 kept off the device (in a file on disk, or in host memory):
how a zeroth-order method trains the full model at the memory of inference (``mezo`` explains why), and how
``full`` and ``lisa`` train at the memory of plain full fine-tuning (``keep_w0: disk``; ``kept_w0_forms``)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn

from deltatune.core.forms.inplace import InPlace
from deltatune.errors import DeltatuneError
from deltatune.methods._common import per_parameter_forms

KEEP_W0 = ("disk", "memory")
# entries of W settled at once: the temporaries of a settle (two of these, and a chunk of W0 read from its file) stay
# a few MiB whatever a tensor's size. A whole-tensor settle of SmolLM2's tied embedding would hold 3 × 113 MiB
SETTLE_CHUNK = 1 << 20


class TensorFile:
    """A tensor kept in a raw file (its bytes, never pickled), mapped back into memory when read. The file is
    removed when this object is collected or the process exits."""

    def __init__(self, tensor: torch.Tensor, directory: str | None = None) -> None:
        # a copy: numpy's view below would pin the storage of the model's own tensor as not resizable, which FSDP2
        # frees and regrows around every forward ("Trying to resize storage that is not resizable")
        t = tensor.detach().to("cpu", copy=True).contiguous()
        self.shape, self.dtype, self.nbytes = t.shape, t.dtype, t.numel() * t.element_size()
        if directory is not None:
            os.makedirs(directory, exist_ok=True)  # a w0_dir named in a config need not exist yet
        fd, self.path = tempfile.mkstemp(prefix="deltatune-w0-", suffix=".bin", dir=directory)
        self._remove = weakref.finalize(self, _remove_file, self.path)
        with os.fdopen(fd, "wb") as f:
            t.reshape(-1).view(torch.uint8).numpy().tofile(f)

    def read(self) -> torch.Tensor:
        """The tensor, memory-mapped copy-on-write: its pages are read from disk as they are used."""
        if self.nbytes == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        raw = torch.from_file(self.path, shared=False, size=self.nbytes, dtype=torch.uint8)
        return raw.view(self.dtype).view(self.shape)

    def chunks(self, size: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(start, end, entries [start, end) of the flattened tensor), read from the file into one reused host
        buffer: read, not mapped, so nothing of W0 stays resident after a chunk is used. Each chunk is valid until
        the next one is read."""
        n, item = self.shape.numel(), self.dtype.itemsize
        if n == 0:
            return
        buffer = torch.empty(min(size, n) * item, dtype=torch.uint8)
        with open(self.path, "rb", buffering=0) as f:
            for start in range(0, n, size):
                end = min(n, start + size)
                view = buffer[: (end - start) * item]
                if f.readinto(memoryview(view.numpy())) != view.numel():
                    raise DeltatuneError(f"{self.path} (W0 of a trained tensor) is shorter than the tensor: it was "
                                         "changed or truncated while training ran; train again from the base model")
                yield start, end, view.view(self.dtype)


def _remove_file(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


class OffloadedInPlace(InPlace):
    """``InPlace`` with its W0 copy off the device: in a file on disk (``keep_w0="disk"``, the default: the
    process holds nothing but the model, as inference does) or in host memory (``"memory"``: no disk
    writes, but a second copy of every trained tensor in RAM). W0 is written once, when a tensor is first
    updated, and read back when the delta is needed (the artifact, merge, detach) and, chunk by chunk, when W
    is settled.

    W is settled (``W0 + (W − W0) == W`` exactly: the artifact reproduces it bit for bit) whenever the
    artifact is written or the delta merged, and, while ``settle_every_step`` is on (the default: gradient
    training through ``.backward()``, as the method matrix does), before the first forward after each
    optimizer step as ``InPlace`` does. A zeroth-order policy turns it off when it takes its first step:
    it would read W0 back at every step."""

    def __init__(self, sites: list[tuple[nn.Module, str]], param_name: str, keep_w0: str = "disk",
                 directory: str | None = None) -> None:
        self.__dict__["_w0_kept"] = None  # before InPlace.__init__ assigns w0 through the property below
        self.__dict__["_keep"] = (keep_w0, directory)
        super().__init__(sites, param_name)
        self.settle_every_step = True

    def _keep_w0(self, value: torch.Tensor | None) -> None:
        keep, directory = self.__dict__["_keep"]
        if value is None:
            kept: TensorFile | torch.Tensor | None = None
        elif keep == "disk":
            kept = TensorFile(value, directory)
        else:
            kept = value.detach().to("cpu", copy=True).contiguous()  # contiguous: settle reads it in flat chunks
        self.__dict__["_w0_kept"] = kept

    def _w0_host(self) -> torch.Tensor | None:
        kept = self.__dict__["_w0_kept"]
        return kept.read() if isinstance(kept, TensorFile) else kept

    @property
    def w0(self) -> torch.Tensor | None:  # type: ignore[override]
        """W0 on the weight's device (read from its file, or a temporary copy on an accelerator)."""
        host = self._w0_host()
        return None if host is None else host.to(self.weight.device)

    @w0.setter
    def w0(self, value: torch.Tensor | None) -> None:
        self._keep_w0(value)

    @property
    def touched(self) -> bool:
        return self.__dict__["_w0_kept"] is not None

    def snapshot(self) -> None:
        if self.__dict__["_w0_kept"] is None:
            self._check_base_unwritten()  # as InPlace: W0 is W as it was at attach
            self._keep_w0(self.weight)

    def _apply(self, fn: Any, recurse: bool = True) -> OffloadedInPlace:
        # .to(device) moves the weight; W0 stays where it is kept and only follows a change of dtype
        kept, self.__dict__["_w0_kept"] = self.__dict__["_w0_kept"], None
        super()._apply(fn, recurse)
        self.__dict__["_w0_kept"] = kept
        if kept is not None and kept.dtype != self.weight.dtype:
            self._keep_w0(self._w0_host().to(self.weight.dtype))  # type: ignore[union-attr]
        return self

    def _w0_chunks(self, size: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """W0 in flat chunks on the weight's device: read from its file, or slices of the host copy."""
        kept = self.__dict__["_w0_kept"]
        device = self.weight.device
        if isinstance(kept, TensorFile):
            for start, end, chunk in kept.chunks(size):
                yield start, end, chunk.to(device)
            return
        flat = kept.view(-1)
        for start in range(0, flat.numel(), size):
            end = min(flat.numel(), start + size)
            yield start, end, flat[start:end].to(device)

    def settle(self, force: bool = False) -> None:
        if not self.touched or not self.attached:
            return
        if not force and (not self.settle_every_step or self.weight._version == self._settled_version):
            return
        if not self.weight.is_contiguous():  # no flat view to settle in place chunk by chunk
            self._settle_whole()
        else:
            # chunk by chunk: the rounds are element-wise and a settled entry is a fixed point, so this gives
            # InPlace.settle's result bit for bit (an entry gets min(4, rounds to its fixed point) rounds either way)
            flat = self.weight.detach().view(-1)  # shares W's storage and version counter
            with torch.no_grad():
                for start, end, w0 in self._w0_chunks(SETTLE_CHUNK):
                    w = flat[start:end]
                    for _ in range(4):  # as InPlace.settle: one or two rounds reach the fixed point
                        again = w0 + (w - w0)
                        if torch.equal(again, w):
                            break
                        w.copy_(again)
        self._settled_version = self.weight._version

    def _settle_whole(self) -> None:
        w0 = self.w0  # one read per settle
        with torch.no_grad():
            for _ in range(4):
                again = w0 + (self.weight - w0)
                if torch.equal(again, self.weight):
                    break
                self.weight.copy_(again)

    def _forward_pre_hook(self, module: nn.Module, args: Any) -> None:
        if not self.touched and self.weight.requires_grad and torch.is_grad_enabled():
            self.snapshot()  # gradient training: before any optimizer step writes W
        self.settle()

    _forward_pre_hook.prepares_weight = True  # type: ignore[attr-defined]  # as InPlace's: it never reads the input


def offloaded_forms(model: nn.Module, params: Iterable[tuple[str, nn.Parameter]], keep_w0: str = "disk",
                    directory: str | None = None) -> dict[str, OffloadedInPlace]:
    """One in-place delta per floating parameter (tied parameters once), all trainable."""
    forms = per_parameter_forms(model, params, lambda sites, name: OffloadedInPlace(sites, name, keep_w0, directory))
    for form in forms.values():
        form.weight.requires_grad_(True)
    return forms


def check_keep_w0(keep_w0: str) -> None:
    """A config's ``keep_w0`` (raised as ValueError: the config machinery names the option and the method)."""
    if keep_w0 not in KEEP_W0:
        raise ValueError(f"keep_w0={keep_w0!r} must be 'disk' or 'memory' (where W0 waits while W trains)")


def kept_w0_forms(model: nn.Module, params: Iterable[tuple[str, nn.Parameter]], keep_w0: str = "disk",
                  directory: str | None = None, trainable: bool = True) -> dict[str, InPlace]:
    """The in-place forms of a gradient-trained full-parameter method (``full``, ``lisa``), one per floating
    parameter (tied ones once). ``keep_w0="disk"``: W0 goes to a file when a tensor first trains, so the process
    holds what plain fine-tuning holds; W is still settled after every optimizer step, reading W0 back in chunks.
    ``"memory"``: ``InPlace``, W0 a copy beside the weight on its device (one more model-size of the trained
    tensors, no read per step). Both train and store the same bits."""
    check_keep_w0(keep_w0)
    if keep_w0 == "memory":
        forms: dict[str, InPlace] = per_parameter_forms(model, params, InPlace)
    else:
        forms = dict(per_parameter_forms(model, params,
                                         lambda sites, name: OffloadedInPlace(sites, name, "disk", directory)))
    for form in forms.values():
        form.weight.requires_grad_(trainable)
    return forms
