"""LoRA (Hu et al., 2021, arXiv 2106.09685) with Hugging Face PEFT's defaults and options.

ΔW = s·B·A on each targeted Linear / GPT-2 Conv1D / Embedding, s = alpha/r (rsLoRA: alpha/√r),
A Kaiming-uniform and B zero (embeddings: A zero, B normal), so training starts at the base model.
``bias`` and ``modules_to_save`` train base tensors fully, as dense deltas next to the low-rank ones.

PEFT's base-rewriting inits are options too: ``init: pissa`` (PiSSA, Meng et al., 2024, arXiv 2404.02948: A, B
from the top r singular triplets of W), ``init: pissa_niter_K`` (the same by a randomised SVD with K subspace
iterations) and ``init: olora`` (OLoRA, Büyükakyüz, 2024, arXiv 2406.01775: B, A from W's QR). PEFT rewrites W into
W − s·B₀A₀; here W is never written: the delta is s·(B·A − B₀·A₀) with A₀, B₀ frozen and stored in the artifact
(``methods/_lowrank.py``'s ``ResidualLowRank``), so a fresh delta gives the base model's outputs, the fingerprint,
detach and unmerge refer to the original base, and the outputs are those of PEFT's model with the same factors.
As in PEFT, these inits leave a LoRA on an embedding at its default init. PEFT exports such a delta exactly in
PEFT's converted form for the original base (rank 2r: A' = [A; A₀], B' = [B, −B₀]), and imports an unconverted PEFT
PiSSA / OLoRA adapter by computing A₀, B₀ again from the original base (``interop/peft.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch.nn as nn

from deltatune.core.forms.base import Form
from deltatune.core.forms.lowrank import LowRank, layout_of
from deltatune.core.registry import Built, Traits, register
from deltatune.core.targeting import select_modules, sites_of
from deltatune.methods._lowrank import (
    ResidualLowRank,
    add_trained_extras,
    check_alpha,
    check_residual_rank,
    default_targets,
    pattern_value,
    residual_init,
)


@dataclass
class LoraConfig:
    r: int = 8  # rank of B·A (PEFT's r)
    alpha: float = 8.0  # PEFT's lora_alpha default; scale = alpha / r
    dropout: float = 0.0  # on the LoRA branch only
    targets: list[str] | None = None  # module patterns; None: the architecture's q/v projections
    layers: list[int] | str | None = None  # blocks: an index, a list, or 'start:stop' (None: all)
    types: list[str] | None = None  # module types kept: linear, conv1d, embedding, layernorm (None: all)
    exclude: list[str] | None = None  # name patterns left out (as in targets)
    use_rslora: bool = False  # scale = alpha / sqrt(r) (Kalajdzievski, 2023)
    # True (Kaiming A, zero B) | gaussian | pissa | pissa_niter_K (randomised SVD, K iterations) | olora |
    # False (random B: tests only); pissa / olora start A, B at W's principal part, kept as a frozen residual
    init: bool | str = True
    # biases trained too: none, all, or lora_only (those of LoRA's modules)
    bias: Literal["none", "all", "lora_only"] = "none"
    rank_pattern: dict[str, int] = field(default_factory=dict)  # PEFT semantics: module-name regex -> r
    # PEFT semantics: module-name regex -> alpha
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None  # modules trained fully (e.g. a classifier head)

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"r={self.r} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        check_alpha(self.alpha)
        check_init(self)


_PLAIN_INITS = (True, False, "gaussian", "kaiming")


def check_init(cfg: LoraConfig) -> None:
    """``init`` is one LoRA knows; PiSSA / OLoRA only for ``lora`` itself (a method built on its config, e.g. DoRA,
    builds its own forms from LoRA's and would drop the residual)."""
    if residual_init(cfg.init) is not None:
        if type(cfg) is not LoraConfig:
            raise ValueError(f"init={cfg.init!r} is an option of the lora method; {type(cfg).__name__} takes "
                             "init true, 'gaussian' or false")
        return
    if isinstance(cfg.init, bool) or cfg.init in _PLAIN_INITS:
        return
    hint = " (CorDA is its own method: method corda)" if str(cfg.init).startswith("corda") else ""
    raise ValueError(f"init={cfg.init!r} is not a LoRA init{hint}: use true (Kaiming A, zero B), 'gaussian', "
                     "'pissa', 'pissa_niter_K' (e.g. pissa_niter_4), 'olora', or false (tests only)")


@register("lora", LoraConfig, "LoRA: low-rank ΔW = (alpha/r)·B·A on chosen layers (PEFT-compatible)",
          traits=Traits(quantized_base=True), family="low-rank")
def build(model: nn.Module, cfg: LoraConfig, *, loading: bool = False) -> Built:
    targets = cfg.targets or default_targets(model)
    modules = select_modules(model, targets, layers=cfg.layers, types=cfg.types, exclude=cfg.exclude)
    forms: dict[str, Form] = {}
    residual = residual_init(cfg.init)
    for name, module in modules:
        r = int(pattern_value(cfg.rank_pattern, name, cfg.r))
        alpha = pattern_value(cfg.alpha_pattern, name, cfg.alpha)
        tied = [s for s in sites_of(model, module.weight) if s[0] is not module]
        if residual is None or layout_of(module) == "embedding":  # PEFT's Embedding: the default init for these
            forms[f"{name}.weight"] = LowRank(module, r, alpha, use_rslora=cfg.use_rslora, dropout=cfg.dropout,
                                              init=cfg.init if residual is None else True, tied=tied)
            continue
        form = ResidualLowRank(module, r, alpha, init=residual, use_rslora=cfg.use_rslora, dropout=cfg.dropout,
                               tied=tied)
        check_residual_rank(r, (form.B.shape[0], form.A.shape[1]), name, residual)
        if not loading:  # an artifact carries A, B, A₀, B₀
            form.start()
        forms[f"{name}.weight"] = form
    add_trained_extras(model, modules, cfg.bias, cfg.modules_to_save, forms, "LoRA")
    return Built(forms)
