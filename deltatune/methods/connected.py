"""IAA: "aside" modules that connect scattered adapters (Ma et al., CIKM 2022, "Scattered or Connected?
An Optimized Parameter-efficient Tuning Approach for Information Retrieval", arXiv 2208.09847).

The paper finds that PEFT modules scattered between frozen blocks learn slowly: a module's gradient must
cross every frozen block above it. IAA adds aside bottlenecks alongside the frozen stack that join the
scattered modules into a trainable pathway from bottom to top. No official code or method section was
available; the equations follow the reconstruction of the project's spec (``connected.md``):

- scattered adapters: sequential bottlenecks h ← h + a(h) on each block's FFN output (Pfeiffer) or on its
  attention and FFN outputs (Houlsby), before the residual add;
- aside pathway over the block outputs h_l: g_0 = 0, g_l = g_{l−1} + Bn_l(h_l + g_{l−1}), and the model
  goes on with h̃ = h_L + g_L in place of the last block's output. For BERT that is the last hidden state
  (the pooler, a classifier head or a sentence-embedding pooling read h̃); for Llama / GPT-2 the final
  norm comes after the last block, so g_L is added *before* the final norm.

Variants (``variant``): ``"aside"`` (V1, the pathway alone), ``"aside+adapters"`` (V2, the default),
``"linked"`` (V3: no pathway over block outputs; the aside modules link the adapters instead, adapter k+1
reading h + Bn_k(δ_k) with δ_k the output of adapter k, the adapters taken in forward order), and
``"adapters"`` (the scattered adapters alone: the paper's baseline, for comparisons at equal size).

Every W_up (and b_up) starts at zero, so the tuned model starts exactly at the base model. Nothing
merges into the weights (nonlinear modules on activations); serve the delta attached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from deltatune.core.forms.base import Form
from deltatune.core.forms.module import Bottleneck, ModuleForm, Sublayer, add_to_output, blocks, sublayers
from deltatune.core.registry import Built, Traits, register
from deltatune.errors import DeltatuneError
from deltatune.methods._lowrank import add_trained_extras

Variant = Literal["aside", "aside+adapters", "linked", "adapters"]
PLACEMENTS: dict[str, tuple[str, ...]] = {"pfeiffer": ("ffn",), "houlsby": ("attention", "ffn")}


@dataclass
class ConnectedConfig:
    # V2 (aside pathway + scattered adapters) is the spec's default: the variant the paper's argument is about
    variant: Variant = "aside+adapters"
    # aside bottleneck m: the spec's suggestion for BERT-base (adapters 64 + aside 64 ≈ 2% of the parameters
    # with Pfeiffer placement; the paper's own value is unknown)
    r: int = 64
    adapter_r: int = 64  # scattered adapters' bottleneck (the paper: 64 for BERT-base)
    # Pfeiffer (one adapter per block, after the FFN) keeps the total near the spec's 0.5–2% of BERT-base;
    # Houlsby (after attention and FFN) doubles the adapters; variant "aside" has no adapters and ignores it
    placement: Literal["pfeiffer", "houlsby"] = "pfeiffer"
    activation: str = "relu"  # σ of every bottleneck (the paper: ReLU or GELU)
    # W_down init: "bert" = N(0, 0.02) (the adapter repos' init), "lora" = Kaiming-uniform; W_up is zero either way
    init: Literal["bert", "lora"] = "bert"
    modules_to_save: list[str] | None = None  # trained fully, e.g. ["classifier"] for a fresh head

    def __post_init__(self) -> None:
        if self.r < 1 or self.adapter_r < 1:
            raise ValueError(f"bottleneck sizes must be positive integers (r={self.r}, adapter_r={self.adapter_r})")


def _first(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


def _replace_first(value: Any, new: torch.Tensor) -> Any:
    return (new, *value[1:]) if isinstance(value, tuple) else new


class Connected(ModuleForm):
    """Scattered adapters at ``sites`` and the aside modules that connect them (one form: the pathway
    carries state from block to block within one forward pass)."""

    kind = "connected modules"

    def __init__(self, model: nn.Module, variant: Variant, sites: list[Sublayer], d: int, r: int, adapter_r: int,
                 activation: str, init: str) -> None:
        super().__init__()
        self.variant = variant
        self._blocks = [m for _, m in blocks(model)]  # plain lists: base modules must not become our children
        self._sites = sites
        with_adapters = variant != "aside"
        n_adapters = len(sites) if with_adapters else 0
        self.adapters = nn.ModuleList(Bottleneck(d, adapter_r, activation, init=init) for _ in range(n_adapters))
        if variant in ("aside", "aside+adapters"):
            n_aside = len(self._blocks)  # Bn_l, one beside each block
        elif variant == "linked":
            n_aside = max(n_adapters - 1, 0)  # Bn_k links adapter k to adapter k+1
        else:
            n_aside = 0
        self.aside = nn.ModuleList(Bottleneck(d, r, activation, init=init) for _ in range(n_aside))
        # per forward pass: g_l by block (pathway) or δ_k by adapter (links). Kept by index, not as a running
        # value: gradient checkpointing reruns a block's forward in backward, with the sublayer hooks inside it
        # (and, in transformers 4, the block hooks too), and the rerun of block l must read the same g_{l-1} / δ_k
        self._g: dict[int, torch.Tensor] = {}
        self._delta: dict[int, torch.Tensor] = {}

    def install(self) -> None:
        for k, (site, adapter) in enumerate(zip(self._sites, self.adapters, strict=False)):
            f = self._linked_adapter(k) if self.variant == "linked" else adapter
            add_to_output(self, site, f, reads="output")
        if self.variant in ("aside", "aside+adapters"):
            last = len(self._blocks) - 1
            for i, block in enumerate(self._blocks):
                self.keep(block.register_forward_hook(self._pathway(i, i == last)))

    def uninstall(self) -> None:
        self._g.clear()
        self._delta.clear()

    def _pathway(self, i: int, last: bool) -> Callable[[nn.Module, tuple, Any], Any]:
        bn = self.aside[i]

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            h = _first(output)
            dtype = bn.down.weight.dtype  # the pathway runs in the modules' precision, not a half-precision base's
            if i == 0:
                g = bn(h.to(dtype))  # g_1 = Bn_1(h_1 + g_0), g_0 = 0
            else:
                prev = self._g.get(i - 1)
                if prev is None or prev.shape != h.shape:
                    raise DeltatuneError(
                        f"connected modules: block {i} ran without block {i - 1} before it in this forward pass; "
                        "the aside pathway needs every block, in order"
                    )
                g = prev + bn(h.to(dtype) + prev)
            self._g[i] = g
            if not last:
                return output
            if not torch.is_grad_enabled():
                self._g.clear()  # inference: nothing will recompute a block, free the pathway now
            return _replace_first(output, (h + g).to(h.dtype))  # h̃ = h_L + g_L

        return hook

    def _linked_adapter(self, k: int) -> Callable[[torch.Tensor], torch.Tensor]:
        adapter = self.adapters[k]
        last = len(self.adapters) - 1

        def f(h: torch.Tensor) -> torch.Tensor:
            if k == 0:
                delta = adapter(h)
            else:
                prev = self._delta.get(k - 1)
                if prev is None or prev.shape != h.shape:
                    raise DeltatuneError(
                        f"connected modules: adapter {k} ran without adapter {k - 1} before it in this forward pass; "
                        "linked adapters need every block, in order"
                    )
                delta = adapter(h + self.aside[k - 1](prev))  # a_{k+1} reads h + Bn_k(δ_k)
            if k < last:
                self._delta[k] = delta
            elif not torch.is_grad_enabled():
                self._delta.clear()
            return delta

        return f


def _hidden_size(model: nn.Module) -> int:
    d = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(d, int):
        raise DeltatuneError(
            f"{type(model).__name__} has no config.hidden_size; connected modules need a transformers model "
            "with numbered blocks (BERT, Llama, GPT-2 style)"
        )
    return d


@register("connected", ConnectedConfig,
          "IAA (scattered or connected): aside bottlenecks joining the block outputs (and the adapters) into a "
          "trainable pathway, h̃ = h_L + g_L; not mergeable", mergeable=False,
          traits=Traits(quantized_base=True), family="adapters & prompts")
def build(model: nn.Module, cfg: ConnectedConfig, *, loading: bool = False) -> Built:
    d = _hidden_size(model)
    sites = sorted(
        (s for kind in PLACEMENTS[cfg.placement] for s in sublayers(model, kind)),  # type: ignore[arg-type]
        key=lambda s: (s.block, s.kind != "attention"),  # forward order: attention before FFN in each block
    )
    form = Connected(model, cfg.variant, sites, d, cfg.r, cfg.adapter_r, cfg.activation, cfg.init)
    ref = next(model.parameters())
    dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32  # half bases: fp32 modules
    form.to(device=ref.device, dtype=dtype)
    forms: dict[str, Form] = {"connected": form}
    add_trained_extras(model, [], "none", cfg.modules_to_save, forms, "connected")
    return Built(forms)
