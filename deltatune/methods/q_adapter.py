"""Q-Adapter (Chen, Nguyen, Komamizu, Ide; arXiv 2510.10022): learnable query tokens and a gate inside a vision
(here also audio) encoder's blocks, on ViT and AST classifiers.

What is verified and what is inferred. Verified (the paper's abstract, ``shared/methods/q-adapter.md``): Q-Adapter
adapts the *vision encoder* by inserting learnable query tokens and a gating layer into it, without text
conditioning, at about 1.4% trainable parameters. Everything below about *how* is the spec's reconstruction
(no method section or code could be read), built as the spec's "patches do not attend to the queries" variant:

In every chosen block l (``layers``; all by default), with the block's input Z_{l-1} and its frozen output Z_l:

1. **The queries read the patches.** M learned rows Q_l (M×D) go through block l as extra tokens: its
   pre-LN, its self-attention (with keys / values of the patches *and* of the queries, taken through the
   attention's key/value hook, ``core/forms/attention.py``), its MLP and residuals, giving O_l (M×D). The
   patches never see the queries inside the block: their path is the frozen model's, computed once.
2. **A gated write-back.** The patches cross-attend to the query outputs without new weights,
   A = softmax(LN(Z_l) LN(O_l)ᵀ / √D) O_l (LN without affine parameters), and the block's output becomes
   Z_l + tanh(g_l) ⊙ A, g_l a per-channel (D) or scalar gate, zero at init (LLaMA-Adapter's zero-init gating).

So a fresh delta is the base model exactly (Z_l + 0·A = Z_l bit for bit) and the gate is the only path from
the queries to the output: at init the queries get no gradient, the gates do; after the first step both train.
Trainable: M·D·|S| query values plus D·|S| (or |S|) gate values (and a fresh classification head, as for any
method). Gradients reach only the queries and gates: the backbone is frozen, and blocks before the first chosen
layer keep no autograd graph at all (their inputs need no gradient), so the backward pass stops there; it does
cross the chosen blocks and those after them (activations only), which the write-back feeds.

Queries start as VPT's uniform U(−v, v), v = √(6 / (3·p² + D)) with the model's patch size p (VQT's init).
The spec leaves open: the gate's form (a scalar, a per-channel vector or a D→1 linear: ``gate``), the set of
layers, whether queries see one another (here they do: the block's self-attention over [patches; queries] for the
query rows), and the write-back's attention (here parameter-free; the paper may have projections).

Only encoders whose input is pixels or a spectrogram with one global self-attention per block (ViT, AST) are
supported: Swin's windows would need the queries placed in every window, and text models are refused (the
method is about a vision encoder; use vqt or an adapter there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltatune.core import architectures
from deltatune.core.forms.attention import (
    attention_modules,
    check_kv_hook_reached,
    clear_kv_hook,
    set_kv_hook,
)
from deltatune.core.forms.module import ModuleForm, blocks
from deltatune.core.registry import Built, Traits, register
from deltatune.core.targeting import resolve_layers
from deltatune.errors import DeltatuneError


@dataclass
class QAdapterConfig:
    tokens: int = 8  # M learned query tokens per chosen block (spec: the number of queries, ablated in the paper)
    layers: list[int] | str | None = None  # blocks that get queries and a gate: [0, 2], "6:" (a slice), None = all
    gate: Literal["channel", "scalar"] = "channel"  # tanh(g) ⊙ write-back: g one value per channel (D) or per block
    init_range: float | None = None  # queries ~ U(-v, v); None: VPT's v = sqrt(6 / (3·p² + D)), p the patch size

    def __post_init__(self) -> None:
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise ValueError(f"tokens={self.tokens!r} must be a positive integer")
        if self.gate not in ("channel", "scalar"):
            raise ValueError(f"gate={self.gate!r} is unknown; use 'channel' or 'scalar'")
        if self.init_range is not None and self.init_range <= 0:
            raise ValueError(f"init_range={self.init_range} must be positive (or null for VPT's default)")


def _patch(config: Any) -> int:
    p = getattr(config, "patch_size", 16)
    return int(p[0] if isinstance(p, list | tuple) else p)


class QueryGate(ModuleForm):
    """The queries and gate of one block, and the hooks that run them (see the module doc)."""

    kind = "query-gate"

    def __init__(self, model: nn.Module, block: nn.Module, attention: nn.Module, tokens: int, gate: str,
                 init_range: float | None) -> None:
        super().__init__()
        self.__dict__["_model"] = model  # plain attributes: base modules must not become submodules of the form
        self.__dict__["_block"] = block
        self.__dict__["_attention"] = attention
        d = int(model.config.hidden_size)
        ref = next(model.parameters())
        v = init_range if init_range is not None else math.sqrt(6.0 / (3 * _patch(model.config) ** 2 + d))
        self.queries = nn.Parameter(torch.empty(tokens, d, device=ref.device, dtype=ref.dtype).uniform_(-v, v))
        self.gate = nn.Parameter(torch.zeros(d if gate == "channel" else 1, device=ref.device, dtype=ref.dtype))
        self._mode: str | None = None  # None: pass through; "record": keep the patches' keys / values; "query"
        self._kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self._call: tuple[tuple, dict[str, Any]] | None = None

    def why_not_mergeable(self) -> str:
        return "its query tokens run through the block and write back through a gated attention; no weight holds that"

    def install(self) -> None:
        set_kv_hook(self._model, self._attention, self._kv_hook)
        self.keep(self._block.register_forward_pre_hook(self._before, with_kwargs=True))
        self.keep(self._block.register_forward_hook(self._after))

    def uninstall(self) -> None:
        clear_kv_hook(self._model, self._attention)

    def _kv_hook(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 mask: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        if self._mode == "record":
            self._kv = (key, value)
        elif self._mode == "query":
            assert self._kv is not None
            patch_key, patch_value = self._kv
            return torch.cat([patch_key, key], dim=2), torch.cat([patch_value, value], dim=2), None
        return key, value, mask

    def _before(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._mode != "query":  # (a "record" left by a forward that raised is stale: start again)
            self._call, self._kv = (args, kwargs), None
            self._mode = "record"

    def _after(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if self._mode != "record":
            return None
        try:
            z = output[0] if isinstance(output, tuple) else output
            if self._kv is None:
                raise DeltatuneError("q_adapter's block ran without its attention's key/value hook being called")
            call_args, call_kwargs = self._call  # type: ignore[misc]
            x = self.queries.to(z.dtype).expand(z.shape[0], -1, -1)
            self._mode = "query"
            if call_args:
                call_args = (x, *call_args[1:])
            else:
                call_kwargs = {**call_kwargs, "hidden_states": x}
            if len(call_args) > 1:
                call_args = (call_args[0], None, *call_args[2:])  # no attention mask for the query rows
            call_kwargs = {k: (None if k == "attention_mask" else v) for k, v in call_kwargs.items()}
            result = self._block(*call_args, **call_kwargs)
            o = result[0] if isinstance(result, tuple) else result
            d = z.shape[-1]
            weights = torch.softmax(F.layer_norm(z, (d,)) @ F.layer_norm(o, (d,)).transpose(1, 2) / math.sqrt(d), -1)
            new = z + torch.tanh(self.gate).to(z.dtype) * (weights @ o)
        finally:
            self._mode, self._kv, self._call = None, None, None
        return (new, *output[1:]) if isinstance(output, tuple) else new


def _check_model(model: nn.Module) -> None:
    arch = architectures.of(model)
    if arch.inputs == "tokens" or arch.kv_hook is not None or not arch.stacks:
        why = ("its attention runs on shifted windows, where the queries would need a place in every window"
               if arch.kv_hook is not None else f"{arch.name} is not one")
        raise DeltatuneError(f"q_adapter supports ViT and AST encoders (pixels / spectrogram inputs), and {why}; use "
                             "vqt, an adapter or lora")


@register("q_adapter", QAdapterConfig,
          "Q-Adapter: learned query tokens per ViT / AST block read the patches; a zero-init tanh gate writes "
          "their summary back (starts at the base)", mergeable=False,
          traits=Traits(quantized_base="its query path is tested on full-precision ViT / AST encoders only"),
          family="adapters & prompts")
def build(model: nn.Module, cfg: QAdapterConfig, *, loading: bool = False) -> Built:
    _check_model(model)
    found = blocks(model)
    chosen = resolve_layers(cfg.layers, len(found))
    chosen = set(range(len(found))) if chosen is None else chosen
    attentions = {id(m) for m in attention_modules(model)}
    forms: dict[str, ModuleForm] = {}
    pairs = []
    for i in sorted(chosen):
        if not 0 <= i < len(found):
            raise DeltatuneError(f"layers={cfg.layers!r} names block {i}, but the model has {len(found)} blocks")
        name, block = found[i]
        inside = [m for m in block.modules() if id(m) in attentions]
        if len(inside) != 1:
            raise DeltatuneError(f"block {name} holds {len(inside)} attention modules; q_adapter needs exactly one")
        pairs.append((name, block, inside[0]))
    check_kv_hook_reached(model, [a for _, _, a in pairs], "q_adapter")
    for name, block, attention in pairs:
        forms[name] = QueryGate(model, block, attention, cfg.tokens, cfg.gate, cfg.init_range)
    return Built(forms)

