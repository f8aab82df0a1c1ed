"""ComPEFT artifacts (Yadav et al., TMLR 2024, arXiv 2311.13171): a delta compressed by ``dt.compress``.

This method is made, not trained: ``deltatune.ops.compress.compress`` writes its artifact (the config records
the source method and, per compressed tensor, its form, shape and position encoding); ``dt.load`` builds
here, for each compressed base tensor, a form that decodes the bit-packed payload (positions as a
Golomb-Rice code or a bitmap, one sign bit per kept entry, one fp32 scale) into an ordinary delta:

- ``PackedSparse``: the kept entries as a sparse form (±scale values), exact merge / unmerge, composes;
- ``PackedDense``: the same as a dense form where more than half the entries are kept (less memory);
- ``PackedLowRank``: ternary A and B of a LoRA compressed with ``lowrank="factors"`` (ΔW = s·B̂·Â).

Their ``stored_tensors`` write the packed payload again, so a loaded artifact saves back bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn

from deltatune.core.forms.base import Form
from deltatune.core.forms.dense import Dense
from deltatune.core.forms.lowrank import LowRank
from deltatune.core.forms.sparse import Sparse
from deltatune.core.registry import Built, Traits, register
from deltatune.core.targeting import sites_of
from deltatune.errors import DeltatuneError
from deltatune.methods._bitpack import decode, encode, packed_bytes


@dataclass
class CompeftConfig:
    source_method: str = ""  # the method of the artifact that was compressed
    # the compressed artifact's original method options (recorded, not used to build)
    source_config: dict[str, Any] = field(default_factory=dict)
    source_bytes: int = 0  # the source artifact's stored bytes (kept here so a re-saved artifact still says it)
    density: float = 0.2  # fraction of the task vector kept: the official code's k=20 (percent)
    alpha: float = 1.0  # kept entries become ±alpha·std(τ): the official replace_factor default
    scope: Literal["global", "tensor"] = "global"  # one top-k and σ over all tensors (official code) or per tensor
    lowrank: Literal["delta", "factors"] = "delta"  # low-rank deltas: compress ΔW, or A and B (the paper's LoRA)
    values: Literal["ternary", "pruned"] = "ternary"  # pruned: the spec's pruning-only baseline (values kept)
    # per compressed form: {"form": sparse|dense|lowrank, "shape", and "k", "encoding", "rice_bits", "bits"
    # (lowrank: "r", "scale" and those under "A" and "B")}
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.density, bool) or not 0 < self.density <= 1:
            raise ValueError(f"density={self.density} must be in (0, 1]")
        if not self.alpha > 0:
            raise ValueError(f"alpha={self.alpha} must be positive")


def _names(mode: str, prefix: str = "") -> list[str]:
    local = ["positions", "values"] if mode == "pruned" else ["positions", "signs", "scale"]
    return [prefix + n for n in local]


def _frozen_dtype(base: torch.Tensor) -> torch.dtype:
    # as the sparse form: ±scale stays fp32 next to a half-precision base
    return base.dtype if base.dtype in (torch.float32, torch.float64) else torch.float32


class PackedSparse(Sparse):
    """The kept entries of one base tensor as a sparse delta, stored as positions + signs + scale."""

    def __init__(self, sites: list[tuple[nn.Module, str]], param_name: str, record: dict, mode: str) -> None:
        super().__init__(sites, param_name, indices=torch.empty(0, dtype=torch.long))
        self.record, self.mode = record, mode
        self.values.requires_grad_(False)

    def stored_tensors_names(self) -> list[str]:
        return _names(self.mode)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        stored, enc = encode(self.indices, self.values, self.numel_base, self.mode)
        self.record.update(enc)  # the config that is saved with these tensors describes them
        return stored

    def stored_bytes(self) -> int:
        return packed_bytes(self.record, self.mode)

    def load_stored(self, tensors: dict[str, torch.Tensor]) -> None:
        idx, vals = decode(tensors, self.numel_base, self.record, self.mode)
        self.set_support(idx, vals)


class PackedDense(Dense):
    """The kept entries of one base tensor as a dense delta (most entries kept), stored packed."""

    def __init__(self, sites: list[tuple[nn.Module, str]], param_name: str, record: dict, mode: str) -> None:
        base = getattr(*sites[0])
        super().__init__(sites, param_name, dtype=_frozen_dtype(base))
        self.record, self.mode = record, mode
        self.delta.requires_grad_(False)

    def stored_tensors_names(self) -> list[str]:
        return _names(self.mode)

    def optional_tensors(self) -> set[str]:
        return set()

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        flat = self.delta.detach().reshape(-1)
        idx = torch.nonzero(flat).view(-1)
        stored, enc = encode(idx, flat[idx], flat.numel(), self.mode)
        self.record.update(enc)
        return stored

    def stored_bytes(self) -> int:
        return packed_bytes(self.record, self.mode)

    def load_stored(self, tensors: dict[str, torch.Tensor]) -> None:
        idx, vals = decode(tensors, self.delta.numel(), self.record, self.mode)
        with torch.no_grad():
            self.delta.zero_()
            self.delta.view(-1)[idx.to(self.delta.device)] = vals.to(self.delta)


class PackedLowRank(LowRank):
    """ΔW = s·B̂·Â with ternary factors (``lowrank="factors"``), each stored as positions + signs + scale."""

    def __init__(self, module: nn.Module, record: dict, mode: str, tied: list[tuple[nn.Module, str]]) -> None:
        r, scale = int(record["r"]), float(record["scale"])
        super().__init__(module, r, scale * r, tied=tied)
        self.scale = scale  # as recorded (rsLoRA, rank / alpha patterns): not recomputed from alpha
        self.record, self.mode = record, mode
        self.requires_grad_(False)

    def stored_tensors_names(self) -> list[str]:
        return _names(self.mode, "A.") + _names(self.mode, "B.")

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for part in ("A", "B"):
            flat = getattr(self, part).detach().reshape(-1)
            idx = torch.nonzero(flat).view(-1)
            stored, enc = encode(idx, flat[idx], flat.numel(), self.mode)
            self.record[part] = enc
            out.update({f"{part}.{n}": t for n, t in stored.items()})
        return out

    def stored_bytes(self) -> int:
        return packed_bytes(self.record["A"], self.mode) + packed_bytes(self.record["B"], self.mode)

    def load_stored(self, tensors: dict[str, torch.Tensor]) -> None:
        for part in ("A", "B"):
            mine = {n[2:]: t for n, t in tensors.items() if n.startswith(f"{part}.")}
            target = getattr(self, part)
            idx, vals = decode(mine, target.numel(), self.record[part], self.mode)
            with torch.no_grad():
                target.zero_()
                target.view(-1)[idx.to(target.device)] = vals.to(target)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ternary factors" if self.mode == "ternary" else super().extra_repr()


def _lookup(model: nn.Module, name: str, record: dict) -> tuple[nn.Module, nn.Parameter]:
    owner, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(owner)
        param = getattr(module, attr)
    except AttributeError as e:
        raise DeltatuneError(f"the compressed delta names {name!r}, which this model does not have: it was made for "
                             "another architecture") from e
    if not isinstance(param, nn.Parameter) or list(param.shape) != list(record["shape"]):
        raise DeltatuneError(f"the compressed delta of {name!r} expects a tensor of shape {record['shape']}: it was "
                             "made for another base model")
    return module, param


# why it cannot train on a quantized base (deltatune.core.quantized): said in its one-line refusal
QUANTIZED_BASE = (
    "a ComPEFT delta is made from a saved full-precision delta (dt.compress), not trained"
)


@register(
    "compeft",
    CompeftConfig,
    "ComPEFT: a saved weight delta compressed to sparse ternary ±scale (made by dt.compress, not trained)",
    traits=Traits(quantized_base=QUANTIZED_BASE, made_by="compress"), family="made from artifacts"
)
def build(model: nn.Module, cfg: CompeftConfig, *, loading: bool = False) -> Built:
    if not loading:
        raise DeltatuneError(
            "compeft is not trained: it is what dt.compress / `deltatune compress ARTIFACT --out OUT` makes of a saved "
            "delta. Train the source method, save it, then compress the artifact"
        )
    forms: dict[str, Form] = {}
    # tensors a parametrisation holds (biases, norms) before the weights whose forward a sparse form replaces
    for name, record in sorted(cfg.tensors.items(), key=lambda kv: (kv[0].endswith(".weight"), kv[0])):
        module, param = _lookup(model, name, record)
        kind = record.get("form")
        if kind == "lowrank":
            tied = [s for s in sites_of(model, param) if s[0] is not module]
            forms[name] = PackedLowRank(module, record, cfg.values, tied)
        elif kind in ("sparse", "dense"):
            cls = PackedDense if kind == "dense" else PackedSparse
            forms[name] = cls(sites_of(model, param), name, record, cfg.values)
        else:
            raise DeltatuneError(f"the compressed delta of {name!r} has an unknown form {kind!r}: upgrade deltatune")
    return Built(forms)
