"""Prompt tuning (Lester, Al-Rfou & Constant, 2021, arXiv 2104.08691): l trainable soft tokens put
before the input embeddings; nothing else changes, the whole model stays frozen.

Causal models (Llama, GPT-2): under a causal mask the soft tokens attend only to each other, so
their keys and values at every layer do not depend on the input. Prompt tuning is therefore exactly
a prefix whose keys and values come from running the frozen model on the soft tokens alone
(positions 0..l-1), with the real tokens' positions moved up by l (RoPE or absolute). That is how it
runs here: one pass of the l soft tokens per forward (batch-independent; without gradients it is
reused while the soft tokens are unchanged, so generation does not repeat it per token), their
per-layer keys/values put in front through the attention hook (``_prefix.add_prefix``), and the
position ids shifted by l. The caller's outputs, labels and attention mask keep their own
positions, and the KV cache holds the real tokens only, so ``generate`` with and without the cache
agree. Equal to feeding
``inputs_embeds = cat(prompt, embeds)`` with the mask extended by l ones (tests/test_prefix.py).

Encoders (BERT-style): every position attends to every other, so the soft tokens are inserted
literally, right after the first token ([CLS]) so that the pooler and a classification head still
read [CLS]; they take positions 1..l, and the outputs returned to the caller (hidden states,
per-token logits) have the l positions removed again.

A fresh delta does not reproduce the base model's outputs: the soft tokens are attended to from the
first step, by design.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from deltatune.core import architectures
from deltatune.core.forms.attention import attention_modules, check_kv_hook_reached, set_kv_hook
from deltatune.core.forms.module import ModuleForm
from deltatune.core.registry import Built, Traits, register
from deltatune.errors import DeltatuneError
from deltatune.methods._common import dense_forms
from deltatune.methods._prefix import KVUnhook, Snapshot, add_prefix, head_parameters


@dataclass
class PromptConfig:
    # Lester et al.'s default length (their main runs); their length ablation shows small models need
    # long prompts (20 tokens suffice only at T5-XXL scale), and deltatune's models are small
    length: int = 100
    # "vocab": copies of sampled vocabulary embeddings (Lester's sampled-vocab init, sampled uniformly: no
    # token frequencies here); "random": uniform [-0.5, 0.5] (their random init)
    init: Literal["vocab", "random"] = "vocab"
    modules_to_save: list[str] | None = None  # base modules trained fully, e.g. ["classifier"] (a fresh head)

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"length={self.length} must be at least 1")
        if self.init not in ("vocab", "random"):
            raise ValueError(f"init={self.init!r}: use 'vocab' or 'random'")


def _as_kwargs(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """A forward call's arguments by name (positional ones bound to the signature of ``module.forward``)."""
    if not args:
        return dict(kwargs)
    sig = inspect.signature(module.forward)
    out: dict[str, Any] = {}
    for name, value in sig.bind_partial(*args, **kwargs).arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise DeltatuneError(f"{type(module).__name__}.forward takes *args; call it with keyword arguments")
        else:
            out[name] = value
    return out


def _position_table(backbone: nn.Module) -> nn.Embedding | None:
    """The absolute position embedding (GPT-2's wpe, BERT's embeddings.position_embeddings), if any."""
    table = getattr(backbone, "wpe", None)
    if table is None:
        table = getattr(getattr(backbone, "embeddings", None), "position_embeddings", None)
    return table if isinstance(table, nn.Embedding) else None


def _insert_after_first(x: torch.Tensor, middle: torch.Tensor) -> torch.Tensor:
    return torch.cat([x[:, :1], middle, x[:, 1:]], dim=1)


class SoftPrompt(ModuleForm):
    """l soft tokens (``embedding``, (l, d)) before the input of a transformers model (see the module doc)."""

    kind = "prompt"

    def __init__(self, model: nn.Module, length: int, init: str = "vocab", loading: bool = False) -> None:
        architectures.check_text_model(model, "prompt")  # soft tokens need token embeddings and one input stack
        super().__init__()
        table = model.get_input_embeddings().weight
        if loading:
            value = torch.zeros(length, table.shape[1])
        elif init == "vocab":
            ids = torch.randint(0, table.shape[0], (length,))
            value = table.detach()[ids].float().cpu().clone()
        else:
            value = torch.empty(length, table.shape[1]).uniform_(-0.5, 0.5)
        self.embedding = nn.Parameter(value)
        self.length = length
        backbone = getattr(model, "base_model", model)
        self._site = (model, backbone)  # a tuple: the base modules must not become our submodules
        self._attention = [m for m in attention_modules(model) if getattr(m, "is_causal", False)]
        self.causal = bool(self._attention)
        if self.causal:
            check_kv_hook_reached(model, self._attention, "prompt")
        self._capturing = False
        self._seen: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._cache: tuple[tuple, Snapshot, list] | None = None  # no-grad: the soft tokens' keys/values
        self._inserted: list[int] = []

    def why_not_mergeable(self) -> str:
        return "soft tokens are extra inputs every token attends to, which no change of the weights reproduces"

    def base_tensors(self) -> dict[str, torch.Tensor]:
        # the soft tokens live in the input embedding space (and were sampled from it)
        return {"input_embeddings": self._site[0].get_input_embeddings().weight}

    # -- attaching ---------------------------------------------------------------------------
    def install(self) -> None:
        model, backbone = self._site
        if self.causal:
            for i, attn in enumerate(self._attention):
                set_kv_hook(model, attn, functools.partial(self._kv_hook, i))
                self.keep(KVUnhook(model, attn))
            self.keep(backbone.register_forward_pre_hook(self._before_causal, with_kwargs=True))
        else:
            self.keep(backbone.register_forward_pre_hook(self._before_encoder, with_kwargs=True))
            self.keep(backbone.register_forward_hook(self._after_encoder, with_kwargs=True))

    def uninstall(self) -> None:
        self._kv, self._cache, self._inserted = [], None, []

    def _check_positions(self, backbone: nn.Module, positions: torch.Tensor) -> None:
        table = _position_table(backbone)
        if table is not None and positions.numel() and int(positions.max()) >= table.num_embeddings:
            raise DeltatuneError(
                f"the prompt's {self.length} soft tokens and the input need position {int(positions.max())}, but "
                f"{type(backbone).__name__} has {table.num_embeddings} positions: shorten the input or the prompt"
            )

    # -- causal models: the soft tokens' keys/values as a prefix -------------------------------------
    def _kv_hook(self, index: int, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 mask: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        if self._capturing:  # the soft tokens' own pass: read their keys/values
            self._seen[index] = (key, value)
            return key, value, mask
        pk, pv = self._kv[index]
        return add_prefix(module, query, key, value, mask, pk, pv)

    def prompt_kv(self, backbone: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the keys/values of the soft tokens at positions 0..l-1, each (1, kv_heads, l, head_dim)."""
        device = self.embedding.device.type
        mode = (backbone.training, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        grad = torch.is_grad_enabled()
        if not grad and self._cache is not None and self._cache[0] == mode and self._cache[1].same([self.embedding]):
            return self._cache[2]
        table = backbone.get_input_embeddings().weight
        # the pass is l tokens, batch 1: keep its activations rather than checkpoint it, since a recompute in
        # backward would run the hooks outside this capturing pass
        checkpointed = [m for m in backbone.modules() if getattr(m, "gradient_checkpointing", False)]
        self._seen = [None] * len(self._attention)
        self._capturing = True
        try:
            for m in checkpointed:
                m.gradient_checkpointing = False
            backbone(inputs_embeds=self.embedding.to(table.dtype)[None], use_cache=False)
        finally:
            self._capturing = False
            for m in checkpointed:
                m.gradient_checkpointing = True
        seen, self._seen = self._seen, []
        if any(s is None for s in seen):
            raise DeltatuneError("the soft tokens' pass did not reach every attention layer of the model")
        kv = [s for s in seen if s is not None]
        self._cache = (mode, Snapshot([self.embedding]), kv) if not grad else None
        return kv

    def _before_causal(self, backbone: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        if self._capturing:
            return None
        kw = _as_kwargs(backbone, args, kwargs)
        self._kv = self.prompt_kv(backbone)
        x = kw.get("input_ids") if kw.get("input_ids") is not None else kw.get("inputs_embeds")
        if x is None:
            raise DeltatuneError("prompt tuning needs input_ids or inputs_embeds")
        positions = kw.get("position_ids")
        if positions is None:  # what the model would use: 0.. after the tokens already in the cache
            past = kw.get("past_key_values")
            seen = past.get_seq_length() if past is not None else 0
            positions = (torch.arange(x.shape[1], device=x.device) + seen)[None]
        kw["position_ids"] = positions + self.length
        self._check_positions(backbone, kw["position_ids"])
        return (), kw

    # -- encoders: the soft tokens inserted after the first token ------------------------------------
    def _before_encoder(self, backbone: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        kw = _as_kwargs(backbone, args, kwargs)
        embeds = kw.get("inputs_embeds")
        if embeds is None:
            if kw.get("input_ids") is None:
                raise DeltatuneError("prompt tuning needs input_ids or inputs_embeds")
            embeds = backbone.get_input_embeddings()(kw["input_ids"])
        b, n, k = embeds.shape[0], embeds.shape[1], self.length
        kw["input_ids"] = None
        kw["inputs_embeds"] = _insert_after_first(embeds, self.embedding.to(embeds.dtype)[None].expand(b, -1, -1))
        mask = kw.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise DeltatuneError("prompt tuning on an encoder needs a 2-D attention mask (batch, length)")
            kw["attention_mask"] = _insert_after_first(mask, mask.new_ones(b, k))
        if kw.get("token_type_ids") is not None:
            kw["token_type_ids"] = _insert_after_first(kw["token_type_ids"], kw["token_type_ids"].new_zeros(b, k))
        positions = kw.get("position_ids")
        if positions is not None:  # the soft tokens follow the first token; the rest move up by l
            first = positions[:, :1]
            middle = first + 1 + torch.arange(k, device=positions.device)
            kw["position_ids"] = torch.cat([first, middle.expand(positions.shape[0], -1), positions[:, 1:] + k], dim=1)
        else:
            self._check_positions(backbone, torch.tensor([n + k - 1]))
        self._inserted.append(n)
        return (), kw

    def _after_encoder(self, backbone: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if not self._inserted:
            return output
        n = self._inserted.pop()
        keep = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(1 + self.length, n + self.length)])

        def cut(t: Any, dims: tuple[int, ...] = (1,)) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            for d in dims:
                t = t.index_select(d, keep.to(t.device))
            return t

        if isinstance(output, tuple):
            return (cut(output[0]), *output[1:])
        output.last_hidden_state = cut(output.last_hidden_state)
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(cut(h) for h in output.hidden_states)
        if getattr(output, "attentions", None) is not None:
            output.attentions = tuple(cut(a, (-2, -1)) for a in output.attentions)
        return output


@register("prompt", PromptConfig, "prompt tuning: soft tokens before the input (a prefix of their own "
          "keys/values in causal models; after [CLS] in encoders)", mergeable=False,
          traits=Traits(quantized_base=True, starts_at_base=False), family="adapters & prompts")
def build(model: nn.Module, cfg: PromptConfig, *, loading: bool = False) -> Built:
    forms: dict[str, Any] = {"prompt": SoftPrompt(model, cfg.length, cfg.init, loading)}
    if cfg.modules_to_save:
        forms.update(dense_forms(model, head_parameters(model, cfg.modules_to_save)))
    return Built(forms)
