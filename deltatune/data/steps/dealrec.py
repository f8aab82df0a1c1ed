"""DEALRec (Lin et al., SIGIR 2024): prune a pool to a small subset by influence on empirical risk and effort.

The paper chooses a 1-2% few-shot subset for an LLM recommender. Here the algorithm is generalised from
recommendation to any labelled or text pool:

1. **Surrogate.** The paper trains a small recommender (SASRec) on all n samples. Here the surrogate is a
   softmax-regression head on frozen sentence embeddings (default the shipped ``minilm-l6``, mean-pooled and L2
   normalised, ``_embed.embed_texts``), trained on all n rows with Adam (lr 1e-3, batch 500: the paper's surrogate
   optimiser) for ``epochs`` epochs from a zero init. A classification pool predicts its labels (one-hot targets).
   A text pool has no labels, so its surrogate models the text itself: it predicts each row's bag of words (the
   row's counts over the pool's ``vocab`` most frequent lowercased words, normalised to sum 1) from the row's
   embedding; a row without any of those words has a zero target and so a zero gradient and influence.
   *Why a linear head, not one hidden layer:* the loss is then convex in the weight, so the Hessian is positive
   semi-definite (LiSSA's condition), and with unit-norm embeddings every single-row Hessian has norm at most
   1/2, far inside LiSSA's bound (2 − damp)·scale, so the paper's recursion provably converges; the weight the
   paper restricts influence to (one layer) is here the whole model's weight, so nothing is lost to that
   restriction; and it trains on the 38k tweets in about 40 s on two busy cores.
2. **Influence** I(z) = ⟨H⁻¹v, ∇L(z)⟩ w.r.t. the head's weight matrix (C × d; the bias stays out, as the paper
   takes one weight matrix), v = the mean training gradient, H⁻¹v by LiSSA exactly as the official code:
   h₀ = v, h ← v + (1 − damp)·h − (H_z h)/scale with damp 0.01, scale 25 over ``lissa_steps`` (5000) HVPs of one
   random row each (autograd double-backward), so h → scale·(H + damp·scale·I)⁻¹v = 25·(H + 0.25·I)⁻¹v. The
   per-row gradients of a softmax head have a closed form, (p·Σq − q) φᵀ, so every I(z) is one vectorised
   contraction. ``info["lissa_residual"]`` is ‖(damp·I + H/scale)h − v‖ / ‖v‖ with the exact full-pool H (on the
   whole tweets set, 0.016: one-row HVPs make h fluctuate by a few percent around the fixed point). Measured: on
   unit-norm embeddings the head's Hessian eigenvalues stay near or below 0.1, small next to the paper's effective
   damping damp·scale = 0.25, so H⁻¹v stays close to 100·v and the Hessian moves the min-max scores by a few
   percent of their range; ``lissa_damp`` / ``lissa_scale`` change that balance.
3. **Effort** E(z) = ‖∂L_LLM(z)/∂B‖₂, B the LoRA B of the target model's last v_proj (r = 8, α = 16, B = 0,
   A kaiming-uniform(a = √5) from the seed, as LoRA initialises it), in one no-update pass. The data layer may
   not attach a LoRA (that is ``deltatune.methods``), and need not: LoRA adds s·B A x to v_proj's output y,
   s = α/r, so ∂L/∂B = s·Σ_t (∂L/∂y_t)(A x_t)ᵀ = s·(Σ_t ∂L/∂y_t x_tᵀ) Aᵀ = s·(∂L/∂W_v)·Aᵀ, where W_v is v_proj's
   weight: it holds at B = 0 because there the LoRA branch does not change y, so ∂L/∂y is the base model's.
   ∂L/∂W_v is formed per row from v_proj's input and output gradient (hooks), so rows run in padded batches
   (right padding: a causal model's real tokens never see the pads) while each row's gradient is its own, as
   with the paper's batch 1. L is the causal-LM loss (mean over the predicted tokens, EOS appended as the paper
   does) of the row's text; for a classification pool, the text, a newline and the label's name. No dropout
   (eval mode): the paper's LoRA dropout on the A branch would only add noise to a one-pass score. Cost: one
   forward pass of the target model per row (smollm2-135m on two quiet CPU cores: 0.07 s per tweet, 23 minutes
   for the demo's pool of 20,837 tweets; 0.4 s on busy ones): on a large pool run it where CUDA is (``device:
   auto``) or set ``effort: false``. Each row's effort is cached by its tokens, the weights and A
   (``cached_effort_scores``), so another budget or λ over the same pool and seed does not pay the pass again.
4. **Score** = minmax(I) + λ·minmax(E). λ = 0.3 by default (the paper: 0.3 on Games, 1.0 on Book and
   MicroLens): in this generalisation the influence is the term that sees the labels, while the effort is
   dominated by the text's own tokens (the label is one or two tokens of the LM loss), so the smaller weight keeps
   the task-aware term in charge; ``lam: 1.0`` gives the other setting. ``effort: false`` skips the LLM pass
   (λ = 0).
5. **Coverage-enhanced sampling** as the official ``prune.py``: sort by score descending, drop the top
   ``hard_prune`` (⌊0.1·n⌋), split the remaining score range into ``strata`` (50) equal-width strata (a row goes to
   the first stratum whose upper edge it does not exceed), then repeatedly take the smallest non-empty stratum and
   draw min(|stratum|, ⌊m / #non-empty strata left⌋) of its rows uniformly (``random.Random`` from the seed),
   m ← m − drawn. This returns exactly m rows whenever m ≤ the rows left after the hard prune, and every
   non-empty stratum gives at least one when m ≥ their number.

Choices the spec leaves open: the budget is a share of the whole pool (the paper's "2%") or a count; the chosen
rows are returned in descending score order; a constant score vector min-max normalises to zeros; the random
streams (surrogate shuffling, LiSSA's rows, LoRA's A, the sampling) are derived from the one seed.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from deltatune.data.steps._base import Outcome, Pool, Progress, budget_count, no_progress
from deltatune.data.steps._embed import VectorStore, cache_enabled, sha256_rows, weights_hash
from deltatune.errors import DeltatuneError

WHERE = "dealrec"


@dataclass
class Options:
    budget: float | int = 0.02  # rows kept: a share of the pool (0 < b < 1) or a count (the paper: 2%)
    lam: float = 0.3  # λ in minmax(influence) + λ·minmax(effort) (the paper: 0.3 Games, 1.0 Book / MicroLens)
    effort: bool = True  # score the target model's effort; false skips the LLM pass (λ = 0, influence only)
    model: str = "smollm2-135m"  # the target model of the effort: a shipped name or a save_pretrained folder
    hard_prune: float = 0.1  # share of the highest-scoring rows dropped before sampling (the paper: 10%)
    strata: int = 50  # k: equal-width score strata the sampling covers (the paper: 50)
    encoder: str = "minilm-l6"  # sentence encoder whose frozen embeddings the surrogate head reads
    epochs: int = 200  # surrogate head's training epochs over all rows (the paper: at most 200)
    surrogate_batch: int = 500  # rows per surrogate Adam step (the paper: 500)
    surrogate_lr: float = 1e-3  # surrogate Adam learning rate (the paper: 1e-3)
    vocab: int = 512  # text pools: the surrogate predicts each row's bag of the pool's most frequent words
    lissa_steps: int = 5000  # LiSSA recursion steps, one sampled HVP each (the paper: 5000)
    lissa_batch: int = 1  # rows per sampled HVP (the paper: 1)
    lissa_damp: float = 0.01  # LiSSA damping: the estimate is scale·(H + damp·scale·I)⁻¹v (the paper: 0.01)
    lissa_scale: float = 25.0  # LiSSA scale; must exceed ‖H_z‖ / (2 − damp) (the paper: 25)
    lora_r: int = 8  # rank of the LoRA whose B the effort differentiates (the paper: 8)
    lora_alpha: float = 16.0  # LoRA alpha; scale s = alpha / r (the paper: 16)
    max_length: int = 256  # tokens per row in the effort pass, EOS included (longer rows are truncated)
    effort_batch: int = 8  # rows per effort forward pass (padded; each row still gets its own gradient)
    device: str = "auto"  # where a loaded effort model runs: auto (CUDA when available), cpu, cuda


# A per-row effort given by the caller: the texts the LLM would read -> one effort per row
EffortFn = Callable[[list[str]], Sequence[float] | torch.Tensor]


def run(pool: Pool, options: Options, *, seed: int, progress: Progress = no_progress,
        embed: Callable[[list[str]], torch.Tensor] | None = None,
        effort_model: tuple[nn.Module, Any] | EffortFn | None = None,
        label_names: Sequence[str] | None = None, **context: Any) -> Outcome:
    """Score every row of ``pool`` and keep a coverage-enhanced sample of ``options.budget`` rows.

    ``embed``: texts -> (n, d) embeddings for the surrogate (default: ``options.encoder`` through ``embed_texts``).
    ``effort_model``: a (causal LM, tokenizer) pair, or a callable giving each row's effort from the texts the LLM
    reads (default: ``options.model`` loaded here). ``label_names``: names of integer labels (the effort's text
    ends with the label's name); without it a label is written as it is. Other context keywords are ignored."""
    timings: dict[str, float] = {}
    n = len(pool.rows)
    m = check(options, n)
    texts = _texts(pool)
    targets, surrogate = surrogate_targets(pool, texts, options.vocab)

    with _timed(timings, "embed"):
        feats = _embeddings(texts, options, embed, progress)
    with _timed(timings, "surrogate"):
        weight, bias, fit = train_surrogate(feats, targets, options, _generator(seed, 0), progress)
    with _timed(timings, "lissa"):
        v = mean_gradient(feats, targets, weight, bias)
        _check_lissa_bound(feats, targets, options)
        h = lissa(hvp_rows(feats, targets, weight, bias), v, n, steps=options.lissa_steps,
                  batch=options.lissa_batch, damp=options.lissa_damp, scale=options.lissa_scale,
                  generator=_generator(seed, 1), progress=progress)
        residual = lissa_residual(hvp_rows(feats, targets, weight, bias), h, v, n, options.lissa_damp,
                                  options.lissa_scale)
    with _timed(timings, "influence"):
        infl = influence(feats, targets, weight, bias, h)

    lam = options.lam if options.effort else 0.0
    effort = None
    if options.effort:
        with _timed(timings, "effort"):
            effort = _effort(pool, texts, options, effort_model, label_names, seed, progress)
    score = minmax(infl) + (lam * minmax(effort) if effort is not None else 0.0)

    with _timed(timings, "sampling"):
        chosen, strata = coverage_sample(score, m, options.hard_prune, options.strata,
                                         random.Random(_stream(seed, 3)))
    chosen.sort(key=lambda i: (-float(score[i]), i))
    info = {
        "lambda": lam, "budget_rows": m, "surrogate": surrogate, **fit,
        "lissa_residual": residual, "influence": _summary(infl),
        "effort": _summary(effort) if effort is not None else None,
        "effort_model": _effort_name(options, effort_model) if options.effort else None,
        **strata, "seconds": {k: round(v, 3) for k, v in timings.items()},
    }
    return Outcome([pool.rows[i] for i in chosen], chosen, [float(score[i]) for i in chosen], info)


# ---------------------------------------------------------------- checks and small helpers


def check(options: Options, n: int) -> int:
    """The budget's row count m, after checking every option; a clear error for each bad value."""
    m = budget_count(options.budget, n, WHERE)
    positive = {"strata": options.strata, "epochs": options.epochs, "surrogate_batch": options.surrogate_batch,
                "lissa_steps": options.lissa_steps, "lissa_batch": options.lissa_batch, "lora_r": options.lora_r,
                "effort_batch": options.effort_batch, "vocab": options.vocab, "max_length": options.max_length}
    for name, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DeltatuneError(f"{WHERE}.{name}={value!r} must be a whole number ≥ 1")
    if options.max_length < 2:
        raise DeltatuneError(f"{WHERE}.max_length={options.max_length} must be at least 2 (a causal-LM loss needs "
                             "a token to predict)")
    if not 0.0 <= options.hard_prune < 1.0:
        raise DeltatuneError(f"{WHERE}.hard_prune={options.hard_prune!r} must be a share in [0, 1)")
    if not 0.0 <= options.lissa_damp < 1.0 or options.lissa_scale <= 0:
        raise DeltatuneError(f"{WHERE}: lissa_damp={options.lissa_damp} must be in [0, 1) and "
                             f"lissa_scale={options.lissa_scale} positive")
    for name in ("lam", "surrogate_lr", "lora_alpha"):
        value = getattr(options, name)
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise DeltatuneError(f"{WHERE}.{name}={value!r} must be a finite number ≥ 0")
    if options.device not in ("auto", "cpu", "cuda") and not str(options.device).startswith("cuda:"):
        raise DeltatuneError(f"{WHERE}.device={options.device!r} must be auto, cpu or cuda")
    kept = n - math.floor(options.hard_prune * n)
    if m > kept:
        raise DeltatuneError(
            f"{WHERE}.budget={options.budget!r} keeps {m} rows, but only {kept} of the pool's {n} remain after "
            f"hard_prune={options.hard_prune} drops the highest-scoring ones; give a budget of at most {kept} rows "
            "or a smaller hard_prune"
        )
    return m


def _texts(pool: Pool) -> list[str]:
    if pool.task not in ("classification", "text"):
        raise DeltatuneError(
            f"{WHERE} scores classification and text pools; {pool.source} is a {pool.task!r} pool. Give it a "
            "data source with task classification or text"
        )
    missing = next((i for i, r in enumerate(pool.rows) if pool.text_field not in r), None)
    if missing is not None:
        raise DeltatuneError(f"{WHERE}: row {missing} of {pool.source} has no {pool.text_field!r} field; "
                             "every row needs its text there")
    return pool.texts()


def _stream(seed: int, what: int) -> int:
    """An independent 63-bit seed for each random stream of the step (0 surrogate, 1 LiSSA, 2 LoRA A, 3 sampling),
    so changing how many draws one phase makes never shifts another's."""
    return int(np.random.SeedSequence([seed % 2**63, what]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def _generator(seed: int, what: int) -> torch.Generator:
    return torch.Generator().manual_seed(_stream(seed, what))


@contextlib.contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[phase] = time.perf_counter() - start


def minmax(x: torch.Tensor) -> torch.Tensor:
    """(x − min) / (max − min); zeros when x is constant (nothing to tell the rows apart)."""
    x = x.double()
    span = x.max() - x.min()
    return torch.zeros_like(x) if span <= 0 else (x - x.min()) / span


def _summary(x: torch.Tensor) -> dict[str, float]:
    x = x.double()
    return {"min": float(x.min()), "max": float(x.max()), "mean": float(x.mean()),
            "std": float(x.std()) if len(x) > 1 else 0.0}


# ---------------------------------------------------------------- the surrogate: softmax regression on embeddings


def surrogate_targets(pool: Pool, texts: list[str], vocab: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """(n, C) targets q of the surrogate and a description: one-hot labels for a classification pool, else each
    row's normalised bag of the pool's ``vocab`` most frequent words."""
    if pool.task == "classification" and pool.label_field is not None:
        labels = pool.labels() or []
        missing = next((i for i, y in enumerate(labels) if y is None), None)
        if missing is not None:
            raise DeltatuneError(f"{WHERE}: row {missing} of {pool.source} has no {pool.label_field!r}; give every "
                                 "row a label, or use the pool as task text")
        classes = {y: c for c, y in enumerate(dict.fromkeys(labels))}  # first-appearance order (zero init: any)
        q = torch.zeros(len(labels), len(classes))
        q[torch.arange(len(labels)), torch.tensor([classes[y] for y in labels])] = 1.0
        return q, {"kind": "classifier", "classes": len(classes)}
    return word_targets(texts, vocab)


_WORD = re.compile(r"\w+")


def word_targets(texts: list[str], vocab: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """Each text's counts of the pool's ``vocab`` most frequent lowercased words (ties by the word), normalised to
    sum 1 (a row with none of them stays zero)."""
    bags = [Counter(_WORD.findall(t.lower())) for t in texts]
    total: Counter[str] = Counter()
    for bag in bags:
        total.update(bag)
    words = [w for w, _ in sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:vocab]]
    if not words:
        raise DeltatuneError(f"{WHERE}: the pool's texts have no words; a text pool needs text to model")
    index = {w: j for j, w in enumerate(words)}
    q = torch.zeros(len(texts), len(words))
    for i, bag in enumerate(bags):
        for w, c in bag.items():
            if w in index:
                q[i, index[w]] = float(c)
    q = q / q.sum(1, keepdim=True).clamp(min=1.0e-12)
    return q, {"kind": "word-bag", "words": len(words), "rows_without_words": int((q.sum(1) == 0).sum())}


def _embeddings(texts: list[str], options: Options, embed: Callable[[list[str]], torch.Tensor] | None,
                progress: Progress) -> torch.Tensor:
    if embed is None:
        from deltatune.data.steps._embed import embed_texts

        feats = embed_texts(texts, options.encoder, progress=progress)
    else:
        feats = torch.as_tensor(embed(texts))
    feats = feats.detach().float().cpu()
    if feats.ndim != 2 or feats.shape[0] != len(texts):
        raise DeltatuneError(f"{WHERE}: the embeddings have shape {tuple(feats.shape)}, expected ({len(texts)}, d)")
    if not torch.isfinite(feats).all():
        raise DeltatuneError(f"{WHERE}: the encoder gave non-finite embeddings; check the encoder {options.encoder}")
    return feats


def soft_cross_entropy(logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-row −Σ_c q_c log softmax(logits)_c (one-hot q: the usual cross-entropy)."""
    return -(q * torch.log_softmax(logits, dim=-1)).sum(-1)


def train_surrogate(feats: torch.Tensor, q: torch.Tensor, options: Options, generator: torch.Generator,
                    progress: Progress = no_progress) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The head (weight (C, d), bias (C,)) fitted on every row with Adam from zeros; and its final fit."""
    n, d = feats.shape
    weight = torch.zeros(q.shape[1], d, requires_grad=True)
    bias = torch.zeros(q.shape[1], requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=options.surrogate_lr)
    for epoch in range(options.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, options.surrogate_batch):
            idx = order[start:start + options.surrogate_batch]
            loss = soft_cross_entropy(feats[idx] @ weight.T + bias, q[idx]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        progress("surrogate", epoch + 1, options.epochs)
    weight, bias = weight.detach(), bias.detach()
    with torch.no_grad():
        logits = feats @ weight.T + bias
        fit: dict[str, Any] = {"surrogate_loss": float(soft_cross_entropy(logits, q).mean())}
        if q.shape[1] > 1 and bool((q.sum(1) > 0).all()):
            fit["surrogate_accuracy"] = float((logits.argmax(1) == q.argmax(1)).float().mean())
    return weight, bias, fit


def _coefficients(feats: torch.Tensor, q: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """∂L_z/∂logits = p·Σq − q per row (n, C): a row's weight gradient is this times its embedding."""
    p = torch.softmax(feats @ weight.T + bias, dim=-1)
    return p * q.sum(1, keepdim=True) - q


def per_sample_grads(feats: torch.Tensor, q: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
                     ) -> torch.Tensor:
    """(n, C, d): each row's ∇_W L_z = (p·Σq − q) φᵀ in closed form (materialised: for small pools and tests)."""
    return torch.einsum("nc,nd->ncd", _coefficients(feats, q, weight, bias), feats)


def mean_gradient(feats: torch.Tensor, q: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  chunk: int = 8192) -> torch.Tensor:
    """v = (1/n) Σ_z ∇_W L_z, chunked so no (n, C, d) tensor exists."""
    v = torch.zeros_like(weight, dtype=torch.float64)
    for start in range(0, len(feats), chunk):
        f, t = feats[start:start + chunk], q[start:start + chunk]
        v += (_coefficients(f, t, weight, bias).T @ f).double()
    return (v / len(feats)).to(weight.dtype)


def influence(feats: torch.Tensor, q: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, h: torch.Tensor,
              chunk: int = 8192) -> torch.Tensor:
    """I(z) = ⟨h, ∇_W L_z⟩ = Σ_c (p·Σq − q)_c (h φ_z)_c for every row, chunked."""
    out = torch.empty(len(feats))
    for start in range(0, len(feats), chunk):
        f, t = feats[start:start + chunk], q[start:start + chunk]
        out[start:start + chunk] = (_coefficients(f, t, weight, bias) * (f @ h.T)).sum(1)
    return out


HVP = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (row indices, h) -> H_rows h


def hvp_rows(feats: torch.Tensor, q: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> HVP:
    """H_S h for the mean loss over rows S, by autograd double-backward w.r.t. the head's weight."""

    def hvp(idx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        w = weight.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = soft_cross_entropy(feats[idx] @ w.T + bias, q[idx]).mean()
            (grad,) = torch.autograd.grad(loss, w, create_graph=True)
            (hv,) = torch.autograd.grad((grad * h).sum(), w)
        return hv

    return hvp


def _check_lissa_bound(feats: torch.Tensor, q: torch.Tensor, options: Options) -> None:
    """LiSSA diverges unless every sampled ‖H_z‖ < (2 − damp)·scale. A softmax head's row Hessian is
    (Σq)·(diag p − p pᵀ) ⊗ φφᵀ with ‖diag p − p pᵀ‖ ≤ 1/2, so ‖H_z‖ ≤ Σq·‖φ‖²/2: checked before any step."""
    bound = float((q.sum(1) * feats.pow(2).sum(1)).max()) / 2
    if bound >= (2 - options.lissa_damp) * options.lissa_scale:
        raise DeltatuneError(
            f"{WHERE}: the embeddings are too large for LiSSA (a row's Hessian norm can reach {bound:.3g}, the "
            f"recursion needs it below (2 − lissa_damp)·lissa_scale = "
            f"{(2 - options.lissa_damp) * options.lissa_scale:.3g}); L2-normalise the embeddings or raise lissa_scale"
        )


def lissa(hvp: HVP, v: torch.Tensor, n: int, *, steps: int, batch: int = 1, damp: float = 0.01,
          scale: float = 25.0, generator: torch.Generator, progress: Progress = no_progress) -> torch.Tensor:
    """LiSSA's estimate of scale·(H + damp·scale·I)⁻¹v (H the mean Hessian over n rows): h₀ = v and
    h ← v + (1 − damp)·h − H_S h / scale, S = ``batch`` rows drawn uniformly (with replacement) at each step."""
    h = v.clone()
    every = max(1, steps // 100)
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=generator)
        h = v + (1 - damp) * h - hvp(idx, h) / scale
        if (step + 1) % every == 0 or step + 1 == steps:
            if not torch.isfinite(h).all():
                raise DeltatuneError(f"{WHERE}: LiSSA diverged at step {step + 1}; raise lissa_scale (it must exceed "
                                     "every row Hessian's norm / (2 − lissa_damp))")
            progress("lissa", step + 1, steps)
    return h


def lissa_residual(hvp: HVP, h: torch.Tensor, v: torch.Tensor, n: int, damp: float, scale: float,
                   chunk: int = 8192) -> float:
    """‖(damp·I + H/scale)·h − v‖ / ‖v‖ with the exact mean Hessian (0 at LiSSA's fixed point)."""
    hh = torch.zeros_like(h, dtype=torch.float64)
    for start in range(0, n, chunk):
        idx = torch.arange(start, min(n, start + chunk))
        hh += hvp(idx, h).double() * len(idx)
    resid = damp * h.double() + hh / n / scale - v.double()
    norm = float(v.double().norm())
    return float(resid.norm()) / norm if norm > 0 else float(resid.norm())


# ---------------------------------------------------------------- effort: the target model's LoRA-B gradient norm


def effort_texts(pool: Pool, texts: list[str], label_names: Sequence[str] | None = None) -> list[str]:
    """What the target LLM reads per row: the text; for a classification pool, the text, a newline and the
    label's name (an integer label indexes ``label_names`` when given)."""
    if pool.task != "classification" or pool.label_field is None:
        return list(texts)
    names = list(label_names) if label_names is not None else None

    def name(y: Any) -> str:
        if names is not None and isinstance(y, int) and not isinstance(y, bool) and 0 <= y < len(names):
            return names[y]
        return str(y)

    return [f"{t}\n{name(y)}" for t, y in zip(texts, pool.labels() or [], strict=True)]


def last_v_proj(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last ``v_proj`` linear layer in module order (the last block's value projection)."""
    found = [(name, mod) for name, mod in model.named_modules()
             if name.rsplit(".", 1)[-1] == "v_proj" and isinstance(mod, nn.Linear)]
    if not found:
        raise DeltatuneError(f"{WHERE}: the effort model ({type(model).__name__}) has no v_proj linear layer; use a "
                             "Llama-style causal LM (model: smollm2-135m) or set effort: false")
    return found[-1]


def lora_a(in_features: int, r: int, generator: torch.Generator) -> torch.Tensor:
    """A (r, in) as LoRA initialises it: kaiming-uniform with a = √5, i.e. U(−1/√in, 1/√in)."""
    a = torch.empty(r, in_features)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a


@contextlib.contextmanager
def _no_update_pass(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients for the pass (only v_proj's output is differentiated); the model's
    own mode and ``requires_grad`` flags are put back afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def row_losses(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's causal-LM loss: mean cross-entropy of its real next tokens (0 for a row with none)."""
    target_mask = mask[:, 1:].to(torch.float32)
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    return (ce * target_mask).sum(1) / target_mask.sum(1).clamp(min=1.0)


def v_proj_weight_grads(model: nn.Module, v_proj: nn.Module, ids: torch.Tensor, mask: torch.Tensor
                        ) -> torch.Tensor:
    """(b, out, in): ∂L_i/∂W_v for each row i of a padded batch, where L_i is row i's own causal-LM loss.

    v_proj's output y is cut from the graph and made a leaf, so backward runs only from the loss down to the
    last block's value projection; ∂L_i/∂W_v = Σ_t (∂L_i/∂y_{i,t}) x_{i,t}ᵀ. The rows do not interact (a causal
    model with right padding), so the gradient of Σ_i L_i w.r.t. row i's y is row i's own."""
    captured: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        captured["x"] = inputs[0].detach()
        captured["y"] = output.detach().requires_grad_(True)
        return captured["y"]

    handle = v_proj.register_forward_hook(hook)
    try:
        with _no_update_pass(model), torch.enable_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
            losses = row_losses(logits, ids, mask)
            (grad_y,) = torch.autograd.grad(losses.sum(), captured["y"])
    finally:
        handle.remove()
    return torch.einsum("bto,bti->boi", grad_y.float(), captured["x"].float())


def lora_b_grads(weight_grads: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
    """∂L/∂B at B = 0 from ∂L/∂W_v: s·(∂L/∂W_v)·Aᵀ, (…, out, in) -> (…, out, r)."""
    return scale * weight_grads @ a.to(weight_grads).T


def _tokenize(tokenizer: Any, text: str, max_length: int) -> list[int]:
    """The row's tokens, truncated, with EOS appended when it fits and is not there (as the paper's tokenize)."""
    ids = list(tokenizer(text, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and len(ids) < max_length and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids


def effort_scores(model: nn.Module, tokenizer: Any, texts: list[str], *, r: int = 8, alpha: float = 16.0,
                  max_length: int = 256, batch: int = 8, generator: torch.Generator,
                  progress: Progress = no_progress) -> tuple[torch.Tensor, dict[str, Any]]:
    """E(z) = ‖∂L_z/∂B‖₂ for every text (B the zero-initialised LoRA B of the last v_proj), and what was used."""
    name, v_proj = last_v_proj(model)
    a = lora_a(v_proj.in_features, r, generator)
    scale = alpha / r
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [_tokenize(tokenizer, t, max_length) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: (len(encoded[i]), i))  # similar lengths share a batch
    out = torch.zeros(len(texts))
    for start in range(0, len(order), batch):
        rows = order[start:start + batch]
        width = max(1, max(len(encoded[i]) for i in rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, i in enumerate(rows):
            ids[k, :len(encoded[i])] = torch.tensor(encoded[i], dtype=torch.long)
            mask[k, :len(encoded[i])] = 1
        grads = v_proj_weight_grads(model, v_proj, ids.to(device), mask.to(device))
        out[rows] = lora_b_grads(grads, a.to(device), scale).flatten(1).norm(dim=1).cpu()
        progress("effort", min(start + batch, len(order)), len(order))
    return out, {"layer": name, "lora_r": r, "lora_alpha": alpha}


def _token_hashes(encoded: list[list[int]]) -> torch.Tensor:
    """(n, 32) uint8: the sha256 of each row's token ids (int64, little-endian)."""
    return sha256_rows([np.asarray(ids, dtype="<i8").tobytes() for ids in encoded])


def cached_effort_scores(model: nn.Module, tokenizer: Any, texts: list[str], *, r: int, alpha: float,
                         max_length: int, batch: int, generator: torch.Generator,
                         progress: Progress = no_progress) -> torch.Tensor:
    """``effort_scores`` with a per-row cache, so that the pass over a pool is paid once for every budget.

    A row's effort is decided by the model's weights, LoRA's A and α and the row's tokens: the cache file is named
    by a hash of the weights and of A (drawn here from a copy of ``generator``, as ``effort_scores`` draws it), its
    keys are the sha256 of each row's token ids (truncation and EOS included, so the tokenizer and ``max_length``
    are in the key). Rows computed before come from the file; the others run in batches as always and are added.
    Off with ``DELTATUNE_EMBED_CACHE=0``. Values computed on another device or batch composition agree with a
    fresh pass up to float rounding (batched and batch-one efforts agree to 1e-4 relative)."""
    if not cache_enabled() or not texts:
        return effort_scores(model, tokenizer, texts, r=r, alpha=alpha, max_length=max_length, batch=batch,
                             generator=generator, progress=progress)[0]
    from deltatune.data.steps._manifest import cache_root

    a = lora_a(last_v_proj(model)[1].in_features, r, torch.Generator().set_state(generator.get_state()))
    a_hash = hashlib.sha256(a.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:12]
    store = VectorStore(cache_root() / "effort" / f"{weights_hash(model)}-A{a_hash}-alpha{alpha:g}.safetensors")
    hashes = _token_hashes([_tokenize(tokenizer, t, max_length) for t in texts])
    found = store.lookup(hashes)
    todo = [i for i, j in enumerate(found) if j is None]
    out = torch.zeros(len(texts))
    have = [i for i, j in enumerate(found) if j is not None]
    if have:
        out[have] = store.vectors[[found[i] for i in have], 0]  # type: ignore[index]
    if todo:
        new, _ = effort_scores(model, tokenizer, [texts[i] for i in todo], r=r, alpha=alpha, max_length=max_length,
                               batch=batch, generator=generator, progress=progress)
        out[todo] = new
        first: dict[bytes, int] = {}  # one entry per distinct new token sequence
        for k, i in enumerate(todo):
            first.setdefault(bytes(hashes[i].tolist()), k)
        picked = sorted(first.values())
        store.add(hashes[[todo[k] for k in picked]], new[picked, None].float())
        store.save()
    return out


def _device(option: str) -> torch.device:
    if option == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if option.startswith("cuda") and not torch.cuda.is_available():
        raise DeltatuneError(f"{WHERE}.device={option!r} but no CUDA device is available; use auto or cpu")
    return torch.device(option)


def _effort(pool: Pool, texts: list[str], options: Options, effort_model: Any, label_names: Sequence[str] | None,
            seed: int, progress: Progress) -> torch.Tensor:
    llm_texts = effort_texts(pool, texts, label_names)
    if callable(effort_model) and not isinstance(effort_model, nn.Module):
        values = torch.as_tensor(effort_model(llm_texts), dtype=torch.float64).flatten()
        if values.shape[0] != len(texts) or not torch.isfinite(values).all():
            raise DeltatuneError(f"{WHERE}: the effort callable must give one finite number per row "
                                 f"({len(texts)}), got shape {tuple(values.shape)}")
        return values
    if effort_model is not None:
        if not (isinstance(effort_model, tuple | list) and len(effort_model) == 2
                and isinstance(effort_model[0], nn.Module)):
            raise DeltatuneError(f"{WHERE}: effort_model must be a (model, tokenizer) pair or a callable")
        model, tokenizer = effort_model
    else:
        from deltatune.data import models

        if models.natural_task(options.model) != "causal_lm":
            raise DeltatuneError(
                f"{WHERE}: the effort is the gradient of a causal LM's loss, and model={options.model!r} is not one "
                f"(it loads as {models.natural_task(options.model)}); set model to a causal LM (e.g. smollm2-135m) "
                "or effort: false"
            )
        model = models.load(options.model, task="causal_lm").to(_device(options.device))
        tokenizer = models.load_tokenizer(options.model)
    values = cached_effort_scores(model, tokenizer, llm_texts, r=options.lora_r, alpha=options.lora_alpha,
                                  max_length=options.max_length, batch=options.effort_batch,
                                  generator=_generator(seed, 2), progress=progress)
    if not torch.isfinite(values).all():
        raise DeltatuneError(f"{WHERE}: the effort model gave non-finite gradients; check the model {options.model}")
    return values


def _effort_name(options: Options, effort_model: Any) -> str:
    if effort_model is None:
        return options.model
    if isinstance(effort_model, tuple | list):
        return type(effort_model[0]).__name__
    return getattr(effort_model, "__name__", type(effort_model).__name__)


# ---------------------------------------------------------------- coverage-enhanced sampling


def strata_of(scores: np.ndarray, k: int) -> np.ndarray:
    """Each score's stratum among k equal-width strata over [min, max]: the first j whose upper edge
    min(min + (j+1)·width, max) the score does not exceed (the official code's rule; all 0 if the scores are
    equal). Where min + k·width rounds below max, the official loop places the top score in no stratum and the row
    vanishes; here it goes to the last one."""
    lo, hi = float(scores.min()), float(scores.max())
    width = (hi - lo) / k
    edges = np.array([min(lo + width * j, hi) for j in range(1, k + 1)])
    return np.minimum(np.searchsorted(edges, scores, side="left"), k - 1)


def coverage_sample(scores: torch.Tensor | np.ndarray, m: int, hard_prune: float, k: int, rng: random.Random
                    ) -> tuple[list[int], dict[str, Any]]:
    """m row indices: drop the top ⌊hard_prune·n⌋ scores, split the rest into k equal-width strata, then take the
    smallest non-empty stratum, draw min(|stratum|, ⌊m / #strata left⌋) of it uniformly, and repeat with m
    reduced by what was drawn. Also the strata's sizes and draws (for the manifest)."""
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="stable")  # descending, ties by index
    dropped = math.floor(hard_prune * len(s))
    kept = order[dropped:]
    if m > len(kept):
        raise DeltatuneError(f"{WHERE}: {m} rows asked for but only {len(kept)} remain after the hard prune")
    which = strata_of(s[kept], k)
    groups: list[tuple[int, list[int]]] = [(j, [int(i) for i in kept[which == j]]) for j in range(k)]
    sizes = [len(g) for _, g in groups]
    drawn = [0] * k
    left = sorted((g for g in groups if g[1]), key=lambda g: len(g[1]))  # stable: equal sizes keep stratum order
    chosen: list[int] = []
    while left:
        j, rows = left.pop(0)
        take = min(len(rows), m // (len(left) + 1))
        chosen += rng.sample(rows, take)
        drawn[j] = take
        m -= take
    return chosen, {"hard_pruned": dropped, "strata_sizes": sizes, "strata_drawn": drawn,
                    "score_range": [float(s[kept].min()), float(s[kept].max())] if len(kept) else None}
