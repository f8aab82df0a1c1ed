"""The bottleneck adapter family of the unified view (He et al., ICLR 2022, arXiv 2110.04366): shared
config, builder and form of ``adapter``, ``parallel_adapter`` and ``scaled_parallel_adapter``.

Each adapter is one ``Bottleneck`` f(z) = s·W_up act(W_down z + b_down) + b_up at one ``Sublayer``:
sequential (h ← h + f(h), z = the sublayer output, before dropout / residual / post-LN) or parallel
(h ← h + f(x), x = the sublayer input). W_up and b_up start at zero, so a fresh delta is the base model.

A sequential adapter with ``activation: linear`` is an affine map of h, so it folds into the sublayer's last
projection h = W·x + b: W' = M·W, b' = M·b + c with M = I + s·W_up·W_down, c = s·(W_up·b_down + b_up).
That merge is offered only where it is exact: a projection with a bias to absorb c, nothing but (eval-mode)
dropout between it and the adapter. Every other adapter changes activations and is served attached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from deltatune.core.forms.module import (
    ACTIVATIONS,
    Bottleneck,
    ModuleForm,
    Sublayer,
    add_to_output,
    blocks,
    sublayers,
)
from deltatune.core.registry import Built
from deltatune.core.targeting import resolve_layers
from deltatune.errors import DeltatuneError
from deltatune.methods._lowrank import add_trained_extras

SUBLAYER_KINDS = ("attention", "cross_attention", "ffn")  # cross_attention: an encoder-decoder's decoder blocks
# the last projection of a sublayer module that is not itself a Linear / Conv1D (Llama, GPT-2, OPT-like)
_LAST_PROJECTIONS = ("o_proj", "down_proj", "c_proj", "out_proj", "fc2", "dense")


@dataclass
class BottleneckConfig:
    """Options every bottleneck adapter shares (method configs extend it and set their own defaults)."""

    # Houlsby et al. (2019) swept bottleneck sizes {8, 64, 256}; 64 is their middle size and, for the small
    # models this library ships (d = 384 for MiniLM, 576 for SmolLM2), a reduction factor of 6-9, close to
    # AdapterHub's default of 16 on d = 768. The unified view's big budgets (r = 200 / 512 on BART-large's
    # d = 1024) would be most of a small model's width.
    r: int = 64
    activation: str = "relu"  # the spec's f for every bottleneck adapter; "linear" makes a sequential one mergeable
    init: Literal["bert", "lora"] = "bert"  # W_down ~ N(0, 0.02) ("bert") or Kaiming-uniform ("lora"); W_up = 0 in both
    layers: list[int] | str | None = None  # blocks that get adapters: [0, 2], "6:" (a slice), None = all
    modules_to_save: list[str] | None = None  # modules trained fully next to the adapters (e.g. a fresh classifier)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r={self.r} must be a positive bottleneck size")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is unknown; use one of {sorted(ACTIVATIONS)}")
        if self.init not in ("bert", "lora"):
            raise ValueError(f"init={self.init!r} is unknown; use 'bert' or 'lora'")


def check_sublayers(kinds: list[str]) -> None:
    bad = [k for k in kinds if k not in SUBLAYER_KINDS]
    if bad or not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"sublayers={kinds!r} must be a non-empty list of distinct names from {list(SUBLAYER_KINDS)}")


def last_projection(site: Sublayer) -> nn.Module | None:
    """The Linear / GPT-2 Conv1D whose output is the sublayer's output h (None where it is not known)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(site.out, nn.Linear | Conv1D):  # named by the architecture table
        return site.out
    if isinstance(site.writes, nn.Linear | Conv1D):
        return site.writes
    for name in _LAST_PROJECTIONS:
        m = getattr(site.writes, name, None)
        if isinstance(m, nn.Linear | Conv1D):
            return m
    return None


class Adapter(ModuleForm):
    """A bottleneck at one sublayer; ``reads`` = "output" (sequential) or "input" (parallel)."""

    kind = "adapter"

    def __init__(self, site: Sublayer, bottleneck: Bottleneck, reads: Literal["output", "input"]) -> None:
        super().__init__()
        self.bottleneck = bottleneck
        self.reads = reads
        self._site = site  # a plain dataclass: its base modules do not become children of the delta
        proj = last_projection(site) if reads == "output" and bottleneck.activation == "linear" else None
        object.__setattr__(self, "_proj", proj)  # a base module: kept out of the delta's children
        # exact only with a bias to absorb s·(W_up·b_down + b_up); a bias-less projection (Llama) would
        # need a new tensor the model's config does not know
        self.mergeable = proj is not None and getattr(proj, "bias", None) is not None
        self._saved: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def site(self) -> Sublayer:
        return self._site

    def install(self) -> None:
        add_to_output(self, self._site, self.bottleneck, self.reads)

    # -- artifact: the bottleneck's parameters (a fixed scale comes from the config) ------------
    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters()}

    def stored_tensors_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters()]

    # -- merge (sequential, linear activation only) ------------------------------------------
    def _affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """M = I + s·W_up·W_down and c = s·(W_up·b_down + b_up), in float64."""
        b = self.bottleneck
        s = b.scale.detach().double()
        up, down = b.up.weight.detach().double(), b.down.weight.detach().double()
        m = torch.eye(up.shape[0], dtype=torch.float64, device=up.device) + s * up @ down
        c = s * (up @ b.down.bias.detach().double() + b.up.bias.detach().double())
        return m, c

    def why_not_mergeable(self) -> str:
        if self.reads == "input":
            return "a parallel adapter adds a new path from the sublayer input, which no base weight holds"
        if self.bottleneck.activation != "linear":
            return (f"its activation {self.bottleneck.activation!r} is not linear (only a sequential adapter with "
                    "activation: linear folds into the sublayer's last projection)")
        if self._proj is None:
            return f"the last projection of {self._site.name} is not a Linear / Conv1D this library knows"
        return f"the last projection of {self._site.name} has no bias to absorb the adapter's biases"

    def merge(self) -> None:
        if not self.mergeable:
            raise DeltatuneError(f"the adapter at {self._site.name} cannot be merged into weights: "
                                 f"{self.why_not_mergeable()}. Serve it attached.")
        if self.merged:
            raise DeltatuneError("this adapter is already merged; unmerge it before merging again")
        from transformers.pytorch_utils import Conv1D

        self.detach()
        proj = self._proj
        w, bias = proj.weight, proj.bias
        self._saved = (w.detach().clone(), bias.detach().clone())  # unmerge restores these bit for bit
        m, c = self._affine()
        with torch.no_grad():
            w64 = w.double()
            # Linear holds W as (out, in): W' = M·W; GPT-2's Conv1D holds its transpose: W' = W·Mᵀ
            w.copy_((w64 @ m.T if isinstance(proj, Conv1D) else m @ w64).to(w.dtype))
            bias.copy_((m @ bias.double() + c).to(bias.dtype))
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged or self._saved is None:
            raise DeltatuneError("this adapter is not merged; there is nothing to unmerge")
        with torch.no_grad():
            self._proj.weight.copy_(self._saved[0])
            self._proj.bias.copy_(self._saved[1])
        self._saved = None
        self.merged = False
        self.attach()

    def extra_repr(self) -> str:
        return f"site={self._site.name}, reads={self.reads}, mergeable={self.mergeable}"


def chosen_blocks(model: nn.Module, layers: list[int] | str | None) -> set[int] | None:
    """The ``layers`` option as block indices; an index outside the model is an error (not wrapped around)."""
    n = len(blocks(model))
    if isinstance(layers, list) and any(not -n <= int(i) < n for i in layers):
        raise DeltatuneError(f"layers={layers} names blocks the model does not have (it has {n}: 0..{n - 1})")
    chosen = resolve_layers(layers, n)
    if chosen is not None and not chosen:
        raise DeltatuneError(f"layers={layers!r} selects none of the model's {n} blocks")
    return chosen


def hidden_size(model: nn.Module) -> int:
    d = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(d, int):
        raise DeltatuneError(
            f"{type(model).__name__} has no config.hidden_size; bottleneck adapters need the model width"
        )
    return d


def site_width(model: nn.Module, site: Sublayer) -> int:
    """The width of h at ``site``: its output projection's (Swin's stages differ), else the model's."""
    proj = last_projection(site)
    if proj is not None:
        return int(proj.weight.shape[1] if type(proj).__name__ == "Conv1D" else proj.out_features)
    return hidden_size(model)


def _placement(site: Sublayer) -> tuple[torch.device, torch.dtype]:
    w = next(site.writes.parameters())
    # like LoRA's factors: adapters on a half-precision base train in fp32
    return w.device, (w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32)


def build_adapters(model: nn.Module, cfg: BottleneckConfig, *, kinds: list[str], reads: Literal["output", "input"],
                   scale: float = 1.0, learnable_scale: bool = False) -> Built:
    """One adapter per chosen block and sublayer kind (block order, attention before FFN), named
    ``<sublayer module>.adapter``, plus dense deltas for ``modules_to_save``."""
    layers = chosen_blocks(model, cfg.layers)
    sites = sorted((s for k in kinds for s in sublayers(model, k, layers)),
                   key=lambda s: (s.block, SUBLAYER_KINDS.index(s.kind)))
    if not sites:
        raise DeltatuneError(f"the model has no {' / '.join(kinds)} sublayer in the chosen blocks: choose other sublayers")
    forms: dict = {}
    for site in sites:
        device, dtype = _placement(site)
        bottleneck = Bottleneck(site_width(model, site), cfg.r, cfg.activation, scale, cfg.init, learnable_scale).to(device, dtype)
        forms[f"{site.name}.adapter"] = Adapter(site, bottleneck, reads)
    add_trained_extras(model, [], "none", cfg.modules_to_save, forms, "adapter")
    return Built(forms)
