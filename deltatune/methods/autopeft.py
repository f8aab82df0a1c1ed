"""AutoPEFT's configuration (Zhou, Wan, Vulić, Korhonen; TACL 2024; arXiv 2301.12132): a serial adapter, a
parallel adapter and a prefix, each of its own size, in every block not left out.

The paper searches this space (``deltatune search`` with ``space: autopeft``, docs/search.md) and trains the
configurations it finds; this method is one such configuration, trainable and saved like any other delta. The
modules follow the official code (cambridgeltl/autopeft, adapter-transformers' ``modeling_sappa.py``):

- serial adapter (SA): a Pfeiffer bottleneck h ← h + W_up ReLU(W_down h) at the FFN output (bottleneck ``serial``);
- parallel adapter (PA): h ← h + 4·W_up ReLU(W_down x) from the FFN input x (bottleneck ``parallel``, scale 4);
- prefix (PT): ``prefix`` key/value vectors in front of every kept attention layer's own, trained through Li &
  Liang's reparametrisation MLP (bottleneck 800) and folded to plain P_k, P_v when saved.

A size of 0 means the module is absent; ``leave_out`` lists blocks that get none of the three (the paper's
per-layer mask, shared by all three). On the FFN both adapters sit on one site: the parallel one adds its term to
the FFN's output first and the serial one reads that sum (a serial adapter reads its sublayer's whole output; the
order inside ``modeling_sappa.py`` is not recorded in the spec [inferred]).

``search_dimensions`` / ``options_from_search`` declare the paper's search space (log2 reduction factors and the
leave-out mask) for ``deltatune search`` to look up through the registry, and ``count_parameters`` gives the
trainable count of a configuration from the model's config alone, without building it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from deltatune.core.forms.module import blocks
from deltatune.core.registry import Built, Traits, register
from deltatune.errors import DeltatuneError
from deltatune.methods._adapters import BottleneckConfig, build_adapters
from deltatune.methods._common import dense_forms
from deltatune.methods._prefix import head_parameters, kv_geometry, prefix_forms

# the paper's reductions: log2 ρ ∈ {0, ..., 10}; the largest (ρ = 1024) means the module is absent
MAX_LOG2 = 10
PA_SCALE = 4.0  # modeling_sappa.py's scaling_pa


@dataclass
class AutopeftConfig:
    # sizes on BERT-base (d = 768) at reduction ρ = 16, AdapterHub's default factor, for SA and PA (the paper has
    # no single default: its search picks them); a prefix of 12 (ρ = 64). 0 leaves the module out
    serial: int = 48  # the serial adapter's bottleneck at the FFN output (0: no serial adapter)
    parallel: int = 48  # the parallel adapter's bottleneck from the FFN input, output scaled by 4 (0: none)
    prefix: int = 12  # the prefix length on every kept attention layer (0: no prefix)
    leave_out: list[int] = field(default_factory=list)  # blocks that get no module at all (the paper's per-layer mask)
    reparam: bool = True  # the prefix trains through Li & Liang's MLP, as in the paper (folded away when saved)
    mid_dim: int = 800  # ... of hidden size 800 (the official code's prefix bottleneck)
    modules_to_save: list[str] | None = None  # base modules trained fully, e.g. ["classifier"] (a fresh head)

    def __post_init__(self) -> None:
        for name in ("serial", "parallel", "prefix"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be a whole number >= 0 (0: the module is absent)")
        if self.mid_dim < 1:
            raise ValueError(f"mid_dim={self.mid_dim} must be at least 1")
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.leave_out):
            raise ValueError(f"leave_out={self.leave_out!r} must list block indices (whole numbers >= 0)")

    def kept(self, n_layers: int) -> list[int]:
        """The blocks that get the modules."""
        out = set(self.leave_out)
        return [i for i in range(n_layers) if i not in out]


def _check_leave_out(cfg: AutopeftConfig, n: int) -> None:
    if any(i >= n for i in cfg.leave_out):
        raise DeltatuneError(f"leave_out={cfg.leave_out} names blocks the model does not have (it has {n}: 0..{n - 1})")


@register("autopeft", AutopeftConfig,
          "AutoPEFT's configuration: serial adapter + parallel adapter (s=4) on the FFN and a prefix, per-layer "
          "sizes and leave-out (what `deltatune search` with `space: autopeft` searches)",
          mergeable=False,
          traits=Traits(quantized_base=True, starts_at_base=False), family="adapters & prompts")
def build(model: nn.Module, cfg: AutopeftConfig, *, loading: bool = False) -> Built:
    n = len(blocks(model))
    _check_leave_out(cfg, n)
    kept = cfg.kept(n)
    built = Built({})
    if kept and cfg.prefix:
        built = prefix_forms(model, cfg.prefix, cfg.reparam, cfg.mid_dim, method="autopeft", loading=loading,
                             layers=kept)
    if kept and cfg.parallel:
        # the same FFN site as the serial adapter: each gets a name of its own in the artifact
        pa = build_adapters(model, BottleneckConfig(r=cfg.parallel, init="lora", layers=kept), kinds=["ffn"],
                            reads="input", scale=PA_SCALE)
        built.forms.update({_renamed(k, "parallel_adapter"): f for k, f in pa.forms.items()})
    if kept and cfg.serial:
        sa = build_adapters(model, BottleneckConfig(r=cfg.serial, init="bert", layers=kept), kinds=["ffn"],
                            reads="output")
        built.forms.update({_renamed(k, "serial_adapter"): f for k, f in sa.forms.items()})
    if cfg.modules_to_save:
        built.forms.update(dense_forms(model, head_parameters(model, cfg.modules_to_save)))
    return built


def _renamed(name: str, kind: str) -> str:
    return name.removesuffix(".adapter") + f".{kind}"


# -- the parameter counter -----------------------------------------------------------------------------------------
def _geometry(model_config: Any) -> tuple[int, int, int]:
    """(blocks, hidden size d, key/value width kv_heads·head_dim) from a transformers config."""
    holder = type("Holder", (), {"config": model_config})()
    kv_heads, head_dim = kv_geometry(holder)  # type: ignore[arg-type]
    return int(model_config.num_hidden_layers), int(model_config.hidden_size), kv_heads * head_dim


def count_parameters(model_config: Any, cfg: AutopeftConfig, *, training: bool = True) -> int:
    """The trainable parameters of ``cfg``'s modules on a model with this transformers config, without building
    them. ``training``: as trained (the prefix's reparametrisation MLP counted, as ``num_trainable`` counts it);
    else what the artifact stores (P_k, P_v). Adapter biases are counted (the paper's formula leaves them out);
    ``modules_to_save`` is not (its size is the model's, e.g. the head's: add it).

    Per kept block: a bottleneck of size r costs 2·d·r + r + d; a prefix of length l costs 2·l·d_kv stored, and
    trains through one MLP for all kept blocks: l·d + d·mid + mid + (mid + 1)·2·n·d_kv."""
    n_layers, d, d_kv = _geometry(model_config)
    n = len(cfg.kept(n_layers))
    if n == 0:
        return 0
    total = sum(n * (2 * d * r + r + d) for r in (cfg.serial, cfg.parallel) if r)
    if cfg.prefix:
        if training and cfg.reparam:
            total += cfg.prefix * d + d * cfg.mid_dim + cfg.mid_dim + (cfg.mid_dim + 1) * 2 * n * d_kv
        else:
            total += 2 * n * cfg.prefix * d_kv
    return total


# -- the paper's search space ----------------------------------------------------------------------------------------
def size(log2_reduction: int, d: int) -> int:
    """A module's size at reduction ρ = 2^x: d / ρ, at least 1 (on d = 768, ρ = 512 gives 1); the largest reduction
    (x = 10, ρ = 1024) means the module is absent (0)."""
    if not 0 <= log2_reduction <= MAX_LOG2:
        raise ValueError(f"log2 reduction {log2_reduction} is outside 0..{MAX_LOG2}")
    return 0 if log2_reduction == MAX_LOG2 else max(1, d // 2**log2_reduction)


def search_dimensions(model_config: Any) -> dict[str, list[int]]:
    """The paper's space (its ``search_space.py``) on a model of this transformers config: the three log2 reductions
    and a leave-out bit per block. ``deltatune search`` (``space: autopeft``) finds this function through the
    registry, suggests these keys by name and turns them into options with ``options_from_search``."""
    n_layers = int(model_config.num_hidden_layers)
    reductions = list(range(MAX_LOG2 + 1))
    dims = {f"log2_reduction_{m}": reductions for m in ("serial", "parallel", "prefix")}
    dims.update({f"leave_out_{i}": [0, 1] for i in range(n_layers)})
    return dims


def options_from_search(values: dict[str, int], model_config: Any) -> dict[str, Any]:
    """This method's options for the search's ``values`` (``search_dimensions``' keys) on a model of this config."""
    n_layers, d, _ = _geometry(model_config)
    return {"serial": size(int(values["log2_reduction_serial"]), d),
            "parallel": size(int(values["log2_reduction_parallel"]), d),
            "prefix": size(int(values["log2_reduction_prefix"]), d),
            "leave_out": [i for i in range(n_layers) if int(values.get(f"leave_out_{i}", 0))]}


def search_from_options(options: dict[str, Any], model_config: Any) -> dict[str, int]:
    """The search's values for options on the space's grid (the inverse of ``options_from_search``)."""
    n_layers, d, _ = _geometry(model_config)
    out = {}
    for m in ("serial", "parallel", "prefix"):
        wanted = int(options[m])
        hits = [x for x in range(MAX_LOG2 + 1) if size(x, d) == wanted]
        if not hits:
            raise ValueError(f"{m}={wanted} is not on the space's grid for d={d}")
        out[f"log2_reduction_{m}"] = hits[0]
    leave = set(options.get("leave_out") or [])
    out.update({f"leave_out_{i}": int(i in leave) for i in range(n_layers)})
    return out
