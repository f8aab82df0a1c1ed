"""LoRA (Hu et al., 2021, arXiv 2106.09685) with Hugging Face PEFT's defaults and options.

ΔW = s·B·A on each targeted Linear / GPT-2 Conv1D / Embedding / Conv1d-2d-3d (PEFT's conv layout: A a convolution
with the base's kernel, B a 1×1 one), s = alpha/r (rsLoRA: alpha/√r), A Kaiming-uniform and B zero (embeddings: A zero,
B normal), so training starts at the base model. ``target_parameters`` (PEFT's option of that name) adapts parameters
by name that no such layer holds: an MoE's fused 3-D expert stacks (one B·A per expert) or its router's weight
(``core/forms/lowrank.py``'s ``ParamLowRank``).
``bias`` and ``modules_to_save`` train base tensors fully, as dense deltas next to the low-rank ones.
``trainable_token_indices`` (PEFT's option of that name) trains chosen rows of the input embedding (and so of an LM
head tied to it), or of each embedding a mapping names, next to the LoRA layers: ``methods/_token_rows.py``'s
``TokenRows``, the trainable_tokens method's form; PEFT stores the rows' values under
``<embedding>.token_adapter.trainable_tokens_delta`` and ``interop/peft.py`` converts both ways.

PEFT's base-rewriting inits are options too: ``init: pissa`` (PiSSA, Meng et al., 2024, arXiv 2404.02948: A, B
from the top r singular triplets of W), ``init: pissa_niter_K`` (the same by a randomised SVD with K subspace
iterations) and ``init: olora`` (OLoRA, Büyükakyüz, 2024, arXiv 2406.01775: B, A from W's QR). PEFT rewrites W into
W − s·B₀A₀; here W is never written: the delta is s·(B·A − B₀·A₀) with A₀, B₀ frozen and stored in the artifact
(``methods/_lowrank.py``'s ``ResidualLowRank``), so a fresh delta gives the base model's outputs, the fingerprint,
detach and unmerge refer to the original base, and the outputs are those of PEFT's model with the same factors.
As in PEFT, these inits leave a LoRA on an embedding at its default init. PEFT exports such a delta exactly in
PEFT's converted form for the original base (rank 2r: A' = [A; A₀], B' = [B, −B₀]), and imports an unconverted PEFT
PiSSA / OLoRA adapter by computing A₀, B₀ again from the original base (``interop/peft.py``).
``init: loftq`` (LoftQ, Li et al., 2023, arXiv 2310.08659; PEFT's loftq_bits=4, ``loftq_iter``) keeps LoftQ's NF4
weight Q inside the delta as frozen state and adds (Q − W0) + s·B·A (``methods/_loftq.py``); over an NF4 base it is a
plain LoRA whose A, B come from the SVD of W − Q.
``init: eva`` (EVA, Paischer et al., 2024, arXiv 2410.07170; PEFT's init_lora_weights="eva" with its EvaConfig as the
``eva`` block) sets A from the right singular vectors of each layer's inputs on calibration data and redistributes the
ranks by explained variance (``methods/_eva.py``); B = 0. The builder writes the ranks into ``rank_pattern`` (a layer
given rank 0 carries no LoRA), so the delta is a plain LoRA from then on, and loading needs no data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn

from deltatune.core import quantized
from deltatune.core.forms.base import Form
from deltatune.core.forms.lowrank import CONV_TYPES, ConvLowRank, LowRank, ParamLowRank, layout_of
from deltatune.core.registry import Built, Traits, register
from deltatune.core.targeting import select_modules, select_parameters, sites_of
from deltatune.errors import DeltatuneError
from deltatune.methods._common import from_rank0
from deltatune.methods._eva import eva_components, eva_options
from deltatune.methods._loftq import LoftQLowRank, original_weight, quantized_base_factors
from deltatune.methods._lowrank import (
    ResidualLowRank,
    add_trained_extras,
    check_alpha,
    check_residual_rank,
    default_targets,
    pattern_value,
    residual_init,
)
from deltatune.methods._token_rows import check_token_ids, input_embedding, row_modules, token_forms


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
    # True (Kaiming A, zero B) | gaussian | pissa | pissa_niter_K (randomised SVD, K iterations) | olora | loftq |
    # False (random B: tests only); pissa / olora start A, B at W's principal part, kept as a frozen residual; loftq
    # (4-bit NF4) keeps LoftQ's quantized Q inside the delta and starts B·A at W − Q; eva: A from the SVD of each
    # layer's inputs on calibration data (the eva block), ranks redistributed by explained variance, B zero
    init: bool | str = True
    loftq_iter: int = 1  # init loftq: alternating quantize / SVD steps (PEFT's LoftQConfig default)
    # init eva: PEFT's EvaConfig (rho 2.0, tau 0.99, use_label_mask, label_mask_value, whiten, adjust_scaling_factors)
    # and the calibration (data, samples, batch_size, random_length, tokenizer, seed, max_steps, device)
    eva: dict[str, Any] | None = None
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
    # embedding rows that train next to LoRA (PEFT's trainable_token_indices): token ids of the input embedding (a tied
    # LM head's rows move with it), or {embedding module pattern: token ids} (e.g. an untied lm_head's own rows)
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"r={self.r} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        check_alpha(self.alpha)
        check_init(self)
        check_target_parameters(self)
        check_token_indices(self)


_PLAIN_INITS = (True, False, "gaussian", "kaiming")
EVA = "eva"


def check_init(cfg: LoraConfig) -> None:
    """``init`` is one LoRA knows; PiSSA / OLoRA only for ``lora`` itself (a method built on its config, e.g. DoRA,
    builds its own forms from LoRA's and would drop the residual)."""
    if cfg.init == EVA or getattr(cfg, "eva", None) is not None:
        if type(cfg) is not LoraConfig:
            raise ValueError(f"init='eva' is an option of the lora method; {type(cfg).__name__} takes init true, "
                             "'gaussian' or false")
        if cfg.init != EVA:
            raise ValueError(f"the eva block acts with init='eva' only (init is {cfg.init!r}): drop it or set init: eva")
        cfg.eva = eva_options(cfg.eva)
        return
    if residual_init(cfg.init) is not None or cfg.init == "loftq":
        if type(cfg) is not LoraConfig:
            raise ValueError(f"init={cfg.init!r} is an option of the lora method; {type(cfg).__name__} takes "
                             "init true, 'gaussian' or false")
        if cfg.loftq_iter < 1:
            raise ValueError(f"loftq_iter={cfg.loftq_iter} must be >= 1 (PEFT's LoftQConfig default is 1)")
        return
    if isinstance(cfg.init, bool) or cfg.init in _PLAIN_INITS:
        return
    hint = " (CorDA is its own method: method corda)" if str(cfg.init).startswith("corda") else ""
    raise ValueError(f"init={cfg.init!r} is not a LoRA init{hint}: use true (Kaiming A, zero B), 'gaussian', "
                     "'pissa', 'pissa_niter_K' (e.g. pissa_niter_4), 'olora', 'loftq', 'eva', or false (tests only)")


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
    if residual_init(cfg.init) is not None or cfg.init in ("loftq", EVA):
        raise ValueError(f"init={cfg.init!r} needs a weight matrix's SVD or QR, which target_parameters' expert stacks "
                         "do not have; use init true or 'gaussian'")


def check_token_indices(cfg: LoraConfig) -> None:
    """``trainable_token_indices`` is lora's own option (a method built on its config turns LoRA's forms into its own),
    a list of token ids or a mapping of embedding modules to lists."""
    tokens = cfg.trainable_token_indices
    if tokens is None:
        return
    if type(cfg) is not LoraConfig:
        raise ValueError(f"trainable_token_indices is an option of the lora method; {type(cfg).__name__} takes none "
                         "(train the rows with method trainable_tokens next to it)")
    if isinstance(tokens, dict):
        if not tokens:
            raise ValueError("trainable_token_indices={} names no embedding: give token ids or {module: [ids]}")
        for module, ids in tokens.items():
            check_token_ids(ids, f"trainable_token_indices[{module!r}]")
    else:
        check_token_ids(tokens, "trainable_token_indices")
        cfg.trainable_token_indices = list(tokens)


def _token_forms(model: nn.Module, cfg: LoraConfig) -> dict[str, Form]:
    """PEFT's trainable_token_indices: the rows of the input embedding (a list) or of each module a key names."""
    tokens = cfg.trainable_token_indices
    if isinstance(tokens, dict):
        modules = [(n, m, list(ids)) for key, ids in tokens.items() for n, m in row_modules(model, [key])]
    else:
        modules = [(*input_embedding(model), list(tokens or []))]
    return token_forms(model, modules)


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
    eva = _eva_ranks(model, modules, cfg) if cfg.init == EVA and not loading else None
    for name, module in modules:
        r = int(pattern_value(cfg.rank_pattern, name, cfg.r))
        alpha = pattern_value(cfg.alpha_pattern, name, cfg.alpha)
        if cfg.init == EVA and r == 0:  # EVA gave it no component: no LoRA here (PEFT removes the layer)
            continue
        if isinstance(module, CONV_TYPES):
            forms[f"{name}.weight"] = _conv_form(name, module, r, alpha, cfg)
            continue
        tied = [s for s in sites_of(model, module.weight) if s[0] is not module]
        if cfg.init == "loftq":
            forms[f"{name}.weight"] = _loftq_form(model, name, module, r, alpha, cfg, tied, loading)
            continue
        if cfg.init == EVA:  # B zero, A the layer's EVA components (set below; an artifact carries them)
            form = LowRank(module, r, alpha, use_rslora=cfg.use_rslora, dropout=cfg.dropout, init=True, tied=tied)
            if eva is not None and name in eva:
                with torch.no_grad():
                    form.A.copy_(eva[name].to(form.A.device, form.A.dtype))
                    form.B.zero_()
            forms[f"{name}.weight"] = form
            continue
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
    if cfg.trainable_token_indices is not None:
        for name, form in _token_forms(model, cfg).items():
            if name in forms:
                raise DeltatuneError(f"{name} is both a LoRA target (or fully trained) and has trainable_token_indices: "
                                     "drop the embedding from targets / modules_to_save, or the token ids")
            forms[name] = form
    return Built(forms)


def _eva_ranks(model: nn.Module, modules: list[tuple[str, nn.Module]], cfg: LoraConfig) -> dict[str, torch.Tensor]:
    """``init: eva``: A's rows of each Linear / Conv1D target from its inputs' incremental PCA, the ranks redistributed
    by explained variance; the config's rank / alpha patterns then name every target's rank and alpha exactly (rank 0:
    no LoRA), so the delta is a plain LoRA from here on. Embeddings and convolutions keep LoRA's default init (as in
    PEFT, whose EVA leaves them out)."""
    opts = cfg.eva or {}
    ranks = {n: int(pattern_value(cfg.rank_pattern, n, cfg.r)) for n, _ in modules}
    alphas = {n: float(pattern_value(cfg.alpha_pattern, n, cfg.alpha)) for n, _ in modules}
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    layers = sorted(((n, m, ranks[n]) for n, m in modules if _eva_target(m)), key=lambda t: order.get(t[0], 0))
    if not layers:
        raise DeltatuneError("init='eva' found no Linear / Conv1D target to initialise: widen targets")
    rows, info = eva_components(model, layers, cfg.r, opts)
    for name, a in rows.items():
        new = int(a.shape[0])
        if new and new != ranks[name] and opts.get("adjust_scaling_factors", True):
            alphas[name] *= new / ranks[name]
        ranks[name] = new
    cfg.rank_pattern = {re.escape(n): r for n, r in ranks.items()}
    cfg.alpha_pattern = {re.escape(n): a for n, a in alphas.items() if a != cfg.alpha}
    if not isinstance(opts.get("data"), dict | str | type(None)) and not _token_lists(opts.get("data")):
        opts["data"] = None  # batches held in memory are not written to the artifact
    opts["calibration"] = {k: v for k, v in info.items() if k != "ranks"}
    return rows


def _eva_target(module: nn.Module) -> bool:
    """A Linear / GPT-2 Conv1D (PEFT's EVA adapts those; embeddings, convolutions keep LoRA's default init)."""
    if isinstance(module, (*CONV_TYPES, nn.Embedding)):
        return False
    try:
        return layout_of(module) in ("linear", "conv1d")
    except DeltatuneError:
        return False


def _token_lists(data: Any) -> bool:
    return isinstance(data, list) and all(isinstance(s, list) and all(isinstance(t, int) for t in s) for s in data)


def _conv_form(name: str, module: nn.Module, r: int, alpha: float, cfg: LoraConfig) -> Form:
    """LoRA on an nn.Conv1d / Conv2d / Conv3d, in PEFT's layout (``ConvLowRank``): lora's own (a method built on its
    config turns plain ``LowRank`` forms into its own and would leave this one a LoRA), with LoRA's plain inits."""
    if type(cfg) is not LoraConfig:
        raise DeltatuneError(f"{name} is a {type(module).__name__}: {type(cfg).__name__} adapts Linear, GPT-2 Conv1D and "
                             "Embedding layers only (the lora method also takes convolutions); leave it out of targets")
    if residual_init(cfg.init) is not None or cfg.init == "loftq":
        raise DeltatuneError(f"{name} is a {type(module).__name__}: init={cfg.init!r} takes a weight matrix's SVD or QR "
                             "(PEFT has none for convolutions either); use init true or 'gaussian'")
    try:  # init eva: LoRA's default init here, as PEFT's EVA leaves convolutions out
        return ConvLowRank(module, r, alpha, use_rslora=cfg.use_rslora, dropout=cfg.dropout,
                           init=True if cfg.init == EVA else cfg.init)
    except DeltatuneError as e:
        raise DeltatuneError(f"{name}: {e}") from e


def _loftq_form(model: nn.Module, name: str, module: nn.Module, r: int, alpha: float, cfg: LoraConfig,
                tied: list, loading: bool) -> Form:
    """``init: loftq``: on a full-precision weight ``LoftQLowRank`` (Q kept in the delta); on an NF4 base a plain LoRA
    whose A, B come from the SVD of W − Q (W from the model's safetensors, as PEFT's replace_lora_weights_loftq)."""
    if layout_of(module) == "embedding":
        raise DeltatuneError(f"{name} is an embedding: init='loftq' quantizes weight matrices of Linear / Conv1D layers "
                             "here; leave it out of targets (or train it with trainable_token_indices)")
    if not quantized.is_quantized(module):
        form = LoftQLowRank(module, r, alpha, loftq_iter=cfg.loftq_iter, use_rslora=cfg.use_rslora,
                            dropout=cfg.dropout, tied=tied)
        check_residual_rank(r, (form.B.shape[0], form.A.shape[1]), name, "loftq")
        if not loading:
            form.start()
        return form
    if quantized.scheme_of(module) != "nf4":
        raise DeltatuneError(f"{name} is quantized to {quantized.scheme_of(module)}: init='loftq' takes an nf4 base "
                             "(model quantize: nf4) or a full-precision one")
    form = LowRank(module, r, alpha, use_rslora=cfg.use_rslora, dropout=cfg.dropout, init=True, tied=tied)
    if not loading:  # an artifact carries A, B
        a, b = quantized_base_factors(original_weight(model, f"{name}.weight"),
                                      quantized.dequantize(module, torch.float32), r)
        with torch.no_grad():
            form.A.copy_(from_rank0(a.to(form.A.device)).to(form.A.dtype))
            form.B.copy_(from_rank0(b.to(form.B.device)).to(form.B.dtype))
    return form
