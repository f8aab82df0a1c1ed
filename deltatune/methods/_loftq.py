"""LoftQ (Li et al., 2023, arXiv 2310.08659): LoRA factors that absorb a 4-bit NF4 quantization's error, used by lora's
``init: loftq``.

PEFT (``utils/loftq_utils.py`` ``loftq_init``, 0.21.2; ``LoftQConfig`` defaults loftq_bits=4, loftq_iter=1) alternates,
from W (out, in) in float32 and res = W:

    Q = dequant(nf4(res))   (bitsandbytes' NF4, blocks of 64 consecutive weights, fp32 absmax: compress_statistics off)
    res = W − Q;  U S Vᵀ = svd(res);  B = U √S[:, :r],  A = √S[:r] Vᵀ      (``_low_rank_decomposition``)
    res = W − B·A  (before the next iteration)

and rewrites the base weight into Q, with lora_A = A and lora_B = B unscaled (PEFT's model computes Q + s·B·A, so the
init makes ||W − (Q + B·A)|| small at s = 1, i.e. alpha = r). PEFT runs it on CUDA only. Here W is never written
(as for PiSSA / CorDA): ``LoftQLowRank`` keeps Q as frozen NF4 state inside the delta (its packed codes and absmaxes,
an eighth of the fp32 weight) and adds (Q − W0) + s·B·A, so the model at init is PEFT's and the fingerprint, detach and
unmerge refer to the original base. The NF4 quantizer is plain torch: each weight divided by its block's absmax goes
to the nearest of the 16 NF4 values, which are bitsandbytes' ``get_4bit_type("nf4")``; decoding is the table lookup
(bitsandbytes' CPU ``dequantize_4bit`` is off the code grid for some values on some CPUs: docs/quantization.md).

Over a base already quantized to NF4 (``model quantize: nf4``) the base is Q: PEFT's ``replace_lora_weights_loftq``
(``_loftq_init_new``) takes A, B from the SVD of W − Q with W read from the model's safetensors file, and so does
``quantized_base_factors``; the delta is then a plain LoRA (nothing frozen to keep).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from deltatune.core.forms.lowrank import LowRank
from deltatune.errors import DeltatuneError
from deltatune.methods._common import from_rank0

BLOCK = 64  # bitsandbytes' 4-bit block size (PEFT's LoftQ: Params4bit's default)
# bitsandbytes' NF4 code values (functional.get_4bit_type("nf4")): QLoRA's quantiles of N(0, 1) scaled to [-1, 1]
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)


def nf4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes (⌈n/2⌉ uint8, high nibble first), absmax (blocks,) fp32) of ``w`` flattened row-major."""
    flat = w.detach().float().reshape(-1)
    pad = (-flat.numel()) % BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1)
    scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
    table = torch.tensor(NF4, device=w.device)
    codes = (scaled.unsqueeze(-1) - table).abs().argmin(dim=-1).reshape(-1)[: flat.numel()].to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1], absmax


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The fp32 matrix of ``shape`` the packed NF4 codes and block absmaxes stand for."""
    n = 1
    for d in shape:
        n *= d
    codes = torch.stack([(packed >> 4) & 15, packed & 15], 1).reshape(-1).long()
    table = torch.tensor(NF4, device=packed.device)
    values = table[codes]
    pad = (-values.numel()) % BLOCK
    values = torch.nn.functional.pad(values, (0, pad)).view(-1, BLOCK) * absmax.float().unsqueeze(1)
    return values.reshape(-1)[:n].reshape(shape)


def low_rank_decomposition(res: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``_low_rank_decomposition``: (A = √S[:r] Vᵀ (r, in), B = U √S[:, :r] (out, r)), PEFT's operations."""
    u, s, vh = torch.linalg.svd(res, full_matrices=False)
    b = u @ torch.sqrt(torch.diag(s)[:, :r])
    a = torch.sqrt(torch.diag(s)[:r, :]) @ vh
    return a, b


def loftq_factors(w: torch.Tensor, r: int, num_iter: int = 1
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's ``loftq_init`` at 4 bits on the float32 matrix ``w`` (out, in): (packed NF4 codes of Q, their absmax,
    A (r, in), B (out, r)) with Q + B·A ≈ W."""
    if num_iter < 1:
        raise DeltatuneError(f"loftq_iter={num_iter} must be >= 1 (PEFT's default is 1)")
    weight = w.float()
    res = weight.clone()
    for i in range(num_iter):
        packed, absmax = nf4_quantize(res)
        q = nf4_dequantize(packed, absmax, tuple(weight.shape))
        a, b = low_rank_decomposition(weight - q, r)
        if i + 1 == num_iter:
            break
        res = weight - b @ a
    return packed, absmax, a, b


class LoftQLowRank(LowRank):
    """ΔW = (Q − W0) + s·B·A: Q (the NF4 quantization LoftQ chose, frozen: ``codes`` and ``absmax`` buffers, stored
    in the artifact) stands in for W0, and B·A trains from LoftQ's factors. Not a plain LoRA: Q − W0 has full rank."""

    kind = "loftq"

    def __init__(self, module: nn.Module, r: int, alpha: float, *, loftq_iter: int = 1, use_rslora: bool = False,
                 dropout: float = 0.0, tied: list[tuple[nn.Module, str]] | None = None) -> None:
        super().__init__(module, r, alpha, use_rslora=use_rslora, dropout=dropout, init=True, tied=tied)
        self.loftq_iter = int(loftq_iter)
        numel = self.B.shape[0] * self.A.shape[1]
        blocks = -(-numel // BLOCK)
        self.register_buffer("codes", torch.zeros(-(-numel // 2), dtype=torch.uint8, device=self.A.device))
        self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.float32, device=self.A.device))

    def reset(self, init: str | bool = True) -> None:
        with torch.no_grad():  # ``start`` or an artifact fills the factors: no random draw
            self.A.zero_()
            self.B.zero_()

    def _oriented_base(self) -> torch.Tensor:
        w = self.dense_base(torch.float32)
        return w.T if self.layout == "conv1d" else w

    def start(self) -> None:
        """Q, A, B by PEFT's LoftQ on the base weight (every data-parallel rank takes rank 0's)."""
        packed, absmax, a, b = loftq_factors(self._oriented_base(), self.r, self.loftq_iter)
        with torch.no_grad():
            for dst, src in ((self.codes, packed), (self.absmax, absmax), (self.A, a), (self.B, b)):
                dst.copy_(from_rank0(src.to(dst.device)).to(dst.dtype))

    def q_matrix(self) -> torch.Tensor:
        """Q (out, in) in float32."""
        return nf4_dequantize(self.codes, self.absmax, (self.B.shape[0], self.A.shape[1]))

    def _correction(self) -> torch.Tensor:
        """Q − W0 (out, in), in the factors' dtype (while merged, the one computed from W0 before the merge)."""
        kept = getattr(self, "_merged_correction", None)
        if kept is not None:
            return kept
        return (self.q_matrix() - self._oriented_base()).to(self.A.dtype)

    def merge(self) -> None:
        """The merged weight holds W0 + ΔW, so Q − W0 is computed from W0 before and kept until ``unmerge``."""
        if self.merged:
            super().merge()  # refuses
        self._merged_correction = None
        with torch.no_grad():
            correction = self._correction()
        super().merge()
        self._merged_correction = correction

    def unmerge(self) -> None:
        super().unmerge()
        self._merged_correction = None

    def delta_weight(self) -> torch.Tensor:
        dw = self._correction() + (self.B @ self.A) * self.scale
        return dw if self.layout == "linear" else dw.T

    def output_delta(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.A.dtype)
        trained = (self.dropout(x) @ self.A.T @ self.B.T) * self.scale
        return trained + x @ self._correction().T  # PEFT's quantized weight sees the input without dropout

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, loftq_iter={self.loftq_iter}"


# -- over an NF4 base: W from the model's own safetensors ---------------------------------------------------------


def original_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The full-precision weight ``name`` (a state-dict key) from the safetensors file(s) in the model's folder
    (``config._name_or_path``), as PEFT's ``replace_lora_weights_loftq`` reads it."""
    from safetensors import safe_open

    folder = Path(str(getattr(getattr(model, "config", None), "_name_or_path", "") or ""))
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = [folder / json.loads(index.read_text())["weight_map"].get(name, files[0].name)] if files else []
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            for key in (name, name.split(".", 1)[-1]):  # with or without the base model prefix
                if key in keys:
                    return f.get_tensor(key).float()
    raise DeltatuneError(
        f"init='loftq' on a quantized base needs the full-precision {name} from the model's safetensors file, and "
        f"{folder or 'the model (no config._name_or_path)'} has none: load the base from a local folder with "
        "model.safetensors, or use init 'loftq' on the full-precision base (its NF4 Q is kept inside the delta)"
    )


def quantized_base_factors(w: torch.Tensor, q: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``_loftq_init_new``: (A, B) from the SVD of W − Q, Q the base's dequantized NF4 weight."""
    return low_rank_decomposition(w.float() - q.float(), r)
