"""Polyhistor and Polyhistor-Lite (Liu, Ma, Tian, He, Kira; NeurIPS 2022, arXiv 2210.03265): bottleneck adapters
whose weights a decomposed hypernetwork generates for each task from shared parameters, expanded to each stage's
width by layer-wise scaling kernels (hierarchical encoders such as Swin, whose stages differ in width).

What is verified and what is inferred. The paper's equations were not available (``shared/methods/polyhistor.md``
is reconstructed from its abstract, introduction and figure captions). Verified from those: the two components'
names and purpose (decomposed hypernetworks that output a small part of an adapter instead of whole matrices;
scaling kernels that scale one set of template kernels to adapters of different sizes by a Kronecker product), and
that Polyhistor-Lite combines "decomposed lite-hypernetworks" with the scaling kernels. Inferred (the spec's
reconstruction, followed here): every formula below, the linear (one-layer) hypernetworks, the initialisation,
the Lite variant's sharing, the placement (after the FFN) and the absence of adapter biases. None of the paper's
numbers is reproduced or targeted.

The delta, per adapter site b (a block's FFN, or attention and FFN with ``placement: houlsby``) of width
d_b = s_b·d₀ (d₀: the narrowest site's width) and task t, with a bottleneck of r_b = s'_b·r (s'_b = s_b with
``rank_scaling``, else 1):

- embeddings: z_t ∈ R^e per task, ℓ_b ∈ R^e per site (Polyhistor only);
- for each path p ∈ {down, up}, a task hypernetwork A^p_t = reshape(W^p_T z_t + c^p_T) ∈ R^{r×k} and a layer
  hypernetwork B^p_b = reshape(W^p_L ℓ_b + c^p_L) ∈ R^{k×d₀} (Lite: one matrix B^p ∈ R^{k×d₀} shared by every
  layer, no layer embedding: the layer-specific part is the scaling kernel alone);
- template kernels K^down_{t,b} = A^down_t B^down_b / √(k·d₀) ∈ R^{r×d₀}, K^up_{t,b} = (A^up_t B^up_b)ᵀ / √(k·d₀)
  ∈ R^{d₀×r};
- scaling kernels S^down_b ∈ R^{s'_b×s_b}, S^up_b ∈ R^{s_b×s'_b}: D_{t,b} = S^down_b ⊗ K^down_{t,b} ∈ R^{r_b×d_b},
  U_{t,b} = S^up_b ⊗ K^up_{t,b} ∈ R^{d_b×r_b} (Kronecker products);
- the adapter h ← h + U_{t,b} act(D_{t,b} h) at the sublayer's output (before its residual add / post-LN).

Trainable parameters (T tasks, L sites, P = 2 paths): Polyhistor T·e + L·e + P·(e+1)·(r·k + k·d₀) + Σ_b P·s_b·s'_b;
Lite T·e + P·((e+1)·r·k + k·d₀) + Σ_b P·s_b·s'_b (``parameter_count``). The adapter weights are generated at every
forward from these (they change while training); nothing per task is stored.

Initialisation: z, ℓ and the shared B ~ N(0, 1); hypernetwork weights ~ N(0, 1/e), biases 0; S^down = 1/√s_b,
S^up = 1/√s'_b. The up path's task hypernetwork (weights and bias) starts at zero, so A^up = 0, U = 0 and a fresh
delta is exactly the base model (as LoRA's B = 0); its gradient is not zero, since B^up and S^up are not.

Tasks: ``tasks`` adapters sets are generated from one delta. The active task is chosen by
``deltatune_select_task(t)`` (``deltatune.data.multitask.active_task``: a multi-task run selects each batch's task
and its head); a single-task run uses task 0. With ``tasks: null`` the number is the task heads the model carries
(``data.multitask``), else 1; the builder writes the resolved number into the config, so the artifact records it.

Not supported: encoder-decoder models (T5, BART): one line before anything is attached. The task-conditioned
hypernetwork is defined for one stack of blocks (the paper's Swin encoder); the layer embeddings of an encoder and
a decoder with cross-attention are not described anywhere we could read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from deltatune.core.forms.module import ACTIVATIONS, ModuleForm, Sublayer, add_to_output, sublayers
from deltatune.core.registry import Built, Traits, register
from deltatune.errors import DeltatuneError
from deltatune.methods._adapters import SUBLAYER_KINDS, chosen_blocks, site_width
from deltatune.methods._lowrank import add_trained_extras

PLACEMENTS = {"houlsby": ["attention", "ffn"], "pfeiffer": ["ffn"]}
PATHS = ("down", "up")


@dataclass
class PolyhistorConfig:
    # tasks whose adapters the hypernetworks generate; null: the task heads the model carries (data.multitask), else 1
    tasks: int | None = None
    r: int = 8  # adapter bottleneck at the narrowest width (rank_scaling: x the stage scale at wider stages)
    k: int = 4  # inner rank of the decomposition: task part A (r x k) times layer part B (k x d0)
    embedding: int = 32  # e: the size of the task and layer embeddings the hypernetworks read
    lite: bool = False  # Polyhistor-Lite: no layer embeddings or layer hypernetworks, one B per path for every layer
    rank_scaling: bool = False  # wider stages get a proportionally wider bottleneck (scaling kernels s_b x s_b)
    placement: Literal["houlsby", "pfeiffer"] = "pfeiffer"  # pfeiffer: after the FFN (the spec); houlsby: + attention
    activation: str = "relu"  # the adapter's nonlinearity between D and U
    layers: list[int] | str | None = None  # blocks that get adapters: [0, 2], "6:" (a slice), None = all
    modules_to_save: list[str] | None = None  # modules trained fully next to the adapters (e.g. a fresh classifier)

    def __post_init__(self) -> None:
        if self.tasks is not None and self.tasks < 1:
            raise ValueError(f"tasks={self.tasks} must be at least 1 (or null: the model's task heads)")
        for key in ("r", "k", "embedding"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}={getattr(self, key)} must be a positive integer")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is unknown; use one of {sorted(ACTIVATIONS)}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement={self.placement!r} is unknown; use 'houlsby' or 'pfeiffer'")


def scales(widths: list[int], rank_scaling: bool) -> tuple[int, list[tuple[int, int]]]:
    """The template width d₀ (the narrowest site) and each site's (s_b, s'_b); widths must be multiples of d₀."""
    d0 = min(widths)
    bad = sorted({w for w in widths if w % d0})
    if bad:
        raise DeltatuneError(f"polyhistor scales one template width to every site, but the widths {bad} are not "
                             f"multiples of the narrowest {d0}; choose blocks of compatible widths (method.layers)")
    return d0, [(w // d0, w // d0 if rank_scaling else 1) for w in widths]


def parameter_count(cfg: PolyhistorConfig, widths: list[int], tasks: int) -> int:
    """The closed form of the trainable parameters (module docstring) for sites of ``widths``."""
    d0, s = scales(widths, cfg.rank_scaling)
    e, r, k, paths = cfg.embedding, cfg.r, cfg.k, len(PATHS)
    kernels = sum(paths * sb * sr for sb, sr in s)
    if cfg.lite:
        return tasks * e + paths * ((e + 1) * r * k + k * d0) + kernels
    return tasks * e + len(widths) * e + paths * (e + 1) * (r * k + k * d0) + kernels


def _linear(e: int, out: int, zero: bool) -> nn.Linear:
    lin = nn.Linear(e, out)
    with torch.no_grad():
        if zero:
            lin.weight.zero_()
        else:
            lin.weight.normal_(0.0, 1.0 / math.sqrt(e))
        lin.bias.zero_()
    return lin


class Polyhistor(ModuleForm):
    """Every adapter site's hooks and every shared tensor: embeddings, hypernetworks, scaling kernels."""

    kind = "adapter"

    def __init__(self, sites: list[Sublayer], widths: list[int], cfg: PolyhistorConfig, tasks: int) -> None:
        super().__init__()
        self._sites = sites  # plain list: the base modules never become children of the delta
        self.cfg, self.tasks = cfg, tasks
        self.d0, self.scale = scales(widths, cfg.rank_scaling)
        self.task = 0
        e, r, k, d0 = cfg.embedding, cfg.r, cfg.k, self.d0
        self.task_embedding = nn.Parameter(torch.randn(tasks, e))
        self.task_hyper = nn.ModuleDict({p: _linear(e, r * k, zero=p == "up") for p in PATHS})
        if cfg.lite:
            self.shared_b = nn.ParameterDict({p: nn.Parameter(torch.randn(k, d0)) for p in PATHS})
        else:
            self.layer_embedding = nn.Parameter(torch.randn(len(sites), e))
            self.layer_hyper = nn.ModuleDict({p: _linear(e, k * d0, zero=False) for p in PATHS})
        self.kernels = nn.ParameterDict()
        for i, (sb, sr) in enumerate(self.scale):
            self.kernels[f"{i}_down"] = nn.Parameter(torch.full((sr, sb), 1.0 / math.sqrt(sb)))
            self.kernels[f"{i}_up"] = nn.Parameter(torch.full((sb, sr), 1.0 / math.sqrt(sr)))
        self.act = ACTIVATIONS[cfg.activation]()

    # -- the task ---------------------------------------------------------------------------
    def deltatune_select_task(self, index: int) -> None:
        if not 0 <= index < self.tasks:
            raise DeltatuneError(f"task {index} does not exist: this polyhistor delta generates adapters for "
                                 f"{self.tasks} task(s)")
        self.task = int(index)

    # -- generation ---------------------------------------------------------------------------
    def templates(self, task: int, site: int) -> dict[str, torch.Tensor]:
        """K^down (r×d₀) and K^up (d₀×r) of ``task`` at site ``site``."""
        cfg, z = self.cfg, self.task_embedding[task]
        norm = 1.0 / math.sqrt(cfg.k * self.d0)
        out = {}
        for p in PATHS:
            a = self.task_hyper[p](z).view(cfg.r, cfg.k)
            b = self.shared_b[p] if cfg.lite else self.layer_hyper[p](self.layer_embedding[site]).view(cfg.k, self.d0)
            out[p] = (a @ b) * norm if p == "down" else ((a @ b).T * norm).contiguous()
        return out

    def weights(self, task: int, site: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The generated adapter (D: r_b×d_b, U: d_b×r_b) of ``task`` at site ``site``."""
        k = self.templates(task, site)
        return (torch.kron(self.kernels[f"{site}_down"], k["down"]), torch.kron(self.kernels[f"{site}_up"], k["up"]))

    def adapt(self, site: int, h: torch.Tensor) -> torch.Tensor:
        down, up = self.weights(self.task, site)
        z = h.to(down.dtype)
        return (self.act(z @ down.T) @ up.T).to(h.dtype)

    def install(self) -> None:
        for i, site in enumerate(self._sites):
            add_to_output(self, site, lambda h, i=i: self.adapt(i, h), "output")

    def extra_repr(self) -> str:
        return (f"tasks={self.tasks}, sites={len(self._sites)}, d0={self.d0}, r={self.cfg.r}, k={self.cfg.k}, "
                f"lite={self.cfg.lite}")

    def why_not_mergeable(self) -> str:
        return ("its adapters are generated per task by hypernetworks and pass a nonlinearity: serve it attached "
                "(select the task with deltatune.data.multitask.active_task)")


def refuse(model: nn.Module) -> None:
    """One line for a model polyhistor does not support (before anything is attached)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise DeltatuneError(f"polyhistor cannot be used on {kind}: it generates adapters for one stack of blocks "
                             "(an encoder or a decoder), not an encoder-decoder; use adapter or parallel_adapter")


def _model_tasks(model: nn.Module) -> int:
    """The number of task heads a multi-task model carries (``data.multitask``), else 1."""
    from deltatune.data.multitask import carried_tasks

    names = carried_tasks(model)
    return len(names) if names else 1


@register("polyhistor", PolyhistorConfig,
          "Polyhistor / -Lite: per-task bottleneck adapters generated by decomposed hypernetworks from shared task "
          "and layer embeddings, Kronecker scaling kernels for stages of different widths (Swin); multi-task with "
          "data.multitask",
          mergeable=False, traits=Traits(quantized_base=True), family="adapters & prompts")
def build(model: nn.Module, cfg: PolyhistorConfig, *, loading: bool = False) -> Built:
    refuse(model)
    if cfg.tasks is None:
        cfg.tasks = _model_tasks(model)  # resolved once, so the artifact records it
    layers = chosen_blocks(model, cfg.layers)
    kinds = PLACEMENTS[cfg.placement]
    sites = sorted((s for kind in kinds for s in sublayers(model, kind, layers)),
                   key=lambda s: (s.block, SUBLAYER_KINDS.index(s.kind)))
    if not sites:
        raise DeltatuneError(f"the model has no {' / '.join(kinds)} sublayer in the chosen blocks: choose other blocks")
    widths = [site_width(model, s) for s in sites]
    w = next(sites[0].writes.parameters())
    dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
    form = Polyhistor(sites, widths, cfg, cfg.tasks).to(w.device, dtype)
    forms: dict = {"polyhistor": form}
    add_trained_extras(model, [], "none", cfg.modules_to_save, forms, "polyhistor")
    return Built(forms)
