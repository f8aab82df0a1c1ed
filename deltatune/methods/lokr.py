"""LoKr: low-rank Kronecker product (Edalati et al., KronA, 2022; LyCORIS), with Hugging Face PEFT's defaults and
arithmetic (``LoKrConfig``, 0.21.2).

    ΔW = W1 ⊗ W2 · alpha / r

on each targeted nn.Linear, with out = a·b and in = c·d factorised as PEFT's ``factorization`` does (the two factors
nearest √n, or one of them ``decompose_factor``): W1 is (a, c), W2 (b, d). W2 is the product of two rank-r factors
unless r ≥ max(b, d)/2, where it is kept whole; W1 is whole unless ``decompose_both`` (then the same rule). PEFT's
init: W1 (or W1a) zero, W2's factors Kaiming-uniform, so training starts at the base model; "lycoris" zeroes W2 (or
W2b) instead. ΔW is built at every forward and applied on the output path, y += ΔW·x; merging adds it to W. Rank
dropout (off by default) rescales the kept rows only with ``rank_dropout_scale``, as PEFT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from deltatune.core.registry import Built, Traits, register
from deltatune.errors import DeltatuneError
from deltatune.methods._lycoris import LycorisConfig, LycorisDelta, build_forms, peft_format


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's (LyCORIS's) split of ``dimension`` into m ≤ n with m·n = dimension: ``factor`` itself when it divides
    it, else the pair nearest √dimension with m at most ``factor`` (-1: no bound)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


class LoKr(LycorisDelta):
    kind = "lokr"

    def __init__(self, module: nn.Module, r: int, alpha: float, *, decompose_both: bool = False,
                 decompose_factor: int = -1, init: bool | str = True, rank_dropout_scale: bool = False,
                 **options: Any) -> None:
        super().__init__(module, r, alpha, **options)
        self.rescale_rank_dropout = bool(rank_dropout_scale)
        in_m, in_n = factorization(self.d_in, decompose_factor)
        out_l, out_k = factorization(self.d_out, decompose_factor)
        self.use_w1 = not (decompose_both and self.r < max(out_l, in_m) / 2)
        self.use_w2 = not (self.r < max(out_k, in_n) / 2)
        if self.use_w1:
            self.w1 = self._param(out_l, in_m)
        else:
            self.w1_a, self.w1_b = self._param(out_l, self.r), self._param(self.r, in_m)
        if self.use_w2:
            self.w2 = self._param(out_k, in_n)
        else:
            self.w2_a, self.w2_b = self._param(out_k, self.r), self._param(self.r, in_n)
        self.reset(init)

    def reset(self, init: bool | str = True) -> None:
        """PEFT's inits: True zeroes W1 (or W1a), "lycoris" zeroes W2 (or W2b), False zeroes nothing (tests only);
        every other factor is Kaiming-uniform."""
        if init not in (True, False, "lycoris"):
            raise DeltatuneError(f"init={init!r} is not a LoKr init: use true, false or 'lycoris'")
        zero = {True: ("w1", "w1_a"), "lycoris": ("w2", "w2_b"), False: ()}[init]
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name in zero:
                    nn.init.zeros_(p)
                else:
                    nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def weight(self) -> torch.Tensor:
        w1 = self.w1 if self.use_w1 else self.w1_a @ self.w1_b
        w2 = self.w2 if self.use_w2 else self.w2_a @ self.w2_b
        return torch.kron(w1, w2.contiguous()) * self.scale

    def extra_repr(self) -> str:
        return super().extra_repr() + f", w1={'whole' if self.use_w1 else 'factored'}, " \
            f"w2={'whole' if self.use_w2 else 'factored'}"


@dataclass
class LoKrConfig(LycorisConfig):
    """LoRA-like options with PEFT's LoKr defaults (r 8, alpha 8, no dropout, LoRA's default targets)."""

    decompose_both: bool = False  # W1 is factored into rank-r factors too (when r < max of its sides / 2)
    decompose_factor: int = -1  # one side of each factorisation of in and out (-1: the split nearest the root)
    rank_dropout_scale: bool = False  # rank dropout divides the kept rows by their share
    # True: zero W1 (the base model at step 0); 'lycoris': zero W2 instead; False: all factors random (tests only)
    init: bool | str = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in (True, False, "lycoris"):
            raise ValueError(f"init={self.init!r} must be true, false or 'lycoris'")
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ValueError(f"decompose_factor={self.decompose_factor} must be -1 or a positive integer")


QUANTIZED_BASE = "its ΔW is checked against PEFT on full-precision layers only"


def _form(cfg: LoKrConfig):  # noqa: ANN202 - a form factory
    return lambda module, r, alpha, tied: LoKr(module, r, alpha, decompose_both=cfg.decompose_both,
                                               decompose_factor=cfg.decompose_factor, init=cfg.init,
                                               rank_dropout_scale=cfg.rank_dropout_scale, rank_dropout=cfg.rank_dropout,
                                               module_dropout=cfg.module_dropout, tied=tied)


def _fields(cfg: LoKrConfig) -> dict:
    return {"decompose_both": cfg.decompose_both, "decompose_factor": cfg.decompose_factor,
            "rank_dropout_scale": cfg.rank_dropout_scale}


@register("lokr", LoKrConfig, "LoKr: ΔW = W1 ⊗ W2·alpha/r, Kronecker factors, W2 (and with decompose_both W1) "
          "rank r (Edalati et al., 2022; LyCORIS); PEFT-compatible, mergeable", family="low-rank",
          traits=Traits(quantized_base=QUANTIZED_BASE),
          peft=peft_format("LOKR", "lokr_", ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b"), LoKr, _fields,
                           ("decompose_both", "decompose_factor", "rank_dropout_scale")))
def build(model: nn.Module, cfg: LoKrConfig, *, loading: bool = False) -> Built:
    return Built(build_forms(model, cfg, _form(cfg), "LoKr"))
