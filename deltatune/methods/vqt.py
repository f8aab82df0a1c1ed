"""VQT, Visual Query Tuning (Tu, Mai, Chao; CVPR 2023; arXiv 2212.03220), on transformers classifiers: ViT image
and AST audio classifiers (the paper's setting) and text sequence classifiers.

Every block l gets T learned query rows Q_l. They go through block l like extra tokens, but only as
*queries* of self-attention: the keys and values are those of the real tokens, and the real tokens never
see the queries. So the backbone computes exactly what the frozen model computes, and each query output
O_l is a learned summary of layer l. A linear head reads
``f = [norm(CLS_L), norm(vec(O_1)), ..., norm(vec(O_L))]`` (per-chunk L2 norm, dim D·(1 + L·T)) and its
output replaces the model's logits; only Q and the head train.

Memory-efficient forward (the spec's "Memory-efficient training"): the frozen model runs once under
``no_grad`` while the form records, per block, the post-RoPE keys/values its attention used and the
arguments the block was called with. Then each block l is called again on its T query rows alone, its
attention fed the recorded keys/values (``set_kv_hook`` in "replace" mode) with a mask that lets the
queries see every non-padding token (no causal restriction: a query is not a position in the sequence)
and an identity rotation for RoPE models (no position for queries, as in the paper). The gradient of
Q_l stays inside block l: no backward pass crosses from one layer into an earlier one, and the autograd
graph holds the query path only. This equals full autograd with the queries inside the model, since the
real tokens do not depend on Q (tests/test_vqt.py checks both).

As in the official code (``Head2ToeEncoder.train`` keeps every backbone module in eval mode), the
backbone runs in eval mode even while training (no dropout in it); only the dropout on Q follows the
form's mode. CLS_L is what the model's own classifier pools: token 0 of the final hidden state for
encoders (ViT's CLS after its final LayerNorm, as the paper), the mean of the CLS and distillation tokens for AST
(``POOLED_TOKENS``), the last non-padding token (from ``attention_mask``) for decoders. Q's init range is VPT's
for the model's own patch size (ViT, AST) or p = 16 (text). Swin is refused (windowed attention). The model's own
classifier stays frozen and unused while the form is attached; detaching the form gives the model back untouched.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltatune.core.architectures import check_kv_hook
from deltatune.core.forms.attention import (
    attention_modules,
    check_kv_hook_reached,
    clear_kv_hook,
    set_kv_hook,
)
from deltatune.core.forms.module import ModuleForm, blocks
from deltatune.core.registry import Built, Traits, register
from deltatune.errors import DeltatuneError

# VPT's init for ViT-B/16: Xavier-uniform bound of the patch embedding (fan-in 3·p², fan-out D), p = 16.
# Text models have no patch; we keep p = 16, which puts the queries at ~0.06-0.07 for D = 384..768, the
# scale the method was tuned at (official VQT: h2t_vit.py, Head2ToeEncoder.__init__).
VPT_PATCH = 16

# classifier classes VQT reads (a linear head on the pooled final state): text, image and audio classifiers
CLASSIFIERS = ("ForSequenceClassification", "ForImageClassification", "ForAudioClassification")
# how many leading tokens the model's own classifier averages (AST pools its CLS and distillation tokens);
# every other model reads token 0 (encoders) or the last real token (decoders)
POOLED_TOKENS = {"audio-spectrogram-transformer": 2}


@dataclass
class VqtConfig:
    tokens: int = 1  # T query tokens per layer: README "can simply be set to 1" (official config default 5)
    dropout: float = 0.1  # on the query tokens (scripts/VQT: DROPOUT 0.1)
    init_range: float | None = None  # Q ~ U(-v, v); None: VPT's v = sqrt(6 / (3·16² + D))
    normalize: bool = True  # L2-normalise each feature chunk (official NORMALIZE_FEATS=True)

    def __post_init__(self) -> None:
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 0:
            raise ValueError(f"tokens={self.tokens!r} must be a non-negative integer (0: linear probing on CLS)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.init_range is not None and self.init_range <= 0:
            raise ValueError(f"init_range={self.init_range} must be positive (or null for VPT's default)")


def vpt_range(d: int, patch: int = VPT_PATCH) -> float:
    return math.sqrt(6.0 / (3 * patch * patch + d))


def _patch(config: Any) -> int:
    """The model's own patch size (ViT, AST: square patches, as VPT's formula takes them), else VPT_PATCH."""
    patch = getattr(config, "patch_size", None)
    return patch if isinstance(patch, int) and not isinstance(patch, bool) and patch > 0 else VPT_PATCH


@dataclass
class Reading:
    """What one forward reads from the frozen model: its own output, the pooled final representation
    (batch, D) and the query outputs O_l (batch, T, D), one per block, before normalisation."""

    output: Any
    cls: torch.Tensor
    queries: list[torch.Tensor]


class QueryTokens(ModuleForm):
    """VQT's parameters (Q: L×T×D, the linear head) and the two-pass forward that reads the model."""

    kind = "query-token"

    def __init__(self, model: nn.Module, tokens: int, dropout: float, init_range: float | None,
                 normalize: bool) -> None:
        super().__init__()
        self.__dict__["_model"] = model  # a plain attribute: the base model must not become a submodule
        self._blocks = [m for _, m in blocks(model)]
        self._attention = _attention_per_block(model, self._blocks)
        self._causal = bool(getattr(self._attention[0], "is_causal", False))
        self._pool = POOLED_TOKENS.get(str(getattr(model.config, "model_type", "")), 1)
        check_kv_hook_reached(model, self._attention, "vqt")
        cfg = model.config
        d, n_layers = int(cfg.hidden_size), len(self._blocks)
        ref = next(model.parameters())
        self.tokens = tokens
        self.normalize = normalize
        # T = 0 (linear probing) keeps an empty Q that does not train (DDP refuses a trainable unused tensor)
        self.queries = nn.Parameter(torch.empty(n_layers, tokens, d, device=ref.device), requires_grad=tokens > 0)
        v = init_range if init_range is not None else vpt_range(d, _patch(cfg))
        nn.init.uniform_(self.queries, -v, v)
        self.dropout = nn.Dropout(dropout)
        # nn.Linear's default init, as the official head (h2t_vit.py: Linear(features, num_classes))
        self.head = nn.Linear(d * (1 + n_layers * tokens), int(cfg.num_labels), device=ref.device)
        self._signature = inspect.signature(model.forward)
        self._mode: str | None = None  # "record" | "replace" | None (pass-through)
        self._own_forward: Any = None  # the model's forward as it was before install (an instance attribute)
        self._reset()
        self.train(model.training)  # attached to a model in eval mode, the dropout on Q is off too

    def why_not_mergeable(self) -> str:
        return ("its query tokens read every layer through extra attention queries and a new linear head replaces "
                "the model's logits; no weight of the model can hold that")

    # -- hooks ----------------------------------------------------------------------------
    def install(self) -> None:
        model = self._model
        for i, attn in enumerate(self._attention):
            set_kv_hook(model, attn, partial(self._kv_hook, i))
        for i, block in enumerate(self._blocks):
            self.keep(block.register_forward_pre_hook(partial(self._record_call, i), with_kwargs=True))
        self.keep(model.base_model.register_forward_hook(self._record_final))
        self._own_forward = model.__dict__.get("forward")
        model.forward = self.forward_model  # instance attribute: nn.Module.__call__ finds it first

    def uninstall(self) -> None:
        model = self._model
        for attn in self._attention:
            clear_kv_hook(model, attn)
        if self._own_forward is None:
            model.__dict__.pop("forward", None)
        else:
            model.forward = self._own_forward

    def _reset(self) -> None:
        n = len(self._blocks)
        self._calls: list[tuple[tuple, dict[str, Any]] | None] = [None] * n
        self._kv: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n
        self._final: torch.Tensor | None = None
        self._visible: torch.Tensor | None = None

    def _record_call(self, i: int, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._mode == "record":
            self._calls[i] = (args, kwargs)

    def _record_final(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._mode == "record":
            self._final = getattr(output, "last_hidden_state", None)
            if self._final is None:
                self._final = output[0]

    def _kv_hook(self, i: int, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 mask: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        if self._mode == "record":
            self._kv[i] = (key, value)
        elif self._mode == "replace":
            key, value = self._kv[i]
            mask = self._query_mask(query)
        return key, value, mask

    def _query_mask(self, query: torch.Tensor) -> torch.Tensor:
        """Additive mask (batch, 1, T, N): query rows see every non-padding token. Additive float works
        for both sdpa and eager attention."""
        assert self._visible is not None
        b, t, n = query.shape[0], query.shape[2], self._visible.shape[1]
        hidden = ~self._visible[:, None, None, :].expand(b, 1, t, n)
        zeros = torch.zeros(b, 1, t, n, dtype=query.dtype, device=query.device)
        return zeros.masked_fill(hidden.to(query.device), torch.finfo(query.dtype).min)

    # -- the forward ----------------------------------------------------------------------
    def read(self, *args: Any, **kwargs: Any) -> Reading:
        """Run the frozen model once without autograd, then every block on its query rows only."""
        if self._mode is not None:
            raise DeltatuneError("VQT's forward was re-entered (the model was called from inside its own forward)")
        bound = self._signature.bind(*args, **kwargs)
        attention_mask = bound.arguments.get("attention_mask")
        try:
            self._mode = "record"
            with torch.no_grad(), _eval_mode(self._model):
                output = self._own_or_class_forward()(*bound.args, **bound.kwargs)
            self._check_recorded(attention_mask)
            cls = self._pooled(attention_mask)
            self._mode = "replace"
            with _eval_mode(self._model):
                queries = self._query_outputs()
            return Reading(output, cls, queries)
        finally:
            self._mode = None
            self._reset()

    def _own_or_class_forward(self) -> Any:
        model = self._model
        return self._own_forward if self._own_forward is not None else type(model).forward.__get__(model)

    def _check_recorded(self, attention_mask: torch.Tensor | None) -> None:
        missing = [i for i, kv in enumerate(self._kv) if kv is None or self._calls[i] is None]
        if missing or self._final is None:
            raise DeltatuneError(
                f"VQT did not see block(s) {missing} or the final hidden states run in the forward; it needs every "
                "block of the model to run (no early exit, no layer skipping)"
            )
        key = self._kv[0][0]
        b, n = key.shape[0], key.shape[2]
        if attention_mask is None:
            self._visible = torch.ones(b, n, dtype=torch.bool, device=key.device)
        elif attention_mask.dim() == 2 and attention_mask.shape[1] == n:
            self._visible = attention_mask.to(key.device).bool()
        else:
            raise DeltatuneError(
                f"VQT reads whole sequences with a 2-D attention_mask (batch, length); got a mask of shape "
                f"{tuple(attention_mask.shape)} for {n} keys (a past_key_values cache or a 4-D mask is not supported)"
            )

    def _pooled(self, attention_mask: torch.Tensor | None) -> torch.Tensor:
        final = self._final
        assert final is not None
        if not self._causal:
            return sum(final[:, j] for j in range(self._pool)) / self._pool if self._pool > 1 else final[:, 0]
        n = final.shape[1]
        if attention_mask is None:
            return final[:, n - 1]
        positions = torch.arange(n, device=final.device)
        last = (positions * attention_mask.to(final.device).bool()).argmax(-1)  # rightmost real token
        return final[torch.arange(final.shape[0], device=final.device), last]

    def _query_outputs(self) -> list[torch.Tensor]:
        if self.tokens == 0:
            return []
        out = []
        for i, block in enumerate(self._blocks):
            args, kwargs = self._calls[i]
            hidden = args[0] if args else kwargs["hidden_states"]
            # the same Q_l for every example, each with its own dropout mask (as the official code)
            x = self.dropout(self.queries[i].to(hidden.dtype).expand(hidden.shape[0], -1, -1))
            kwargs = _query_kwargs(kwargs, self.tokens)
            if args:
                args = (x, *args[1:])
            else:
                kwargs["hidden_states"] = x
            result = block(*args, **kwargs)
            out.append(result[0] if isinstance(result, tuple) else result)
        return out

    def features(self, reading: Reading) -> torch.Tensor:
        """f = [norm(CLS_L), norm(vec(O_1)), ..., norm(vec(O_L))], float32, dim D·(1 + L·T)."""
        chunks = [reading.cls.float()] + [o.float().flatten(1) for o in reading.queries]
        if self.normalize:
            chunks = [F.normalize(c, dim=-1) for c in chunks]
        return torch.cat(chunks, dim=-1)

    def forward_model(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward while VQT is attached: its output with the head's logits (and loss)."""
        bound = self._signature.bind(*args, **kwargs)
        labels = bound.arguments.pop("labels", None)  # the loss is the head's, computed below
        reading = self.read(*bound.args, **bound.kwargs)
        logits = self.head(self.features(reading).to(self.head.weight.dtype))
        out = reading.output
        if not hasattr(out, "logits"):
            raise DeltatuneError("VQT needs the model to return an output object with .logits (return_dict=True)")
        fields = {k: v for k, v in out.items() if k not in ("logits", "loss")}
        loss = None if labels is None else classification_loss(logits, labels, self._model.config)
        return type(out)(loss=loss, logits=logits, **fields)


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: Any) -> torch.Tensor:
    """The loss transformers' sequence classifiers compute (problem_type from the config or inferred)."""
    labels = labels.to(logits.device)
    n = logits.shape[-1]
    problem = getattr(config, "problem_type", None)
    if problem is None:
        problem = "regression" if n == 1 else (
            "single_label_classification" if labels.dtype in (torch.long, torch.int) else "multi_label_classification")
    if problem == "regression":
        if n == 1:
            return F.mse_loss(logits.squeeze(-1), labels.view(-1).to(logits.dtype))
        return F.mse_loss(logits, labels.to(logits.dtype))
    if problem == "single_label_classification":
        return F.cross_entropy(logits.view(-1, n), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def _query_kwargs(kwargs: dict[str, Any], t: int) -> dict[str, Any]:
    """The block's keyword arguments for its T query rows: no cache, position 0, identity rotation."""
    out = dict(kwargs)
    pe = out.get("position_embeddings")
    if isinstance(pe, tuple) and len(pe) == 2:
        cos, sin = pe
        shape = (cos.shape[0], t, cos.shape[-1])
        out["position_embeddings"] = (cos.new_ones(shape), sin.new_zeros(shape))  # cos 1, sin 0: no rotation
    if isinstance(out.get("position_ids"), torch.Tensor):
        ids = out["position_ids"]
        out["position_ids"] = ids.new_zeros(ids.shape[0], t)
    for key in ("past_key_values", "past_key_value", "cache_position"):
        if key in out:
            out[key] = None
    if "use_cache" in out:
        out["use_cache"] = False
    return out


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    for m, _ in modes:
        m.training = False
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _attention_per_block(model: nn.Module, block_list: list[nn.Module]) -> list[nn.Module]:
    found = {id(m) for m in attention_modules(model)}
    out = []
    for i, block in enumerate(block_list):
        inside = [m for m in block.modules() if id(m) in found]
        if len(inside) != 1:
            raise DeltatuneError(
                f"block {i} ({type(block).__name__}) holds {len(inside)} attention modules; VQT supports blocks with "
                "exactly one self-attention (Llama-style, BERT-style encoders)"
            )
        out.append(inside[0])
    return out


def _check_model(model: nn.Module) -> None:
    name = type(model).__name__
    if not name.endswith(CLASSIFIERS) or not hasattr(model, "base_model"):
        raise DeltatuneError(
            f"VQT trains a linear head on a classification model, but {name} is not a ...ForSequenceClassification "
            "(or ViT / AST ...ForImageClassification / ...ForAudioClassification) model; load one with "
            "deltatune.data.models.load(name, task='classification', num_labels=n) (in a YAML config: data: {task: "
            "classification, head: true}; images / audio: data: {task: image-classification} / "
            "{task: audio-classification})"
        )
    if model.base_model is model:
        raise DeltatuneError(f"{name} has no separate backbone (base_model) whose final hidden states VQT can read")
    check_kv_hook(model, "vqt")  # Swin: windowed attention has no sequence for a query to read


@register("vqt", VqtConfig,
          "VQT: learned query tokens per layer read the frozen model; a linear head on their outputs classifies "
          "(no backprop through the backbone)", mergeable=False,
          traits=Traits(quantized_base=True, starts_at_base=False, new_head=True),
          family="adapters & prompts")
def build(model: nn.Module, cfg: VqtConfig, *, loading: bool = False) -> Built:
    _check_model(model)
    return Built({"vqt": QueryTokens(model, cfg.tokens, cfg.dropout, cfg.init_range, cfg.normalize)})
