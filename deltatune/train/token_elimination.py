"""LeMo token elimination (``train.token_elimination``): at long context, each decoder layer runs on the informative
segments of the sequence only, the others pass through it unchanged, so the activations saved for backward shrink
with the share of tokens kept. A training-time option beside any method; evaluation and generation stay dense.

    train: {token_elimination: {sparsity: 0.5, segment: 64, exempt_layers: [0, 1, -1], predictor_every: 10}}

Per non-exempt layer and training forward (``Eliminator.batch`` marks a batch as training):

1. the sequence is cut into segments of ``segment`` tokens; the first and the last segment, and every segment that
   holds a labelled position (or the position predicting one), are never eliminated;
2. each segment gets a score: every ``predictor_every``-th training forward the *true* score, the attention its keys
   receive (``true_scores``: softmax(q kᵀ) of the layer's own projections and RoPE, each row's weights relative to
   uniform attention, summed over heads and a strided sample of query rows, each key's sum divided by the sampled
   rows that can see it), which also trains the
   layer's predictor (a d → 64 → 1 MLP on the segment-mean hidden state, trained online towards the standardised
   log scores); on the other forwards the predictor's output;
3. the ``round(sparsity · n_segments)`` lowest-scoring eliminable segments are dropped (fewer where fewer are
   eliminable; the same count for every row of the batch, so the kept rows form one tensor);
4. the layer's own forward runs on the kept rows, gathered in their original order, with their original RoPE
   position embeddings and the causal mask of their original positions (the attention mask's kept rows and columns;
   none for SDPA's causal path): eliminated tokens take no part in this layer's queries, keys, values or MLP
   (the strict K/V policy), and their rows of the output are the input's, copied through unchanged.

The gather and the scatter back save only indices for backward; the layer saves its activations for the kept rows
only. The predictors' weights, their Adam state and the forward counter are the checkpoint's ``token_elimination``
entry, so a resumed run picks the same segments. ``docs/lemo.md`` says what is the paper's and what is
reconstructed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltatune.core import architectures
from deltatune.errors import DeltatuneError

IGNORE_INDEX = -100
# model types whose decoder layers take (hidden_states, attention_mask=, position_embeddings=, position_ids=) and whose
# attention is input_layernorm -> q_proj / k_proj (per-head q_norm / k_norm where present) -> Llama's RoPE
SUPPORTED = ("llama", "qwen2", "qwen3")
ATTENTION = ("sdpa", "eager")  # attention functions that take the gathered mask (or SDPA's causal path) as is
TASKS = ("chat", "edit")  # tasks whose batches carry labels with unlabelled context to eliminate
PREDICTOR_WIDTH = 64
PREDICTOR_ITERS = 4  # Adam steps a predictor takes on each batch with true scores
SCORE_QUERIES = 256  # query rows sampled (evenly, the last one included) for the true scores


@dataclass
class TokenEliminationSettings:
    """``train.token_elimination`` (LeMo, docs/lemo.md); null: off."""

    sparsity: float = 0.5  # the share of a sequence's segments each non-exempt layer leaves out (fewer if not eliminable)
    segment: int = 64  # tokens per segment: segments are kept or eliminated whole
    exempt_layers: list[int] | None = None  # layers that always run dense (negative: from the end); null: [0, 1, -1]
    predictor_every: int = 10  # true attention scores (and a predictor update) every N training forwards; 1: always
    predictor_lr: float = 1e-3  # Adam learning rate of the per-layer pattern predictors

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.sparsity, int | float) and 0.0 <= self.sparsity < 1.0):
            problems.append(f"sparsity={self.sparsity!r}: must be >= 0 and < 1 (the share of segments left out)")
        if not isinstance(self.segment, int) or self.segment < 1:
            problems.append(f"segment={self.segment!r}: must be an integer >= 1 (tokens per segment, e.g. 64)")
        if not isinstance(self.predictor_every, int) or self.predictor_every < 1:
            problems.append(f"predictor_every={self.predictor_every!r}: must be an integer >= 1")
        if not (isinstance(self.predictor_lr, int | float) and 0 < self.predictor_lr <= 1):
            problems.append(f"predictor_lr={self.predictor_lr!r}: must be > 0 and at most 1")
        if self.exempt_layers is not None and not all(isinstance(i, int) for i in self.exempt_layers):
            problems.append(f"exempt_layers={self.exempt_layers!r}: a list of layer indices (negative: from the end)")
        if problems:
            raise DeltatuneError("; ".join(problems))

    def exempt(self, n_layers: int) -> set[int]:
        given = [0, 1, -1] if self.exempt_layers is None else self.exempt_layers
        bad = [i for i in given if not -n_layers <= i < n_layers]
        if bad:
            raise DeltatuneError(f"train.token_elimination.exempt_layers: {bad[0]} is not a layer of a model with "
                                 f"{n_layers} layers; use 0..{n_layers - 1} or -1..-{n_layers}")
        return {i % n_layers for i in given}


# ---------------------------------------------------------------- the computation on kept rows


def run_on_kept(layer_forward: Callable[..., Any], hidden: torch.Tensor, keep: torch.Tensor,
                kwargs: dict[str, Any]) -> torch.Tensor:
    """``layer_forward(hidden[kept], ...)`` on the kept rows ``keep`` (batch, n: sorted token indices per row) with
    their original position embeddings / ids and the mask's kept rows and columns; the output is the input with the
    kept rows replaced by the layer's output (eliminated rows copied through, bit for bit)."""
    b = hidden.shape[0]
    rows = torch.arange(b, device=hidden.device)[:, None].expand_as(keep)
    kw = dict(kwargs)
    cos, sin = kwargs["position_embeddings"]
    kw["position_embeddings"] = (cos.expand(b, -1, -1)[rows, keep], sin.expand(b, -1, -1)[rows, keep])
    if isinstance(kwargs.get("position_ids"), torch.Tensor):
        kw["position_ids"] = kwargs["position_ids"].expand(b, -1)[rows, keep]
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[1] != 1:
            raise DeltatuneError(f"train.token_elimination cannot gather a {type(mask).__name__} attention mask; "
                                 "use attn_implementation sdpa or eager")
        m = mask.expand(b, -1, -1, -1)[:, 0]
        kw["attention_mask"] = m[rows[:, :, None], keep[:, :, None], keep[:, None, :]].unsqueeze(1)
    out = layer_forward(hidden[rows, keep], **kw)
    if isinstance(out, tuple):
        out = out[0]
    return torch.index_put(hidden, (rows, keep), out)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def true_scores(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], padding: torch.Tensor | None,
                queries: int = SCORE_QUERIES) -> torch.Tensor:
    """(batch, seq): the attention each token receives in ``layer`` (its own norm, q / k projections, deltas included,
    and RoPE) relative to uniform attention (each row's weights times the keys it sees), summed over heads and a
    strided sample of ``queries`` query rows and divided by the sampled rows that can see it (causal); 0 for padding
    and for keys no sampled row sees."""
    attn = layer.self_attn
    t = hidden.shape[1]
    with torch.no_grad():
        x = layer.input_layernorm(hidden)
        rows = torch.linspace(0, t - 1, min(queries, t), device=hidden.device).round().long().unique()
        hd = attn.head_dim
        q = attn.q_proj(x[:, rows]).view(x.shape[0], len(rows), -1, hd)
        k = attn.k_proj(x).view(x.shape[0], t, -1, hd)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()
        cos, sin = (e.float().expand(x.shape[0], -1, -1)[:, None] for e in kwargs["position_embeddings"])
        q = q * cos[:, :, rows] + _rotate_half(q) * sin[:, :, rows]
        k = k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = (q @ k.transpose(-1, -2)) * attn.scaling  # (batch, heads, rows, seq)
        visible = rows[:, None] >= torch.arange(t, device=hidden.device)[None, :]  # causal: key j <= query i
        allowed = visible[None, None]
        if padding is not None:
            allowed = allowed & ~padding[:, None, None, :]
        probs = logits.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        # relative to uniform attention: a row that sees n keys gives each 1/n when it attends evenly, so early keys,
        # which the short early rows must attend to, are not favoured for the causal count alone
        received = (probs * allowed.sum(-1, keepdim=True)).sum(dim=(1, 2))  # (batch, seq)
        seen_by = visible.sum(0).clamp(min=1) * q.shape[1]
        return received / seen_by


def segment_view(values: torch.Tensor, segment: int, fill: float = 0.0) -> torch.Tensor:
    """(batch, seq, ...) -> (batch, n_segments, segment, ...), the last segment padded with ``fill``."""
    t = values.shape[1]
    n = math.ceil(t / segment)
    pad = n * segment - t
    if pad:
        shape = (values.shape[0], pad, *values.shape[2:])
        values = torch.cat([values, values.new_full(shape, fill)], dim=1)
    return values.view(values.shape[0], n, segment, *values.shape[2:])


def segment_means(hidden: torch.Tensor, segment: int) -> torch.Tensor:
    """(batch, n_segments, hidden): each segment's mean hidden state (the last over its real tokens), layer-normed."""
    t = hidden.shape[1]
    sums = segment_view(hidden.detach().float(), segment).sum(2)
    sizes = segment_view(torch.ones(1, t, device=hidden.device), segment).sum(2)[..., None]
    means = sums / sizes
    return F.layer_norm(means, means.shape[-1:])


def predictor_target(scores: torch.Tensor, segment: int) -> torch.Tensor:
    """Standardised log segment scores (per row): what the predictors learn to output."""
    seg = segment_view(scores, segment).mean(2)
    y = torch.log(seg + 1e-9)
    return (y - y.mean(-1, keepdim=True)) / y.std(-1, keepdim=True).clamp(min=1e-6)


def make_predictor(width: int, seed: int) -> nn.Module:
    """A d → 64 → 1 MLP, initialised from its own generator (the global RNG, which dropout uses, is untouched)."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Linear(width, PREDICTOR_WIDTH), nn.GELU(), nn.Linear(PREDICTOR_WIDTH, 1))
    with torch.no_grad():
        for p in net.parameters():
            bound = 1 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 0.01
            p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=g))
    return net


def top_recall(predicted: torch.Tensor, true: torch.Tensor, k: int) -> float:
    """The share of the true top-``k`` segments (per row) that the predicted top-``k`` holds."""
    k = max(1, min(k, true.shape[-1]))
    p = predicted.topk(k, -1).indices
    t = true.topk(k, -1).indices
    hits = (p[:, :, None] == t[:, None, :]).any(-1).float().sum(-1)
    return float((hits / k).mean())


# ---------------------------------------------------------------- the eliminator


@dataclass
class _Batch:
    protected: torch.Tensor  # (batch, seq) bool: positions never eliminated
    padding: torch.Tensor | None  # (batch, seq) bool
    true: bool  # true scores on this forward


class Eliminator:
    """Token elimination installed on a Llama-style model's decoder layers (an instance ``forward`` on each
    non-exempt layer, outside transformers' gradient checkpointing, which then checkpoints the kept rows only)."""

    def __init__(self, model: nn.Module, settings: TokenEliminationSettings) -> None:
        base = getattr(model, "model", model) if hasattr(model, "deltas") else model  # a Tuned: its HF model
        config = getattr(base, "config", None)
        kind = getattr(config, "model_type", None)
        if kind not in SUPPORTED:
            raise DeltatuneError(f"train.token_elimination supports Llama-style decoders ({', '.join(SUPPORTED)}), "
                                 f"not {kind!r}: remove train.token_elimination")
        if getattr(config, "use_sliding_window", False) or getattr(config, "layer_types", None) and any(
                t != "full_attention" for t in config.layer_types):
            raise DeltatuneError("train.token_elimination needs full attention in every layer (this model has "
                                 "sliding-window layers): remove train.token_elimination")
        implementation = getattr(config, "_attn_implementation", None) or "eager"
        if implementation not in ATTENTION and not implementation.startswith("deltatune_"):
            raise DeltatuneError(f"train.token_elimination runs with attn_implementation sdpa or eager, not "
                                 f"{implementation!r}: load the model with attn_implementation='sdpa'")
        self.settings = settings
        self.layers = [b.module for b in architectures.blocks(base)]
        exempt = settings.exempt(len(self.layers))
        self.active_layers = [i for i in range(len(self.layers)) if i not in exempt]
        width = int(config.hidden_size)
        device = next(base.parameters()).device
        self.predictors = nn.ModuleDict({str(i): make_predictor(width, seed=i).to(device)
                                         for i in self.active_layers})
        self.optimizer = torch.optim.Adam(self.predictors.parameters(), lr=settings.predictor_lr)
        self.forwards = 0  # training forwards seen (decides the true-score forwards)
        self.current: _Batch | None = None
        self.kept: dict[int, torch.Tensor] = {}  # the last forward's kept token indices per layer (tests, stats)
        self.recall: dict[int, float] = {}  # the predictor's top-k recall at its last true-score forward, per layer
        for i in self.active_layers:
            self.layers[i].forward = self._wrapped(i, self.layers[i])

    def remove(self) -> None:
        """Take the wrappers off: the layers run their own forward again."""
        for i in self.active_layers:
            self.layers[i].__dict__.pop("forward", None)

    def _wrapped(self, index: int, layer: nn.Module) -> Callable[..., Any]:
        original = type(layer).forward.__get__(layer)  # transformers' (checkpointing) forward of the class

        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            keep = None
            if (self.current is not None and layer.training and not args and not kwargs.get("use_cache")
                    and kwargs.get("past_key_values") is None and kwargs.get("position_embeddings") is not None):
                keep = self.choose(index, layer, hidden_states, kwargs)
            if keep is None:
                return original(hidden_states, *args, **kwargs)
            return run_on_kept(original, hidden_states, keep, kwargs)

        return forward

    @contextlib.contextmanager
    def batch(self, batch: dict[str, torch.Tensor]) -> Iterator[None]:
        """The model's forwards inside this context are a training forward of ``batch`` (its ``labels`` say what
        must stay); outside it, and in eval mode, every layer runs dense."""
        labels = batch.get("labels")
        if labels is None:
            raise DeltatuneError("train.token_elimination keeps the labelled positions, but this batch has no "
                                 "labels; use a chat or edit task, or remove train.token_elimination")
        labelled = labels != IGNORE_INDEX
        # a position whose output predicts a label, and the labelled position itself
        protected = labelled | F.pad(labelled[:, 1:], (0, 1), value=False)
        mask = batch.get("attention_mask")
        padding = (mask == 0) if mask is not None else None
        self.current = _Batch(protected, padding, self.forwards % self.settings.predictor_every == 0)
        try:
            yield
        finally:
            self.current = None
            self.forwards += 1

    def choose(self, index: int, layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]
               ) -> torch.Tensor | None:
        """The kept token indices (batch, n) of this layer's forward, None: all kept."""
        cur = self.current
        assert cur is not None
        b, t = hidden.shape[:2]
        g = self.settings.segment
        protected, padding = cur.protected, cur.padding
        if protected.shape[1] != t:  # virtual tokens prepended (prompt tuning): kept
            if protected.shape[1] > t:
                return None
            extra = t - protected.shape[1]
            protected = F.pad(protected, (extra, 0), value=True)
            padding = F.pad(padding, (extra, 0), value=False) if padding is not None else None
        n_seg = math.ceil(t / g)
        fixed = segment_view(protected, g, fill=False).any(2)
        fixed[:, 0] = True
        fixed[:, -1] = True
        eliminable = int((~fixed).sum(1).min())
        n_drop = min(round(self.settings.sparsity * n_seg), eliminable)
        if n_drop <= 0:
            self.kept[index] = torch.arange(t, device=hidden.device).expand(b, t)
            return None
        means = segment_means(hidden, g)
        predictor = self.predictors[str(index)]
        with torch.autocast(hidden.device.type, enabled=False):
            if cur.true:
                scores = predictor_target(true_scores(layer, hidden, kwargs, padding), g)
                self._learn(index, predictor, means, scores, n_seg - n_drop)
            else:
                with torch.no_grad():
                    scores = predictor(means)[..., 0]
        scores = scores.masked_fill(fixed, float("inf"))
        dropped = scores.topk(n_drop, dim=1, largest=False).indices
        keep_seg = torch.ones(b, n_seg, dtype=torch.bool, device=hidden.device)
        keep_seg[torch.arange(b, device=hidden.device)[:, None], dropped] = False
        keep_tok = keep_seg[:, :, None].expand(b, n_seg, g).reshape(b, n_seg * g)[:, :t]
        keep = keep_tok.nonzero()[:, 1].view(b, -1)
        self.kept[index] = keep
        return keep

    def _learn(self, index: int, predictor: nn.Module, means: torch.Tensor, target: torch.Tensor, k: int) -> None:
        """Online predictor training: a few Adam steps towards this batch's standardised log true scores."""
        with torch.no_grad():
            self.recall[index] = top_recall(predictor(means)[..., 0], target, k)
        params = list(predictor.parameters())
        with torch.enable_grad():
            for _ in range(PREDICTOR_ITERS):
                loss = F.mse_loss(predictor(means)[..., 0], target)
                grads = torch.autograd.grad(loss, params)
                for p, gr in zip(params, grads, strict=True):
                    p.grad = gr
                self.optimizer.step()
                for p in params:
                    p.grad = None

    def train_predictors(self, means: torch.Tensor, target: torch.Tensor, index: int, k: int) -> None:
        """One online update of layer ``index``'s predictor (what a true-score forward does)."""
        self._learn(index, self.predictors[str(index)], means, target, k)

    # -- checkpoint state
    def state_dict(self) -> dict[str, Any]:
        return {"forwards": self.forwards, "predictors": dict(self.predictors.state_dict()),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state is None:
            raise DeltatuneError("--resume: the checkpoint was written without train.token_elimination; resume "
                                 "with the config that wrote it")
        self.forwards = int(state["forwards"])
        self.predictors.load_state_dict(state["predictors"])
        self.optimizer.load_state_dict(state["optimizer"])


class Off:
    """``train.token_elimination`` null: dense forwards, nothing in the checkpoint."""

    def batch(self, batch: dict[str, torch.Tensor]) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: Any) -> None:
        return None


def install(model: nn.Module, settings: TokenEliminationSettings | None, task: Any = None, data: Any = None
            ) -> Eliminator | Off:
    """Token elimination on ``model`` (a ``Tuned`` or a transformers model) as ``settings`` say (None: ``Off``),
    refused in one line for a task or data setting it cannot serve."""
    if settings is None:
        return Off()
    if isinstance(settings, dict):  # a TrainSettings built in Python from a mapping
        settings = TokenEliminationSettings(**settings)
    kind = getattr(task, "kind", None)
    if task is not None and kind not in TASKS:
        why = ("labels every token, and labelled positions are never eliminated" if kind == "text"
               else "has no labelled span to keep")
        raise DeltatuneError(f"train.token_elimination drops unlabelled context, but task {kind!r} {why}: use a "
                             "chat (prompt/completion) or edit task, or remove train.token_elimination")
    if data is not None and getattr(data, "packing", False):
        raise DeltatuneError("train.token_elimination does not support packed rows (document masks): set "
                             "data.packing: false or remove train.token_elimination")
    return Eliminator(model, settings)
