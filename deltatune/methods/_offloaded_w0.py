"""The model's own tensors trained in place with W0 kept off the device (in a file on disk, or in host memory):
how a zeroth-order method trains the full model at the memory of inference (``mezo`` explains why)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import weakref
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from deltatune.core.forms.inplace import InPlace
from deltatune.methods._common import per_parameter_forms


class TensorFile:
    """A tensor kept in a raw file (its bytes, never pickled), mapped back into memory when read. The file is
    removed when this object is collected or the process exits."""

    def __init__(self, tensor: torch.Tensor, directory: str | None = None) -> None:
        t = tensor.detach().to("cpu").contiguous()  # no copy for a contiguous host tensor
        self.shape, self.dtype, self.nbytes = t.shape, t.dtype, t.numel() * t.element_size()
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


def _remove_file(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


class OffloadedInPlace(InPlace):
    """``InPlace`` with its W0 copy off the device: in a file on disk (``keep_w0="disk"``, the default: the
    process holds nothing but the model, as inference does) or in host memory (``"memory"``: no disk
    writes, but a second copy of every trained tensor in RAM). W0 is written once, when a tensor is first
    updated, and read back only when the delta is needed (the artifact, merge, detach).

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
            kept = value.detach().to("cpu", copy=True)
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

    def settle(self, force: bool = False) -> None:
        if not self.touched or not self.attached:
            return
        if not force and (not self.settle_every_step or self.weight._version == self._settled_version):
            return
        w0 = self.w0  # one read per settle
        with torch.no_grad():
            for _ in range(4):  # as InPlace.settle: one or two rounds reach the fixed point
                again = w0 + (self.weight - w0)
                if torch.equal(again, self.weight):
                    break
                self.weight.copy_(again)
        self._settled_version = self.weight._version

    def _forward_pre_hook(self, module: nn.Module, args: Any) -> None:
        if not self.touched and self.weight.requires_grad and torch.is_grad_enabled():
            self.snapshot()  # gradient training: before any optimizer step writes W
        self.settle()


def offloaded_forms(model: nn.Module, params: Iterable[tuple[str, nn.Parameter]], keep_w0: str = "disk",
                    directory: str | None = None) -> dict[str, OffloadedInPlace]:
    """One in-place delta per floating parameter (tied parameters once), all trainable."""
    forms = per_parameter_forms(model, params, lambda sites, name: OffloadedInPlace(sites, name, keep_w0, directory))
    for form in forms.values():
        form.weight.requires_grad_(True)
    return forms
