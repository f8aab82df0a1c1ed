"""How the lottery-ticket methods (LT-SFT, ID3) turn a dense delta into a sparse one: a dense delta stored in the
sparse encoding, and the exact global top-k over many tensors that picks the entries to keep."""

from __future__ import annotations

import torch

from deltatune.core.forms.dense import Dense
from deltatune.core.forms.sparse import index_dtype
from deltatune.errors import DeltatuneError

EPS = 1e-7  # the official export keeps entries with |Δ| > 1e-7 (SparseFineTuner.sft)
CHUNK = 1 << 24  # entries scored at once by the top-k selection (bounds its extra memory)


def delta_dtype(base: torch.Tensor) -> torch.dtype:
    """As the sparse form: a half-precision base gets fp32 deltas (small updates would round away)."""
    return base.dtype if base.dtype in (torch.float32, torch.float64) else torch.float32


# -- the dense delta stored sparsely --------------------------------------------------------------
class DenseAsSparse(Dense):
    """A dense delta that trains as one but is stored in the sparse encoding: ``indices`` (flat,
    sorted) and ``values`` of the entries with |Δ| > 1e-7, so an artifact written in the full phase
    has the tensor names of the sparse phase and loads into a ``Sparse`` form."""

    def support(self) -> torch.Tensor:
        """Flat indices of the entries the artifact keeps."""
        return torch.nonzero(self.delta.detach().reshape(-1).abs() > EPS, as_tuple=True)[0]

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        idx = self.support().long()
        return {"indices": idx.to(index_dtype(self.delta.numel())), "values": self.delta.detach().reshape(-1)[idx]}

    def stored_tensors_names(self) -> list[str]:
        return ["indices", "values"]

    def optional_tensors(self) -> set[str]:
        return set()

    def load_stored(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != {"indices", "values"} or tensors["indices"].numel() != tensors["values"].numel():
            raise DeltatuneError(f"the delta of {self.param_name} needs 'indices' and 'values' of one length")
        idx = tensors["indices"].long().to(self.delta.device)
        with torch.no_grad():
            self.delta.zero_()
            self.delta.view(-1)[idx] = tensors["values"].to(self.delta)
        self.loaded_support(idx)

    def loaded_support(self, idx: torch.Tensor) -> None:
        """Called with the flat indices an artifact loaded (a subclass may track them)."""


# -- selection ------------------------------------------------------------------------------------
def top_k_entries(scores: dict[str, torch.Tensor], k: int, exclude: dict[str, torch.Tensor] | None = None,
                  chunk: int = CHUNK) -> dict[str, torch.Tensor]:
    """The ``k`` entries with the largest |score| over all tensors, leaving out the flat positions in
    ``exclude``: exactly ``k`` of them (where entries tie at the threshold, the first ones in tensor and
    index order; a ``>=`` threshold would overshoot), as sorted flat indices per tensor.

    A radix select on the fp32 bit patterns (for x >= 0 they order as the values do): a histogram of the
    high 16 bits finds the threshold's bin, one of the low 16 bits inside it the exact threshold, a
    third pass collects the entries. Chunk by chunk, so the extra memory is O(chunk + k), never a copy
    of every entry (the official code builds a Python list of all of them)."""
    exclude = exclude or {}
    free = sum(t.numel() for t in scores.values()) - sum(exclude[n].numel() for n in scores if n in exclude)
    if not 0 <= k <= free:
        raise DeltatuneError(f"cannot choose {k} new entries: only {free} maskable entries are not chosen yet")
    out = {n: torch.empty(0, dtype=index_dtype(t.numel()), device=t.device) for n, t in scores.items()}
    if k == 0:
        return out
    device = next(iter(scores.values())).device

    def keys(name: str):
        """(offset, int32 key) per chunk; excluded entries get key -1."""
        flat = scores[name].detach().reshape(-1)
        ex = exclude.get(name)
        ex = ex.to(flat.device).long() if ex is not None and ex.numel() else None
        for lo in range(0, flat.numel(), chunk):
            key = flat[lo:lo + chunk].float().abs().view(torch.int32).to(device)
            if ex is not None:
                key[ex[(ex >= lo) & (ex < lo + key.numel())] - lo] = -1
            yield lo, key

    high = torch.zeros(1 << 15, dtype=torch.long, device=device)  # sign bit is 0: 15 high bits
    for name in scores:
        for _, key in keys(name):
            high += torch.bincount(key[key >= 0] >> 16, minlength=1 << 15)
    hi, need = _cut(high, k)
    low = torch.zeros(1 << 16, dtype=torch.long, device=device)
    for name in scores:
        for _, key in keys(name):
            low += torch.bincount(key[(key >> 16) == hi] & 0xFFFF, minlength=1 << 16)
    lo_bits, ties = _cut(low, need)
    threshold = (hi << 16) | lo_bits
    for name, t in scores.items():
        found = []
        for lo, key in keys(name):
            found.append(torch.nonzero(key > threshold).flatten() + lo)
            if ties:
                equal = torch.nonzero(key == threshold).flatten()[:ties] + lo
                ties -= equal.numel()
                found.append(equal)
        out[name] = torch.cat(found).sort().values.to(t.device, index_dtype(t.numel())) if found else out[name]
    return out


def _cut(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest entry of a histogram, and how many entries to take from it."""
    from_top = hist.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor([k], device=hist.device)).item())
    b = hist.numel() - 1 - j
    return b, k - int(from_top[j].item() - hist[b].item())
