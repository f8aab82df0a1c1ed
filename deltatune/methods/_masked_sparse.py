"""DSEE's sparse form: trainable values on a fixed support plus a fixed pruning mask on the base weight, the
mask stored as one bit per entry (``dsee`` explains where support and mask come from)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from deltatune.core.forms.sparse import Sparse, index_dtype
from deltatune.errors import DeltatuneError

# -- masks on disk: one bit per entry of the base tensor ----------------------------------------------
_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_mask(indices: torch.Tensor, numel: int) -> torch.Tensor:
    """Flat positions -> a little-endian bitmap (uint8, ceil(numel/8) bytes): 8x smaller than int32
    indices once more than 1/32 of the entries are pruned."""
    bits = torch.zeros(math.ceil(numel / 8) * 8, dtype=torch.uint8)
    bits[indices.long().cpu()] = 1
    return (bits.view(-1, 8) << _SHIFTS).sum(1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != math.ceil(numel / 8):
        raise DeltatuneError(
            f"a pruning mask of {packed.numel()} {packed.dtype} bytes does not fit a tensor of {numel} entries: "
            "the artifact was made for another base model or is damaged"
        )
    bits = (packed.cpu().unsqueeze(1) >> _SHIFTS) & 1
    return bits.view(-1)[:numel].nonzero().view(-1)


# -- the form: sparse values on Ω plus a fixed pruning mask on W --------------------------------------
class MaskedSparse(Sparse):
    """W = M⊙W0 + scale·scatter(Ω, values): DSEE's S (trainable values on a fixed support, scaled by α/r)
    and a fixed pruning mask M (flat positions of W0 that are zero for good). A mask-only form
    (``trainable=False``, no Ω) prunes a matrix DSEE does not adapt.

    Until it has a support or a mask the form changes nothing and leaves the module's forward alone,
    so a matrix that may be pruned later costs nothing in stage 1."""

    kind = "sparse+mask"

    def __init__(self, sites: list[tuple[nn.Module, str]], param_name: str, indices: torch.Tensor | None = None,
                 *, scale: float = 1.0, trainable: bool = True) -> None:
        base = getattr(*sites[0])
        empty = torch.empty(0, dtype=index_dtype(base.numel()), device=base.device)
        super().__init__(sites, param_name, indices=empty if indices is None else indices, scale=scale)
        self.trainable = trainable
        self.values.requires_grad_(trainable)
        self.register_buffer("pruned", empty.clone())
        # W0 at the pruned positions, taken while unmerged: the delta there is −W0 whatever else is merged
        self.register_buffer("w0_pruned", torch.empty(0, dtype=base.dtype, device=base.device), persistent=False)
        self._idle = False
        self._packed: torch.Tensor | None = None  # the mask as stored, packed once per mask (saves call it often)

    # -- the mask ----------------------------------------------------------------------------------
    @property
    def num_pruned(self) -> int:
        return self.pruned.numel()

    def set_pruned(self, indices: torch.Tensor) -> None:
        """Fix the pruned positions (replacing any earlier mask); W0 must not be merged."""
        if self.merged:
            raise DeltatuneError("cannot change the pruning mask of a merged delta; unmerge first")
        idx = indices.to(self.pruned.device).long()
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            idx = idx.sort().values  # masks from global_smallest arrive sorted: no sort, no unique pass
            if bool((idx[1:] == idx[:-1]).any()):
                raise DeltatuneError(f"pruning mask of {self.param_name} repeats an entry; each may appear once")
        if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= self.numel_base):
            raise DeltatuneError(
                f"pruned position outside {self.param_name} ({self.numel_base} entries): the mask was made for "
                "another base model"
            )
        idx = idx.to(index_dtype(self.numel_base))
        with torch.no_grad():
            self.pruned.data = idx
            self.w0_pruned.data = self.base.detach().reshape(-1)[idx.long()].clone()
        self._packed = None
        self._refresh()

    def set_support(self, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        super().set_support(indices, values)
        self._refresh()

    def support_delta(self) -> torch.Tensor:
        """scale·scatter(Ω, values): DSEE's (α/r)·S⊙M_S, without the pruning mask."""
        return super().delta_weight()

    def delta_weight(self) -> torch.Tensor:
        delta = self.support_delta()
        if self.num_pruned:
            flat = delta.reshape(-1).index_add(0, self.pruned.long(), -self.w0_pruned.to(delta.dtype))
            delta = flat.view(self.shape)
        return delta

    def effective_weight(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.base.detach().to(dtype, copy=True)
        flat = w.view(-1)
        if self.num_pruned:
            flat.index_fill_(0, self.pruned.long(), 0)
        if self.k:
            flat.index_add_(0, self.indices.long(), self.scaled_values().to(dtype))
        return w

    # -- attach lazily: nothing to add, nothing patched ----------------------------------------------
    def attach(self) -> None:
        if self.attached:
            return
        if self.k == 0 and self.num_pruned == 0:
            self.attached = self._idle = True
            return
        super().attach()

    def detach(self) -> None:
        if self.attached and self._idle:
            self.attached = self._idle = False
            return
        super().detach()

    def _refresh(self) -> None:
        if self.attached:
            self.detach()
            self.attach()

    # -- merge: W' = M⊙W + ΔW, exact unmerge --------------------------------------------------------
    def merge(self) -> None:
        if self.merged:
            raise DeltatuneError("this delta is already merged; unmerge it before merging again")
        self.detach()
        with torch.no_grad():
            flat = self.base.data.view(-1)
            touched = torch.unique(torch.cat([self.indices.long(), self.pruned.long()]))
            self._touched, self._saved = touched, flat[touched].clone()
            flat.index_add_(0, self.pruned.long(), -self.w0_pruned.to(flat.dtype))
            flat.index_add_(0, self.indices.long(), self.scaled_values().to(flat.dtype))
            self._merged_at = flat[touched].clone()
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            raise DeltatuneError("this delta is not merged; there is nothing to unmerge")
        with torch.no_grad():
            flat = self.base.data.view(-1)
            if torch.equal(flat[self._touched], self._merged_at):
                flat[self._touched] = self._saved  # untouched since merge: W0 back bit for bit
            else:  # another delta was merged on top at the same entries: subtract ours
                flat.index_add_(0, self.indices.long(), -self.scaled_values().to(flat.dtype))
                flat.index_add_(0, self.pruned.long(), self.w0_pruned.to(flat.dtype))
        self._touched = self._saved = self._merged_at = None
        self.merged = False
        self.attach()

    # -- what it trains and stores -------------------------------------------------------------------
    def stored_tensors(self) -> dict[str, torch.Tensor]:
        out = {"indices": self.indices, "values": self.values.detach()} if self.trainable else {}
        if self.num_pruned:
            if self._packed is None:
                self._packed = pack_mask(self.pruned, self.numel_base)
            out["pruned_mask"] = self._packed
        return out

    def stored_tensors_names(self) -> list[str]:
        return (["indices", "values"] if self.trainable else []) + ["pruned_mask"]

    def optional_tensors(self) -> set[str]:
        return {"pruned_mask"}  # stored only once something is pruned

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stored_tensors().values())

    def load_stored(self, tensors: dict[str, torch.Tensor]) -> None:
        unknown = set(tensors) - set(self.stored_tensors_names())
        if unknown:
            raise DeltatuneError(f"unexpected tensors {sorted(unknown)} for the DSEE delta of {self.param_name}")
        mask = tensors.get("pruned_mask")
        self.set_pruned(unpack_mask(mask, self.numel_base) if mask is not None else self.pruned[:0])
        if self.trainable:
            super().load_stored({k: v for k, v in tensors.items() if k != "pruned_mask"})

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        pruned = state_dict.get(prefix + "pruned")
        if pruned is not None and not torch.equal(pruned.to(self.pruned.device), self.pruned):
            self.set_pruned(pruned)  # a checkpoint taken after pruning, loading into a fresh form
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", pruned={self.num_pruned}"
