"""ComPEFT's bit packing (Yadav et al., 2024): positions of the kept entries as a Golomb-Rice code of their
gaps or as a bitmap, signs as bits, one fp32 scale. Shared by the ``compeft`` method (which decodes) and
``deltatune.ops.compress`` (which encodes)."""

from __future__ import annotations

import math

import numpy as np
import torch

from deltatune.errors import DeltatuneError

GOLDEN = (1 + math.sqrt(5)) / 2


# -- positions: Golomb-Rice code of the gaps, or a bitmap ----------------------------------------------------
def rice_parameter(p: float) -> int:
    """The spec's b* = 1 + ⌊log2(log(φ−1) / log(1−p))⌋ for a Bernoulli(p) mask (STC, Sattler et al. 2019)."""
    if p >= 1.0:
        return 0
    if p <= 0.0:
        return 30
    return max(0, 1 + math.floor(math.log2(math.log(GOLDEN - 1) / math.log(1 - p))))


def expected_rice_bits(p: float, b: int) -> float:
    """Expected bits per kept position of a Bernoulli(p) mask: b + 1/(1 − (1−p)^(2^b)) (remainder + unary)."""
    return b + 1 / (1 - (1 - p) ** (2**b))


def _gaps(positions: np.ndarray) -> np.ndarray:
    """Zeros before each kept position since the previous one (the first counts from -1)."""
    return np.diff(positions, prepend=-1) - 1


def rice_size(gaps: np.ndarray, b: int) -> int:
    """Exact bits of the Golomb-Rice code of ``gaps`` with parameter b."""
    return int(gaps.size * (1 + b) + (gaps >> b).sum())


def _rice_encode(gaps: np.ndarray, b: int) -> np.ndarray:
    k = gaps.size
    rem = np.zeros((k, b), dtype=np.uint8)
    for j in range(b):  # most significant bit first
        rem[:, j] = (gaps >> (b - 1 - j)) & 1
    q = gaps >> b
    unary = np.ones(int((q + 1).sum()), dtype=np.uint8)
    unary[np.cumsum(q + 1) - 1] = 0  # each unary part ends with a zero
    return np.packbits(np.concatenate([rem.reshape(-1), unary]))


def _rice_decode(payload: np.ndarray, k: int, b: int) -> np.ndarray:
    bits = np.unpackbits(payload)
    if bits.size < k * b:
        raise ValueError("shorter than its remainders")
    rem = bits[: k * b].reshape(k, b).astype(np.int64)
    low = np.zeros(k, dtype=np.int64)
    for j in range(b):
        low |= rem[:, j] << (b - 1 - j)
    ends = np.flatnonzero(bits[k * b:] == 0)[:k]
    if ends.size < k:
        raise ValueError("fewer codes than entries")
    q = np.diff(ends, prepend=-1) - 1
    return np.cumsum((q << b) + low + 1) - 1


def encode_positions(positions: torch.Tensor, numel: int, rice_bits: int | None = None) -> tuple[torch.Tensor, dict]:
    """Pack sorted distinct flat positions in [0, numel) into uint8 bytes, with the record that decodes them:
    ``{"k", "encoding": "rice" | "bitmap", "rice_bits", "bits"}``. The Golomb-Rice parameter is the best of
    b*−2 … b*+2 by exact size (``rice_bits`` forces one); the bitmap is taken when it is not larger."""
    pos = positions.detach().cpu().long().numpy()
    k = int(pos.size)
    gaps = _gaps(pos)
    if rice_bits is None:
        center = rice_parameter(k / max(1, numel))
        choices = range(max(0, center - 2), center + 3)
        rice_bits = min(choices, key=lambda b: (rice_size(gaps, b), b))
    rice = rice_size(gaps, rice_bits)
    if numel <= rice:
        mask = np.zeros(numel, dtype=np.uint8)
        mask[pos] = 1
        return torch.from_numpy(np.packbits(mask)), {"k": k, "encoding": "bitmap", "rice_bits": 0, "bits": numel}
    packed = _rice_encode(gaps, rice_bits)
    return torch.from_numpy(packed), {"k": k, "encoding": "rice", "rice_bits": int(rice_bits), "bits": rice}


def decode_positions(payload: torch.Tensor, numel: int, record: dict) -> torch.Tensor:
    """The sorted flat positions (int64) that ``encode_positions`` packed."""
    data = payload.detach().cpu().numpy()
    k, bits = int(record["k"]), int(record["bits"])
    try:
        if payload.dtype != torch.uint8 or payload.dim() != 1 or data.size != (bits + 7) // 8:
            raise ValueError(f"{data.size} bytes where the record says {bits} bits")
        if record["encoding"] == "bitmap":
            pos = np.flatnonzero(np.unpackbits(data, count=numel))
            if pos.size != k:
                raise ValueError(f"{pos.size} positions where the record says {k}")
        elif record["encoding"] == "rice":
            pos = _rice_decode(data, k, int(record["rice_bits"]))
        else:
            raise ValueError(f"unknown encoding {record['encoding']!r}")
        if k and pos[-1] >= numel:
            raise ValueError(f"position {pos[-1]} outside a tensor of {numel} entries")
    except ValueError as e:
        raise DeltatuneError(f"a compressed position payload cannot be decoded ({e}): the artifact is damaged") from e
    return torch.from_numpy(np.ascontiguousarray(pos, dtype=np.int64))


def pack_signs(negative: torch.Tensor) -> torch.Tensor:
    """One bit per kept entry, 1 where it is negative."""
    return torch.from_numpy(np.packbits(negative.detach().cpu().numpy().astype(np.uint8)))


def unpack_signs(payload: torch.Tensor, k: int) -> torch.Tensor:
    if payload.dtype != torch.uint8 or payload.numel() != (k + 7) // 8:
        raise DeltatuneError(f"a compressed sign payload has {payload.numel()} bytes for {k} entries: the artifact is damaged")
    return torch.from_numpy(np.unpackbits(payload.detach().cpu().numpy(), count=k).astype(bool))


# -- one compressed tensor: positions + signs + scale (or + values) ------------------------------------------
def encode(positions: torch.Tensor, values: torch.Tensor, numel: int, mode: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The stored tensors of one compressed tensor (local names) and its record. ``values`` are the kept
    entries' values: in ternary mode all ±scale, one scale."""
    order = torch.argsort(positions.long())
    positions, values = positions.long()[order], values.detach().float()[order]
    payload, record = encode_positions(positions, numel)
    if mode == "pruned":
        return {"positions": payload, "values": values.cpu().contiguous()}, record
    mags = values.abs()
    scale = mags[0] if mags.numel() else torch.tensor(0.0)
    if not bool((mags == scale).all()) or (mags.numel() and float(scale) == 0.0):
        raise DeltatuneError("a ternary ComPEFT delta must hold ±one non-zero scale per tensor; this one was changed "
                             "after loading (re-compress the source artifact instead)")
    return {"positions": payload, "signs": pack_signs(values < 0), "scale": scale.reshape(1).cpu()}, record


def decode(tensors: dict[str, torch.Tensor], numel: int, record: dict, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions int64, values fp32) of one compressed tensor."""
    need = {"positions", "values"} if mode == "pruned" else {"positions", "signs", "scale"}
    if set(tensors) != need:
        raise DeltatuneError(f"a compressed ({mode}) tensor needs {sorted(need)}, the artifact has {sorted(tensors)}: "
                             "it was written by another deltatune version or is damaged")
    positions = decode_positions(tensors["positions"], numel, record)
    k = positions.numel()
    if mode == "pruned":
        values = tensors["values"].float()
        if values.shape != (k,):
            raise DeltatuneError(f"a compressed tensor has {values.numel()} values for {k} positions: the artifact is damaged")
        return positions, values
    if tensors["scale"].numel() != 1:
        raise DeltatuneError("a compressed tensor's scale must be one number: the artifact is damaged")
    scale = tensors["scale"].float().reshape(())
    signs = unpack_signs(tensors["signs"], k)
    return positions, torch.where(signs, -scale, scale)


def packed_bytes(record: dict, mode: str) -> int:
    """Stored bytes of one compressed tensor: ⌈position bits / 8⌉ + ⌈k / 8⌉ sign bytes + 4 (fp32 scale);
    pruned: ⌈position bits / 8⌉ + 4·k."""
    k = int(record["k"])
    tail = 4 * k if mode == "pruned" else (k + 7) // 8 + 4
    return (int(record["bits"]) + 7) // 8 + tail
