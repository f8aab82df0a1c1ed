"""DEALRec (``deltatune data prune --method dealrec``): LiSSA against the damped inverse it estimates, the
closed-form per-row gradients against autograd, the effort identity against an explicit LoRA, the
coverage-enhanced sampling's invariants, determinism and bad input."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from conftest import tiny_llama

from deltatune.data.steps import dealrec
from deltatune.data.steps._base import Pool
from deltatune.errors import DeltatuneError

# ---------------------------------------------------------------- helpers


def unit_rows(n: int, d: int, seed: int = 0, classes: int = 3) -> tuple[torch.Tensor, list[int]]:
    """Unit-norm embeddings with a class signal (what the surrogate reads) and their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = [i % classes for i in range(n)]
    centres = torch.randn(classes, d, generator=g)
    feats = torch.randn(n, d, generator=g) + 0.8 * centres[labels]
    return torch.nn.functional.normalize(feats, dim=1), labels


def labelled_pool(n: int, classes: int = 3) -> Pool:
    names = ["neg", "neu", "pos", "other"][:classes]
    return Pool([{"text": f"row {i} says {names[i % classes]}", "label": names[i % classes]} for i in range(n)])


def dense_hessian(feats: torch.Tensor, q: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The mean Hessian of the soft cross-entropy w.r.t. the weight, (C·d, C·d), in float64 from its closed form
    (Σq)·(diag p − p pᵀ) ⊗ φφᵀ averaged over the rows."""
    f, q = feats.double(), q.double()
    p = torch.softmax(f @ weight.double().T + bias.double(), dim=-1)
    cov = q.sum(1)[:, None, None] * (torch.diag_embed(p) - p[:, :, None] * p[:, None, :])
    return torch.einsum("nab,ni,nj->aibj", cov, f, f).reshape(q.shape[1] * f.shape[1], -1) / len(f)


# ---------------------------------------------------------------- LiSSA


def ridge(n: int = 400, k: int = 6, lam: float = 0.5, spread: float = 1.0, seed: int = 0):
    """A ridge-regression surrogate: rows x, loss_z(w) = ½(xᵀw − y)² + ½λ‖w‖², its per-row HVP in closed form,
    the mean gradient v at a random w, and the mean Hessian H = XᵀX/n + λI."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g, dtype=torch.float64) * torch.linspace(0.2, 1.0, k, dtype=torch.float64) * spread
    y = torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.randn(k, generator=g, dtype=torch.float64)
    v = x.T @ (x @ w - y) / n + lam * w
    hessian = x.T @ x / n + lam * torch.eye(k, dtype=torch.float64)

    def hvp(idx: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        xs = x[idx]
        return xs.T @ (xs @ h) / len(idx) + lam * h

    return hvp, v, hessian


def damped_inverse(hessian: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """LiSSA's fixed point with the paper's damp 0.01 and scale 25: 25·(H + 0.25·I)⁻¹v."""
    return 25 * torch.linalg.solve(hessian + 0.25 * torch.eye(len(v), dtype=hessian.dtype), v)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_lissa_reaches_the_damped_inverse_on_ridge_regression():
    hvp, v, hessian = ridge()
    n = 400
    exact = dealrec.lissa(lambda idx, h: hvp(torch.arange(n), h), v, n, steps=5000,
                          generator=torch.Generator().manual_seed(0))
    assert rel(exact, damped_inverse(hessian, v)) < 1e-3
    # not the undamped inverse: the damping is part of the estimate (the spec's pitfall)
    assert rel(25 * torch.linalg.solve(hessian, v), damped_inverse(hessian, v)) > 0.1
    assert dealrec.lissa_residual(lambda idx, h: hvp(torch.arange(n), h), exact, v, n, 0.01, 25.0) < 1e-6


def test_single_row_lissa_is_unbiased_on_ridge_regression():
    """The paper's sampling (one random row per HVP) fluctuates around the fixed point (3-15% per run here); the
    mean of 12 seeded runs is within 4% of it, while leaving out the data's Hessian (46% away) or the damping
    (127% away) would not be."""
    hvp, v, hessian = ridge(lam=0.1, spread=0.5)
    runs = [dealrec.lissa(hvp, v, 400, steps=2000, generator=torch.Generator().manual_seed(s)) for s in range(12)]
    ref = damped_inverse(hessian, v)
    assert rel(torch.stack(runs).mean(0), ref) < 0.04
    assert rel(damped_inverse(0.1 * torch.eye(len(v), dtype=torch.float64), v), ref) > 0.3
    assert rel(25 * torch.linalg.solve(hessian, v), ref) > 0.3


def test_single_row_lissa_on_the_softmax_surrogate_is_close_to_exact():
    """On unit-norm embeddings (what the step feeds it) single-row HVPs are small, so one run of the paper's LiSSA
    lands within a few percent of 25·(H + 0.25I)⁻¹v with H the exact Hessian of the trained head (ignoring H, 100·v,
    is 20% away), and the step's residual says how far."""
    feats, labels = unit_rows(600, 48)
    q = torch.nn.functional.one_hot(torch.tensor(labels), 3).float()
    weight, bias, _ = dealrec.train_surrogate(feats, q, dealrec.Options(epochs=30), torch.Generator().manual_seed(0))
    v = dealrec.mean_gradient(feats, q, weight, bias)
    hvp = dealrec.hvp_rows(feats, q, weight, bias)
    h = dealrec.lissa(hvp, v, len(feats), steps=5000, generator=torch.Generator().manual_seed(1))
    ref = damped_inverse(dense_hessian(feats, q, weight, bias), v.double().flatten()).reshape(v.shape)
    error = rel(h.double(), ref)
    assert error < 0.06 and rel(100 * v.double(), ref) > 0.15
    residual = dealrec.lissa_residual(hvp, h, v, len(feats), 0.01, 25.0)
    assert error / 2 < residual < 2 * error  # the residual the step reports is of the true error's size


def test_lissa_refuses_embeddings_too_large_for_its_scale():
    feats = torch.full((4, 3), 10.0)
    q = torch.eye(2)[[0, 1, 0, 1]]
    with pytest.raises(DeltatuneError, match="too large for LiSSA.*lissa_scale"):
        dealrec._check_lissa_bound(feats, q, dealrec.Options())


# ---------------------------------------------------------------- the surrogate's closed forms


@pytest.mark.parametrize("soft", [False, True], ids=["labels", "word-bag"])
def test_per_sample_gradients_and_hvp_equal_autograd(soft: bool):
    g = torch.Generator().manual_seed(3)
    n, d, c = 12, 7, 4
    feats = torch.randn(n, d, generator=g)
    if soft:  # word bags: normalised counts, one row without words
        q = torch.rand(n, c, generator=g) * (torch.rand(n, c, generator=g) > 0.4)
        q[0] = 0
        q = q / q.sum(1, keepdim=True).clamp(min=1e-12)
    else:
        q = torch.nn.functional.one_hot(torch.randint(0, c, (n,), generator=g), c).float()
    weight, bias = torch.randn(c, d, generator=g), torch.randn(c, generator=g)

    def row_loss(w: torch.Tensor, f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return dealrec.soft_cross_entropy((f @ w.T + bias)[None], t[None])[0]

    reference = torch.func.vmap(torch.func.grad(row_loss), in_dims=(None, 0, 0))(weight, feats, q)
    closed = dealrec.per_sample_grads(feats, q, weight, bias)
    torch.testing.assert_close(closed, reference, rtol=1e-5, atol=1e-6)
    if soft:
        assert closed[0].abs().max() == 0  # no words, no gradient
    torch.testing.assert_close(dealrec.mean_gradient(feats, q, weight, bias), reference.mean(0), rtol=1e-5, atol=1e-6)
    h = torch.randn(c, d, generator=g)
    torch.testing.assert_close(dealrec.influence(feats, q, weight, bias, h), (reference * h).sum((1, 2)),
                               rtol=1e-5, atol=1e-5)
    # the autograd HVP of a subset's mean loss against the dense closed-form Hessian
    idx = torch.tensor([1, 4, 4, 9])
    dense = dense_hessian(feats[idx], q[idx], weight, bias)
    torch.testing.assert_close(dealrec.hvp_rows(feats, q, weight, bias)(idx, h).double().flatten(),
                               dense @ h.double().flatten(), rtol=1e-5, atol=1e-6)


def test_word_targets_count_the_most_frequent_words():
    q, info = dealrec.word_targets(["The cat, the HAT", "a dog", "the cat"], vocab=2)
    assert info == {"kind": "word-bag", "words": 2, "rows_without_words": 1}
    torch.testing.assert_close(q, torch.tensor([[2 / 3, 1 / 3], [0.0, 0.0], [0.5, 0.5]]))  # words: the, cat


# ---------------------------------------------------------------- effort


def _rows(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 128, (t,), generator=g) for t in lengths]


def _padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


def test_effort_identity_equals_an_explicit_lora():
    """∂L/∂B at B = 0 computed as s·(∂L/∂W_v)·Aᵀ from a padded batch equals, row by row, the gradient of B in a
    real LoRA (deltatune's, r 8, α 16, on the last v_proj with the same A) at batch 1; and the per-row ∂L/∂W_v
    from the hooks equals autograd's W_v gradient of that row alone."""
    import deltatune as dt

    rows = _rows([9, 5, 12, 2])
    model = tiny_llama()
    name, v_proj = dealrec.last_v_proj(model)
    assert name == "model.layers.2.self_attn.v_proj"
    a = dealrec.lora_a(v_proj.in_features, 8, torch.Generator().manual_seed(5))
    bound = 1 / math.sqrt(v_proj.in_features)  # kaiming-uniform(a=√5) = U(−1/√in, 1/√in)
    assert a.abs().max() <= bound and a.abs().max() > 0.8 * bound
    ids, mask = _padded(rows)
    weight_grads = dealrec.v_proj_weight_grads(model, v_proj, ids, mask)
    b_grads = dealrec.lora_b_grads(weight_grads, a, 16 / 8)
    assert all(p.requires_grad for p in model.parameters())  # the pass puts the flags back

    for i, r in enumerate(rows):
        model.zero_grad()
        model(input_ids=r[None], labels=r[None]).loss.backward()
        torch.testing.assert_close(weight_grads[i], v_proj.weight.grad, rtol=1e-4, atol=1e-6)

    tuned = dt.attach(tiny_llama(), "lora", r=8, alpha=16, targets=["v_proj"], layers=[2])
    params = dict(tuned.named_parameters())
    lora_a_, lora_b = (params[f"deltas.model:layers:2:self_attn:v_proj:weight.{t}"] for t in "AB")
    assert lora_b.abs().max() == 0  # LoRA's init: B = 0
    with torch.no_grad():
        lora_a_.copy_(a)
    for i, r in enumerate(rows):
        tuned.zero_grad()
        tuned(input_ids=r[None], labels=r[None]).loss.backward()
        torch.testing.assert_close(b_grads[i], lora_b.grad, rtol=1e-4, atol=1e-7)
        assert lora_b.grad.norm() > 0


class CharTokenizer:
    """A byte-level tokenizer for the tiny Llama (ids 3..127; 1 = EOS, 0 = pad)."""

    eos_token_id, pad_token_id = 1, 0

    def __call__(self, text: str, truncation: bool = True, max_length: int = 512, add_special_tokens: bool = True):
        ids = [3 + (b % 125) for b in text.encode()]
        return {"input_ids": ids[:max_length] if truncation else ids}


def test_effort_scores_batched_equal_batch_one_and_append_eos():
    texts = ["a short one", "a considerably longer text than the others", "mid length text", "x"]
    model, tok = tiny_llama(), CharTokenizer()
    one, info = dealrec.effort_scores(model, tok, texts, batch=1, generator=torch.Generator().manual_seed(0))
    many, _ = dealrec.effort_scores(model, tok, texts, batch=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(many, one, rtol=1e-4, atol=0)
    assert info["layer"].endswith("layers.2.self_attn.v_proj") and (one > 0).all()  # "x" + EOS: one target
    assert dealrec._tokenize(tok, "abc", 8)[-1] == 1 and len(dealrec._tokenize(tok, "abcdefghij", 8)) == 8


def test_effort_cache_reuses_rows_and_keys_them_by_tokens_weights_and_a(monkeypatch):
    """The effort pass is paid once per row: a second pool sharing rows runs the model on the new ones only, with
    the values of a fresh pass; another A (seed), another truncation or the cache turned off runs them again."""
    texts = ["cache test: first row", "cache test: a second, longer row of text", "cache test: third", "cache: 4th"]
    model, tok = tiny_llama(), CharTokenizer()
    fresh, _ = dealrec.effort_scores(model, tok, texts, batch=2, generator=torch.Generator().manual_seed(0))
    ran: list[int] = []  # rows of each forward pass
    model.register_forward_pre_hook(lambda m, args, kwargs: ran.append(len(kwargs["input_ids"])), with_kwargs=True)

    def cached(rows: list[str], seed: int = 0, max_length: int = 256) -> torch.Tensor:
        ran.clear()
        return dealrec.cached_effort_scores(model, tok, rows, r=8, alpha=16.0, max_length=max_length, batch=2,
                                            generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(cached(texts[:3]), fresh[:3], rtol=1e-4, atol=0)
    assert sum(ran) == 3
    torch.testing.assert_close(cached(texts[1:]), fresh[1:], rtol=1e-4, atol=0)
    assert sum(ran) == 1  # rows 1 and 2 from the cache
    other_a = cached(texts[:2], seed=1)
    assert sum(ran) == 2 and not torch.allclose(other_a, fresh[:2])
    short = cached(texts[:2], max_length=12)  # both rows truncate to "cache test: ": new tokens, one key
    assert sum(ran) == 2 and not torch.allclose(short, fresh[:2])
    torch.testing.assert_close(short[0], short[1])
    torch.testing.assert_close(cached(texts[:2], max_length=12), short)
    assert sum(ran) == 0
    monkeypatch.setenv("DELTATUNE_EMBED_CACHE", "0")
    torch.testing.assert_close(cached(texts[:2]), fresh[:2], rtol=1e-4, atol=0)
    assert sum(ran) == 2


def test_effort_text_of_a_classification_row_ends_with_its_label_name():
    pool = Pool([{"text": "good day", "label": 2}, {"text": "bad", "label": "neg"}])
    assert dealrec.effort_texts(pool, pool.texts(), ["n", "m", "pos"]) == ["good day\npos", "bad\nneg"]
    text_pool = Pool([{"text": "free text"}], label_field=None, task="text")
    assert dealrec.effort_texts(text_pool, text_pool.texts()) == ["free text"]


def test_effort_from_a_model_folder(word_run):
    """``model`` names a save_pretrained folder (the run's model, inline): loaded here, its effort enters the
    score with weight λ."""
    folder, _ = word_run
    pool = Pool([{"text": f"what a {w} day", "label": lab} for w, lab in
                 [("good", "positive"), ("bad", "negative")] * 20])
    feats, _ = unit_rows(40, 8)
    out = dealrec.run(pool, dealrec.Options(budget=10, model=folder, device="cpu", epochs=5, lissa_steps=200),
                      seed=0, embed=lambda texts: feats)
    assert out.info["effort_model"] == folder and out.info["lambda"] == 0.3
    assert out.info["effort"]["max"] > out.info["effort"]["min"] >= 0
    assert max(out.scores) <= 1.3 + 1e-9 and len(out.indices) == 10


# ---------------------------------------------------------------- coverage-enhanced sampling


def official_strata(scores: list[float], k: int) -> list[int]:
    """The official prune.py's assignment, loop for loop: the first edge min(s_min + width·j, s_max), j = 1..k,
    that the score does not exceed. Where s_min + width·k rounds below s_max the official loop places the top score
    nowhere (the row silently vanishes); the step puts it in the last stratum, as here."""
    lo, hi = min(scores), max(scores)
    width = (hi - lo) / k
    edges = [min(lo + width * j, hi) for j in range(1, k + 1)]
    return [next((j for j, e in enumerate(edges) if s <= e), k - 1) for s in scores]


SCORE_SETS = {
    "uniform": lambda r: [r.random() for _ in range(1000)],
    "skewed": lambda r: [r.expovariate(1.0) for _ in range(1000)],
    "outliers": lambda r: [r.gauss(0, 1) for _ in range(990)] + [50.0 + r.random() for _ in range(10)],
    "ties": lambda r: [float(r.randint(0, 6)) for _ in range(1000)],
}


@pytest.mark.parametrize("kind", list(SCORE_SETS))
def test_strata_follow_the_official_rule(kind: str):
    scores = SCORE_SETS[kind](random.Random(1))
    assert dealrec.strata_of(np.array(scores), 50).tolist() == official_strata(scores, 50)
    assert dealrec.strata_of(np.array([2.0, 2.0, 2.0]), 50).tolist() == [0, 0, 0]  # constant: one stratum


@pytest.mark.parametrize("kind", list(SCORE_SETS))
@pytest.mark.parametrize("m", [1, 20, 50, 137, 600, 900])
def test_coverage_sample_takes_exactly_m_covering_every_stratum(kind: str, m: int):
    scores = SCORE_SETS[kind](random.Random(2))
    chosen, info = dealrec.coverage_sample(torch.tensor(scores), m, 0.1, 50, random.Random(0))
    assert len(chosen) == m and len(set(chosen)) == m
    top = set(np.argsort(-np.array(scores), kind="stable")[:100].tolist())
    assert not top & set(chosen) and info["hard_pruned"] == 100  # the top 10% never chosen
    sizes, drawn = info["strata_sizes"], info["strata_drawn"]
    assert sum(sizes) == 900 and sum(drawn) == m
    assert all(0 <= t <= s for s, t in zip(sizes, drawn, strict=True))
    nonempty = sum(s > 0 for s in sizes)
    if m >= nonempty:
        assert all(t >= 1 for s, t in zip(sizes, drawn, strict=True) if s > 0)
    # each draw lies in its stratum: the chosen rows' strata counts are the draws
    kept = np.argsort(-np.array(scores), kind="stable")[100:]
    stratum = dict(zip(kept.tolist(), dealrec.strata_of(np.array(scores)[kept], 50).tolist(), strict=True))
    counts = np.bincount([stratum[i] for i in chosen], minlength=50).tolist()
    assert counts == drawn


def test_coverage_sample_spreads_the_budget_evenly():
    """Smallest stratum first, each ⌊m / #left⌋: with strata of 3, 10, 40, 100 rows and m = 60 the draws are
    3, then ⌊57/3⌋ = 19 capped at 10, then ⌊47/2⌋ = 23, then 24."""
    scores = [0.0] * 3 + [1.0] * 10 + [2.0] * 40 + [3.0] * 100
    _, info = dealrec.coverage_sample(torch.tensor(scores), 60, 0.0, 4, random.Random(0))
    assert info["strata_sizes"] == [3, 10, 40, 100] and info["strata_drawn"] == [3, 10, 23, 24]


# ---------------------------------------------------------------- the whole step


def test_run_scores_are_minmax_of_the_influence_it_estimates():
    """Effort off, no hard prune, one stratum, every row kept: the step returns every row with minmax(I), and I is
    ⟨25(H + 0.25I)⁻¹v, ∇L_z⟩ of the surrogate it trained (rebuilt here with the same seed), up to LiSSA's noise;
    leaving out H (h = 100·v) would be visibly further off."""
    n = 300
    feats, _ = unit_rows(n, 8)
    pool = labelled_pool(n)
    # every row in each HVP (drawn with replacement): the chain is under test here, not LiSSA's sampling noise
    opts = dealrec.Options(budget=n, effort=False, hard_prune=0.0, strata=1, epochs=20, lissa_batch=n,
                           lissa_steps=1500)
    out = dealrec.run(pool, opts, seed=7, embed=lambda texts: feats)
    assert sorted(out.indices) == list(range(n)) and out.rows == [pool.rows[i] for i in out.indices]
    assert out.scores == sorted(out.scores, reverse=True)
    q, _ = dealrec.surrogate_targets(pool, pool.texts(), 512)
    weight, bias, _ = dealrec.train_surrogate(feats, q, opts, dealrec._generator(7, 0))
    v = dealrec.mean_gradient(feats, q, weight, bias)
    h = damped_inverse(dense_hessian(feats, q, weight, bias), v.double().flatten()).reshape(v.shape)
    reference = dealrec.minmax(dealrec.influence(feats.double(), q.double(), weight.double(), bias.double(), h))
    got = torch.tensor(out.scores, dtype=torch.float64)[np.argsort(out.indices)]
    assert float((got - reference).abs().max()) < 0.006
    no_hessian = dealrec.minmax(dealrec.influence(feats.double(), q.double(), weight.double(), bias.double(),
                                                  100 * v.double()))
    assert float((no_hessian - reference).abs().max()) > 0.02
    info = out.info
    assert info["lambda"] == 0.0 and info["effort"] is None and info["lissa_residual"] < 0.006
    assert set(info["seconds"]) == {"embed", "surrogate", "lissa", "influence", "sampling"}


def effort_by_length(texts: list[str]) -> list[float]:
    return [float(len(t)) for t in texts]


def test_run_combines_influence_and_effort_and_is_deterministic_by_seed():
    n = 400
    feats, _ = unit_rows(n, 16)
    pool = labelled_pool(n)
    opts = dealrec.Options(budget=0.1, lam=1.0, epochs=10, lissa_steps=500)

    def go(seed: int):
        return dealrec.run(pool, opts, seed=seed, embed=lambda texts: feats, effort_model=effort_by_length)

    first, again, other = go(0), go(0), go(1)
    assert first.indices == again.indices and first.scores == again.scores
    assert first.indices != other.indices
    assert len(first.indices) == 40 and len(set(first.indices)) == 40
    assert first.info["effort"]["min"] == min(effort_by_length(dealrec.effort_texts(pool, pool.texts())))
    assert 0 <= min(first.scores) and max(first.scores) <= 2.0
    assert first.info["effort_model"] == "effort_by_length" and "effort" in first.info["seconds"]


def test_text_pool_uses_the_word_bag_surrogate():
    n = 200
    feats, _ = unit_rows(n, 16)
    words = ["apple", "pear", "plum", "fig"]
    pool = Pool([{"text": f"{words[i % 4]} and {words[(i * 7) % 4]} {'!' if i % 9 else ''}"} for i in range(n)],
                label_field=None, task="text")
    out = dealrec.run(pool, dealrec.Options(budget=0.05, effort=False, epochs=5, lissa_steps=300), seed=0,
                      embed=lambda texts: feats)
    assert out.info["surrogate"] == {"kind": "word-bag", "words": 5, "rows_without_words": 0}
    assert len(out.indices) == 10


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("budget,match", [
    (500, "larger than the pool"),
    (95, "only 90 of the pool's 100 remain after hard_prune"),
    (0.0, "must be a share in"),
    (2.5, "must be a share in"),
    (True, "must be a share in"),
])
def test_budget_errors(budget, match):
    with pytest.raises(DeltatuneError, match=match):
        dealrec.run(labelled_pool(100), dealrec.Options(budget=budget, effort=False), seed=0,
                    embed=lambda texts: torch.zeros(len(texts), 4))


def test_empty_pool_is_refused():
    with pytest.raises(DeltatuneError, match="pool is empty"):
        dealrec.run(Pool([]), dealrec.Options(effort=False), seed=0)


@pytest.mark.parametrize("options,match", [
    ({"strata": 0}, "strata=0 must be a whole number"),
    ({"lissa_steps": 2.5}, "lissa_steps=2.5"),
    ({"hard_prune": 1.0}, "hard_prune=1.0 must be a share"),
    ({"lissa_damp": 1.5}, "lissa_damp=1.5"),
    ({"lam": -1}, "lam=-1 must be a finite number"),
    ({"device": "tpu"}, "device='tpu'"),
    ({"max_length": 1}, "max_length=1 must be at least 2"),
])
def test_bad_options(options, match):
    with pytest.raises(DeltatuneError, match=match):
        dealrec.run(labelled_pool(100), dealrec.Options(effort=False, **options), seed=0,
                    embed=lambda texts: torch.zeros(len(texts), 4))


def test_bad_pools_and_inputs():
    zeros = lambda texts: torch.zeros(len(texts), 4)  # noqa: E731
    opts = dealrec.Options(budget=2, effort=False, epochs=1, lissa_steps=1)
    with pytest.raises(DeltatuneError, match="row 1 of rows has no 'label'"):
        dealrec.run(Pool([{"text": "a", "label": "x"}, {"text": "b"}, {"text": "c", "label": "y"}]), opts, seed=0,
                    embed=zeros)
    with pytest.raises(DeltatuneError, match="row 0 of rows has no 'text' field"):
        dealrec.run(Pool([{"body": "a", "label": 1}] * 3), opts, seed=0, embed=zeros)
    with pytest.raises(DeltatuneError, match="classification and text pools; rows is a 'chat' pool"):
        dealrec.run(Pool([{"text": "a"}] * 3, task="chat"), opts, seed=0, embed=zeros)
    with pytest.raises(DeltatuneError, match=r"embeddings have shape \(2, 4\), expected \(3, d\)"):
        dealrec.run(labelled_pool(3), opts, seed=0, embed=lambda texts: torch.zeros(2, 4))
    with pytest.raises(DeltatuneError, match="one finite number per row"):
        dealrec.run(labelled_pool(3), dealrec.Options(budget=2, epochs=1, lissa_steps=1), seed=0, embed=zeros,
                    effort_model=lambda texts: [1.0])
    with pytest.raises(DeltatuneError, match=r"model='minilm-l6' is not one \(it loads as encoder\); set model"):
        dealrec.run(labelled_pool(3), dealrec.Options(budget=2, epochs=1, lissa_steps=1, model="minilm-l6"), seed=0,
                    embed=zeros)
    with pytest.raises(DeltatuneError, match="no v_proj linear layer"):
        dealrec.last_v_proj(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# ---------------------------------------------------------------- end to end (real encoder)


@pytest.mark.slow
def test_tweets_end_to_end_with_minilm():
    """300 shipped tweets, the real minilm-l6 embeddings, effort off, the paper's surrogate, LiSSA and sampling."""
    from deltatune import data

    tweets = data.load("tweets")
    rng = random.Random(0)
    picked = rng.sample(range(len(tweets)), 300)
    pool = Pool([{"text": tweets.texts[i], "label": tweets.label_names[tweets.labels[i]]} for i in picked],
                source="tweets")
    out = dealrec.run(pool, dealrec.Options(budget=0.1, effort=False), seed=0)
    assert len(out.indices) == 30 and len(set(out.indices)) == 30
    assert out.rows == [pool.rows[i] for i in out.indices]
    info = out.info
    assert info["surrogate"] == {"kind": "classifier", "classes": len(set(r["label"] for r in pool.rows))}
    assert info["lissa_residual"] < 0.02 and info["hard_pruned"] == 30 and sum(info["strata_drawn"]) == 30
    # the head learned something from the embeddings: better than always answering the majority class
    majority = max(sum(r["label"] == lab for r in pool.rows) for lab in tweets.label_names) / 300
    assert info["surrogate_accuracy"] > majority
