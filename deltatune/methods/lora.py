"""LoRA (Hu et al., 2021, arXiv 2106.09685) with Hugging Face PEFT's defaults and options.

ΔW = s·B·A on each targeted Linear / GPT-2 Conv1D / Embedding / Conv1d-2d-3d (PEFT's conv layout: A a convolution
with the base's kernel, B a 1×1 one), s = alpha/r (rsLoRA: alpha/√r), A Kaiming-uniform and B zero (embeddings: A zero,
B normal), so training starts at the base model. ``target_parameters`` (PEFT's option of that name) adapts parameters
by name that no such layer holds: an MoE's fused 3-D expert stacks (one B·A per expert) or its router's weight
(``core/forms/lowrank.py``'s ``ParamLowRank``).
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
from deltatune.core.forms.lowrank import CONV_TYPES, ConvLowRank, LowRank, ParamLowRank, layout_of
from deltatune.core.registry import Built, Traits, register
from deltatune.core.targeting import select_modules, select_parameters, sites_of
from deltatune.errors import DeltatuneError
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
    # parameters adapted by name (PEFT's target_parameters), patterns as in targets (layers, exclude apply too): 2-D
    # weights no Linear holds (an MoE router's) or 3-D stacks of expert matrices (one B·A per expert); with it,
    # targets None adapts no module
    target_parameters: list[str] | None = None

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"r={self.r} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        check_alpha(self.alpha)
        check_init(self)
        check_target_parameters(self)


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


def check_target_parameters(cfg: LoraConfig) -> None:
    """``target_parameters`` is lora's own option (a method built on its config, e.g. DoRA, would turn only the
    module targets into its forms) and, as in PEFT, takes no dropout: its delta is added to the weight."""
    if isinstance(cfg.target_parameters, str):
        cfg.target_parameters = [cfg.target_parameters]
    if not cfg.target_parameters:
        return
    if type(cfg) is not LoraConfig:
        raise ValueError(f"target_parameters is an option of the lora method; {type(cfg).__name__} adapts modules "
                         "only (targets)")
    if cfg.dropout:
        raise ValueError(f"dropout={cfg.dropout} cannot act with target_parameters: their delta is added to the weight, "
                         "so there is no input of its own to drop (PEFT refuses it too); set dropout: 0")
    if residual_init(cfg.init) is not None:
        raise ValueError(f"init={cfg.init!r} needs a weight matrix's SVD or QR, which target_parameters' expert stacks "
                         "do not have; use init true or 'gaussian'")


def _parameter_forms(model: nn.Module, cfg: LoraConfig) -> dict[str, Form]:
    """One ``ParamLowRank`` per parameter ``target_parameters`` selects, under the parameter's own name, in the model's
    parameter order (the order PEFT nests its wrappers in on a module that holds several)."""
    forms: dict[str, Form] = {}
    for name, param in select_parameters(model, cfg.target_parameters, layers=cfg.layers, exclude=cfg.exclude):
        sites = sites_of(model, param)
        if len(sites) != 1:
            raise DeltatuneError(f"target parameter {name} is shared by {len(sites)} modules (tied weights): target "
                                 "its module with targets instead")
        module, attr = sites[0]
        r = int(pattern_value(cfg.rank_pattern, name, cfg.r))
        alpha = pattern_value(cfg.alpha_pattern, name, cfg.alpha)
        try:
            forms[name] = ParamLowRank(module, attr, r, alpha, use_rslora=cfg.use_rslora, init=cfg.init)
        except DeltatuneError as e:
            raise DeltatuneError(f"{name}: {e}") from e
    return forms


@register("lora", LoraConfig, "LoRA: low-rank ΔW = (alpha/r)·B·A on chosen layers (PEFT-compatible)",
          traits=Traits(quantized_base=True), family="low-rank")
def build(model: nn.Module, cfg: LoraConfig, *, loading: bool = False) -> Built:
    if cfg.target_parameters and not cfg.targets:  # the parameters alone (PEFT's target_modules=[])
        modules = []
    else:
        targets = cfg.targets or default_targets(model)
        modules = select_modules(model, targets, layers=cfg.layers, types=cfg.types, exclude=cfg.exclude)
    forms: dict[str, Form] = {}
    residual = residual_init(cfg.init)
    for name, module in modules:
        r = int(pattern_value(cfg.rank_pattern, name, cfg.r))
        alpha = pattern_value(cfg.alpha_pattern, name, cfg.alpha)
        if isinstance(module, CONV_TYPES):
            forms[f"{name}.weight"] = _conv_form(name, module, r, alpha, cfg)
            continue
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
    if cfg.target_parameters:
        for name, form in _parameter_forms(model, cfg).items():
            if name in forms:
                raise DeltatuneError(f"{name} is both a module target's weight and a target parameter: drop it from "
                                     "one of targets / target_parameters")
            forms[name] = form
    add_trained_extras(model, modules, cfg.bias, cfg.modules_to_save, forms, "LoRA")
    return Built(forms)


def _conv_form(name: str, module: nn.Module, r: int, alpha: float, cfg: LoraConfig) -> Form:
    """LoRA on an nn.Conv1d / Conv2d / Conv3d, in PEFT's layout (``ConvLowRank``): lora's own (a method built on its
    config turns plain ``LowRank`` forms into its own and would leave this one a LoRA), with LoRA's plain inits."""
    if type(cfg) is not LoraConfig:
        raise DeltatuneError(f"{name} is a {type(module).__name__}: {type(cfg).__name__} adapts Linear, GPT-2 Conv1D and "
                             "Embedding layers only (the lora method also takes convolutions); leave it out of targets")
    if residual_init(cfg.init) is not None:
        raise DeltatuneError(f"{name} is a {type(module).__name__}: init={cfg.init!r} takes a weight matrix's SVD or QR "
                             "(PEFT has none for convolutions either); use init true or 'gaussian'")
    try:
        return ConvLowRank(module, r, alpha, use_rslora=cfg.use_rslora, dropout=cfg.dropout, init=cfg.init)
    except DeltatuneError as e:
        raise DeltatuneError(f"{name}: {e}") from e
