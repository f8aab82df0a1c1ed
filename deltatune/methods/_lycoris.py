"""What LoHa and LoKr share (the LyCORIS forms as Hugging Face PEFT 0.21.2 computes them: ``peft.tuners.lycoris_utils``,
``loha``, ``lokr``): a ΔW built from small factors at every forward and applied on the output path,
y += F.linear(x, ΔW), with PEFT's rank dropout (rows of ΔW dropped) and module dropout (the whole delta skipped for a
step); their common options; and their conversion to and from PEFT's adapters.

Used by: loha, lokr.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltatune.core.forms.base import Form, WeightDelta
from deltatune.core.registry import PeftFormat
from deltatune.core.targeting import select_modules, sites_of
from deltatune.errors import DeltatuneError
from deltatune.methods._lowrank import add_trained_extras, check_alpha, default_targets, pattern_value


class LycorisDelta(WeightDelta):
    """ΔW = factors(...) · alpha / r on one nn.Linear weight, added on the output path (PEFT: ``LycorisLayer``)."""

    kind = "lycoris"
    rescale_rank_dropout = True  # LoHa always divides the kept rows by their share; LoKr only with rank_dropout_scale

    def __init__(self, module: nn.Module, r: int, alpha: float, *, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, tied: list[tuple[nn.Module, str]] | None = None) -> None:
        if not isinstance(module, nn.Linear):
            raise DeltatuneError(
                f"a {self.kind} delta cannot target a {type(module).__name__}: PEFT's {self.kind} takes nn.Linear "
                "layers here (and convolutions, which deltatune does not target); narrow the targets, e.g. "
                "types=['linear']"
            )
        super().__init__([(module, "weight")], "weight", tied)
        if r <= 0:
            raise DeltatuneError(f"rank r={r} must be a positive integer")
        self.r, self.alpha = int(r), float(alpha)
        self.scale = self.alpha / self.r
        self.rank_dropout, self.module_dropout = float(rank_dropout), float(module_dropout)
        self.d_out, self.d_in = module.out_features, module.in_features
        base_dtype = self.base_dtype
        # like PEFT (autocast_adapter_dtype): the factors of a half-precision base train in fp32
        self.dtype = base_dtype if base_dtype in (torch.float32, torch.float64) else torch.float32

    def _param(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(*shape, dtype=self.dtype, device=self.base.device))

    def weight(self) -> torch.Tensor:
        """ΔW (out, in) with the scale, without dropout."""
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        return self.weight()

    def output_delta(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        if self.training and not bool(torch.rand(1) > self.module_dropout):  # PEFT draws it at every training step
            return None
        weight = self.weight()
        if self.training and self.rank_dropout:
            drop = (torch.rand(weight.size(0)) > self.rank_dropout).to(weight.dtype)
            if self.rescale_rank_dropout:
                drop /= drop.mean()
            weight = weight * drop.view(-1, 1).to(weight.device)
        return F.linear(x.to(weight.dtype), weight)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}"


@dataclass
class LycorisConfig:
    r: int = 8  # rank of each factor pair (PEFT's r)
    alpha: float = 8.0  # PEFT's alpha default; scale = alpha / r
    rank_dropout: float = 0.0  # each training step drops each output row of ΔW with this probability
    module_dropout: float = 0.0  # each training step skips the whole delta of a layer with this probability
    targets: list[str] | None = None  # module patterns; None: the architecture's q/v projections (as LoRA's)
    layers: list[int] | str | None = None  # blocks: an index, a list, or 'start:stop' (None: all)
    types: list[str] | None = None  # module types kept: linear (None: all)
    exclude: list[str] | None = None  # name patterns left out (as in targets)
    rank_pattern: dict[str, int] = field(default_factory=dict)  # PEFT semantics: module-name regex -> r
    # PEFT semantics: module-name regex -> alpha
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None  # modules trained fully (e.g. a classifier head)

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"r={self.r} must be a positive integer")
        for name in ("rank_dropout", "module_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")
        check_alpha(self.alpha)


def build_forms(model: nn.Module, cfg: LycorisConfig, make: Callable[..., Form], what: str) -> dict[str, Form]:
    """One delta per targeted Linear (``make(module, r, alpha, tied=...)``: ``tied``, the other holders of a tied
    weight, which a merge leaves on W0), PEFT's rank / alpha patterns, and the modules trained fully."""
    targets = cfg.targets or default_targets(model)
    modules = select_modules(model, targets, layers=cfg.layers, types=cfg.types, exclude=cfg.exclude)
    forms: dict[str, Form] = {}
    for name, module in modules:
        r = int(pattern_value(cfg.rank_pattern, name, cfg.r))
        alpha = float(pattern_value(cfg.alpha_pattern, name, cfg.alpha))
        forms[f"{name}.weight"] = make(module, r, alpha,
                                       tied=[s for s in sites_of(model, module.weight) if s[0] is not module])
    add_trained_extras(model, modules, "none", cfg.modules_to_save, forms, what)
    return forms


def _number(x: float) -> int | float:
    """PEFT types ``alpha`` as int: integral values are written as ints."""
    return int(x) if float(x).is_integer() else float(x)


def peft_format(peft_type: str, prefix: str, names: tuple[str, ...], form_type: type[LycorisDelta],
                extra_fields: Callable[[Any], dict[str, Any]], extra_options: tuple[str, ...]) -> PeftFormat:
    """The PEFT conversion of a LyCORIS method: each form's tensors under ``<module>.<prefix><name>``, r / alpha
    per module through rank_pattern / alpha_pattern; ``extra_fields(config)`` are the adapter_config fields of the
    method's own options, ``extra_options`` the adapter_config fields read back as options of the same name."""

    def to_peft(cfg: Any, forms: dict[str, Form], model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
        tensors: dict[str, Any] = {}
        ranks: dict[str, int] = {}
        alphas: dict[str, float] = {}
        for name, form in forms.items():
            if not isinstance(form, form_type):
                raise DeltatuneError(f"{name} is a {form.kind} delta, which PEFT's {peft_type} adapter cannot hold")
            module = name.rsplit(".", 1)[0]
            for t, value in form.stored_tensors().items():
                tensors[f"{module}.{prefix}{t}"] = value
            ranks[module], alphas[module] = form.r, form.alpha
        r0 = max(set(ranks.values()), key=list(ranks.values()).count)
        a0 = max(set(alphas.values()), key=list(alphas.values()).count)
        first = next(f for f in forms.values() if isinstance(f, form_type))
        return tensors, {
            "r": r0, "alpha": _number(a0), "rank_dropout": first.rank_dropout, "module_dropout": first.module_dropout,
            "use_effective_conv2d": False, "target_modules": sorted(ranks), "exclude_modules": None,
            "init_weights": True, "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {re.escape(m): r for m, r in ranks.items() if r != r0},
            "alpha_pattern": {re.escape(m): _number(a) for m, a in alphas.items() if a != a0},
            **extra_fields(cfg),
        }

    def from_peft(config: dict[str, Any], layers: dict[str, dict[str, Any]], extra: dict[str, Any],
                  model: nn.Module) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        modules = sorted(layers)
        r, alpha = int(config.get("r", 8)), float(config.get("alpha", 8))
        rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        options: dict[str, Any] = {
            "r": r, "alpha": alpha, "targets": modules,
            "rank_dropout": float(config.get("rank_dropout") or 0.0),
            "module_dropout": float(config.get("module_dropout") or 0.0),
            # PEFT's pattern semantics resolved per module, then written per module (anchored, exact)
            "rank_pattern": {re.escape(m): int(pattern_value(rank_pattern, m, r)) for m in modules},
            "alpha_pattern": {re.escape(m): float(pattern_value(alpha_pattern, m, alpha)) for m in modules},
        }
        options.update({k: config[k] for k in extra_options if config.get(k) is not None})
        tensors: dict[str, dict[str, Any]] = {}
        for module, parts in layers.items():
            unknown = sorted(set(parts) - {prefix + n for n in names})
            if unknown:
                raise DeltatuneError(f"{module}: {unknown} are not {peft_type} tensors deltatune reads (convolution "
                                     "factors are not supported)")
            tensors[f"{module}.weight"] = {k[len(prefix):]: v for k, v in parts.items()}
        return options, tensors

    # PEFT's config object (dt.attach(model, LoHaConfig(...))): its fields as the options; use_effective_conv2d changes
    # only convolutions, which deltatune does not target
    config_fields = (("r", "r"), ("alpha", "alpha"), ("rank_dropout", "rank_dropout"),
                     ("module_dropout", "module_dropout"), ("rank_pattern", "rank_pattern"),
                     ("alpha_pattern", "alpha_pattern"), ("init_weights", "init"), ("use_effective_conv2d", None),
                     *((k, k) for k in extra_options))
    return PeftFormat(peft_type, tuple(prefix + n for n in names), to_peft, from_peft, config_fields=config_fields)
