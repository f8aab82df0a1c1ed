"""VeRA: vector-based random matrix adaptation (Kopiczko et al., ICLR 2024; arXiv 2310.11454), with Hugging Face
PEFT's defaults and arithmetic (``VeraConfig``, 0.21.2).

    ΔW = Λ_b B Λ_d A,  y += b ⊙ (B_out (d ⊙ (A_in · dropout(x))))

A (r, max in) and B (max out, r) are random, frozen and shared by every targeted layer (each slices them to its own
in / out size); only the vectors d (r) and b (out) train, d starting at ``d_initial`` (0.1) and b at zero (so the
delta starts at the base model). A and B come from ``seed`` exactly as PEFT draws them from its
``projection_prng_key`` (a CPU generator; A then B, each Kaiming-uniform with gain √2 over its second dimension), so
they are regenerated whenever the delta is built and never stored: an artifact holds only the vectors, the seed is in
its config. Mergeable: ΔW is built from the four factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltatune.core.forms.base import Form, WeightDelta
from deltatune.core.forms.lowrank import layout_of
from deltatune.core.registry import Built, PeftFormat, Traits, register
from deltatune.core.targeting import select_modules, sites_of
from deltatune.errors import DeltatuneError
from deltatune.methods._lowrank import add_trained_extras, default_targets


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's ``_kaiming_init``: U(−b, b) with b = √3 · √2 / √fan_in, fan_in = shape[1], drawn from ``generator``."""
    tensor = torch.empty(shape)
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a Linear / GPT-2 Conv1D layer; VeRA targets no other kind (PEFT neither)."""
    layout = layout_of(module)
    if layout == "embedding":
        raise DeltatuneError("VeRA cannot target an nn.Embedding (PEFT's VeRA takes Linear and GPT-2 Conv1D layers "
                             "only): narrow the targets, e.g. types=['linear']")
    w = module.weight
    return (w.shape[0], w.shape[1]) if layout == "conv1d" else (w.shape[1], w.shape[0])


def projections(modules: list[nn.Module], r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared A (r, max in) and B (max out, r) for these target modules, as PEFT draws them (on the CPU, in
    float32)."""
    sizes = [features(m) for m in modules]
    d_in, d_out = max(s[0] for s in sizes), max(s[1] for s in sizes)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    a = kaiming_uniform((r, d_in), generator)
    b = kaiming_uniform((d_out, r), generator)
    return a, b


class SharedProjections(nn.Module):
    """The frozen A and B every VeRA form of one delta reads: one object, a submodule of each form, so ``.to()``
    moves it with them; non-persistent buffers, so no state dict or artifact holds them."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", a, persistent=False)
        self.register_buffer("B", b, persistent=False)


class Vera(WeightDelta):
    """y += b ⊙ (B[:out] (d ⊙ (A[:, :in] x))) on one Linear / GPT-2 Conv1D layer."""

    kind = "vera"

    def __init__(self, module: nn.Module, shared: SharedProjections, *, d_initial: float = 0.1, dropout: float = 0.0,
                 init: bool = True, tied: list[tuple[nn.Module, str]] | None = None) -> None:
        super().__init__([(module, "weight")], "weight", tied)
        self.layout = layout_of(module)
        self.d_in, self.d_out = features(module)
        self.r = int(shared.A.shape[0])
        if shared.A.shape[1] < self.d_in or shared.B.shape[0] < self.d_out:
            raise DeltatuneError(f"the shared VeRA projections ({tuple(shared.A.shape)}, {tuple(shared.B.shape)}) are "
                                 f"too small for a {self.d_out}x{self.d_in} layer")
        self.shared = shared
        base_dtype = self.base_dtype
        # like PEFT (autocast_adapter_dtype): the vectors of a half-precision base train in fp32
        dtype = base_dtype if base_dtype in (torch.float32, torch.float64) else torch.float32
        device = self.base.device
        self.lambda_b = nn.Parameter(torch.ones(self.d_out, dtype=dtype, device=device))
        self.lambda_d = nn.Parameter(torch.empty(self.r, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():
            if init:  # PEFT's reset_vera_parameters: d = d_initial, b = 0 (the base model)
                self.lambda_d.fill_(d_initial)
                self.lambda_b.zero_()
            else:  # PEFT's init_weights=False: b = 1, d ~ N(0, 1) (tests only)
                self.lambda_d.normal_()

    # the shared projections are regenerated from the seed: never stored
    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {"lambda_b": self.lambda_b.detach(), "lambda_d": self.lambda_d.detach()}

    def stored_tensors_names(self) -> list[str]:
        return ["lambda_b", "lambda_d"]

    def _sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.lambda_d.dtype
        return self.shared.A[:, : self.d_in].to(dtype), self.shared.B[: self.d_out, :].to(dtype)

    def delta_weight(self) -> torch.Tensor:
        a, b = self._sliced()
        dw = (self.lambda_b.unsqueeze(-1) * b) @ (self.lambda_d.unsqueeze(-1) * a)  # (out, in), PEFT's order
        return dw if self.layout == "linear" else dw.T

    def output_delta(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        a, b = self._sliced()
        x = x.to(self.lambda_d.dtype)
        return self.lambda_b * F.linear(self.lambda_d * F.linear(self.dropout(x), a), b)

    def extra_repr(self) -> str:
        return f"layout={self.layout}, r={self.r}"


@dataclass
class VeraConfig:
    r: int = 256  # rank of the shared random A and B (PEFT's default; the paper uses 256-1024)
    targets: list[str] | None = None  # module patterns; None: the architecture's q/v projections (as LoRA's)
    layers: list[int] | str | None = None  # blocks: an index, a list, or 'start:stop' (None: all)
    types: list[str] | None = None  # module types kept: linear, conv1d (None: all)
    exclude: list[str] | None = None  # name patterns left out (as in targets)
    seed: int = 0  # draws the shared A and B (PEFT's projection_prng_key): they are regenerated, never stored
    d_initial: float = 0.1  # initial value of every d (the paper's Table 6c: 0.1 or less)
    dropout: float = 0.0  # on the VeRA branch's input only (PEFT's vera_dropout)
    init: bool = True  # True: d = d_initial, b = 0 (the base model); False: b = 1, d random (PEFT's init_weights)
    # biases trained too: none, all, or vera_only (those of VeRA's modules)
    bias: Literal["none", "all", "vera_only"] = "none"
    modules_to_save: list[str] | None = None  # modules trained fully (e.g. a classifier head)

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"r={self.r} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if not math.isfinite(self.d_initial):
            raise ValueError(f"d_initial={self.d_initial} must be a finite number")


def _modules(model: nn.Module, cfg: VeraConfig) -> list[tuple[str, nn.Module]]:
    targets = cfg.targets or default_targets(model)
    return select_modules(model, targets, layers=cfg.layers, types=cfg.types, exclude=cfg.exclude)


# -- PEFT's VERA adapters ------------------------------------------------------------------------------------------
def _to_peft(cfg: VeraConfig, forms: dict[str, Form], model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    tensors: dict[str, Any] = {}
    for name, form in forms.items():
        if not isinstance(form, Vera):
            raise DeltatuneError(f"{name} is a {form.kind} delta, which PEFT's VeRA adapter cannot hold")
        module = name.rsplit(".", 1)[0]
        tensors[f"{module}.vera_lambda_b"] = form.lambda_b.detach()
        tensors[f"{module}.vera_lambda_d"] = form.lambda_d.detach()
    conv1d = any(isinstance(f, Vera) and f.layout == "conv1d" for f in forms.values())
    dropout = max((float(getattr(f.dropout, "p", 0.0)) for f in forms.values() if isinstance(f, Vera)), default=0.0)
    # save_projection false: PEFT draws A and B from projection_prng_key when it loads the adapter, as deltatune does
    return tensors, {"r": cfg.r, "target_modules": sorted(k.rsplit(".", 1)[0] for k in tensors if k.endswith("_b")),
                     "projection_prng_key": cfg.seed, "save_projection": False, "vera_dropout": dropout,
                     "d_initial": cfg.d_initial, "fan_in_fan_out": conv1d, "init_weights": True,
                     "layers_to_transform": None, "layers_pattern": None}


def _from_peft(config: dict[str, Any], layers: dict[str, dict[str, Any]], extra: dict[str, Any],
               model: nn.Module) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    modules = sorted(layers)
    r, seed = int(config.get("r", 256)), int(config.get("projection_prng_key", 0))
    if "vera_A" in extra or "vera_B" in extra:  # save_projection: true (PEFT's default) stores them: check them
        a, b = projections([model.get_submodule(m) for m in modules], r, seed)
        for key, ours in (("vera_A", a), ("vera_B", b)):
            theirs = extra.get(key)
            if theirs is None or tuple(theirs.shape) != tuple(ours.shape) or not torch.equal(theirs.float(), ours):
                raise DeltatuneError(
                    f"the adapter's {key} is not the projection projection_prng_key={seed} gives for its modules: "
                    "deltatune regenerates VeRA's shared projections from the seed and cannot hold others; re-save "
                    "the adapter with the PEFT version that trained it, or with its projections drawn from the seed"
                )
    options = {"r": r, "targets": modules, "seed": seed, "d_initial": float(config.get("d_initial", 0.1)),
               "dropout": float(config.get("vera_dropout") or 0.0)}
    tensors = {f"{m}.weight": {"lambda_b": parts["vera_lambda_b"], "lambda_d": parts["vera_lambda_d"]}
               for m, parts in layers.items()}
    return options, tensors


QUANTIZED_BASE = "its forward is checked against PEFT on full-precision layers only"


@register("vera", VeraConfig, "VeRA: frozen random A, B shared by all layers (from a seed, never stored), trained "
          "vectors b, d: ΔW = Λ_b·B·Λ_d·A (Kopiczko et al., 2024); PEFT-compatible, mergeable", family="low-rank",
          traits=Traits(quantized_base=QUANTIZED_BASE),
          peft=PeftFormat("VERA", ("vera_lambda_b", "vera_lambda_d"), _to_peft, _from_peft, bias_only="vera_only",
                          top_level=("vera_A", "vera_B"),
                          # save_projection: whether PEFT stores A and B in the adapter; deltatune draws them again
                          config_fields=(("r", "r"), ("projection_prng_key", "seed"), ("vera_dropout", "dropout"),
                                         ("d_initial", "d_initial"), ("bias", "bias"), ("init_weights", "init"),
                                         ("save_projection", None))))
def build(model: nn.Module, cfg: VeraConfig, *, loading: bool = False) -> Built:
    modules = _modules(model, cfg)
    a, b = projections([m for _, m in modules], cfg.r, cfg.seed)
    device = modules[0][1].weight.device
    shared = SharedProjections(a.to(device), b.to(device))
    forms: dict[str, Form] = {}
    for name, module in modules:
        forms[f"{name}.weight"] = Vera(module, shared, d_initial=cfg.d_initial, dropout=cfg.dropout, init=cfg.init,
                                       tied=[s for s in sites_of(model, module.weight) if s[0] is not module])
    add_trained_extras(model, modules, "lora_only" if cfg.bias == "vera_only" else cfg.bias, cfg.modules_to_save,
                       forms, "VeRA")
    return Built(forms)
