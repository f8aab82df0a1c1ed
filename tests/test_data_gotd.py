"""GOT-D (``deltatune data select --method gotd``): the spec's 2-D toy against nearest-neighbour selection,
the potentials against a dense POT reference (autograd and finite differences), the calibration, chunked
against unchunked OT, determinism and bad input."""

from __future__ import annotations

import random

import numpy as np
import ot
import pytest
import torch

from deltatune.data.steps import gotd
from deltatune.data.steps._base import Pool
from deltatune.errors import DeltatuneError

# ---------------------------------------------------------------- helpers


def blob(centre: list[float], n: int, spread: float, g: torch.Generator) -> torch.Tensor:
    return torch.tensor(centre, dtype=torch.float64) + spread * torch.randn(n, len(centre), generator=g,
                                                                          dtype=torch.float64)


def points_pool(points: torch.Tensor, name: str, task: str = "classification"
                ) -> tuple[Pool, dict[str, list]]:
    """Rows whose text names a point; the returned table is what the test's ``embed`` reads."""
    rows = [{"text": f"{name}{i}", "label": "x"} for i in range(len(points))]
    return Pool(rows, task=task, source=name), {r["text"]: points[i].tolist() for i, r in enumerate(rows)}


def table_embed(*tables: dict[str, list]):
    """An ``embed`` for run(): looks each text up in the tables (no encoder)."""
    merged = {k: v for t in tables for k, v in t.items()}
    return lambda texts: torch.tensor([merged[t] for t in texts], dtype=torch.float64)


def toy() -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The spec's toy: a target of two equal clusters T1 (0, 0) and T2 (4, 0); a pool with 500 points near T1,
    10 near T2 and 490 far away (2, 5). ``kind``: 1 near T1, 2 near T2, 0 far."""
    g = torch.Generator().manual_seed(0)
    target = torch.cat([blob([0.0, 0.0], 50, 0.3, g), blob([4.0, 0.0], 50, 0.3, g)])
    pool = torch.cat([blob([0.0, 0.0], 500, 0.3, g), blob([4.0, 0.0], 10, 0.3, g),
                      blob([2.0, 5.0], 490, 0.5, g)])
    return target, pool, np.array([1] * 500 + [2] * 10 + [0] * 490)


def ranks(x: np.ndarray) -> np.ndarray:
    r = np.empty(len(x))
    r[np.argsort(x, kind="stable")] = np.arange(len(x))
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def centred(x: np.ndarray) -> np.ndarray:
    return x - x.mean()


def small_problem(seed: int = 0, m: int = 6, n: int = 9, d: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(m, d)), rng.normal(size=(n, d)) + 0.5


def entropic_value(b: torch.Tensor, x: np.ndarray, y: np.ndarray, reg: float) -> torch.Tensor:
    """The regularised OT value ⟨M, P⟩ + reg·Σ P log P (POT's objective) at POT's converged plan, as a
    function of the candidates' weights b (torch backend, so autograd runs through the Sinkhorn
    iterations)."""
    cost = torch.as_tensor(ot.dist(x, y))
    a = torch.full((len(x),), 1.0 / len(x), dtype=torch.float64)
    plan = ot.sinkhorn(a, b, cost, reg, method="sinkhorn_log", numItermax=100000, stopThr=1e-14)
    return (plan * cost).sum() + reg * (plan * torch.log(plan)).sum()


# ---------------------------------------------------------------- the spec's toy


def test_toy_picks_the_under_represented_cluster_first_and_nearest_neighbour_does_not():
    """The pool already covers T1 (half of it) but barely T2 (1%): moving mass to T2 points lowers OT(pool,
    target) most, so GOT-D takes all 10 T2 points before any T1 point, and T1 before any far point.
    Nearest-neighbour selection (mean distance to the target) cannot see the pool's imbalance: T1 and T2
    points are equally close."""
    target, points, kind = toy()
    pool, table = points_pool(points, "p")
    tgt, ttable = points_pool(target, "t")
    out = gotd.run(pool, gotd.Options(budget=20), seed=0, target=tgt, embed=table_embed(table, ttable))
    assert list(kind[out.indices]) == [2] * 10 + [1] * 10
    assert out.rows == [pool.rows[i] for i in out.indices]
    assert out.scores == sorted(out.scores)
    # over the whole ranking: every T2 point ahead of every T1 point, every T1 point ahead of every far point
    order = np.argsort(gotd.calibrate(gotd.potentials(target, points, 0.1)), kind="stable")
    positions = {k: np.where(kind[order] == k)[0] for k in (0, 1, 2)}
    assert positions[2].max() < positions[1].min() and positions[1].max() < positions[0].min()
    # nearest neighbour: its first 10 are not the T2 points (T1 dominates them, being 50 times more numerous)
    mean_distance = gotd.sq_distances(target, points).sqrt().mean(0).numpy()
    assert (kind[np.argsort(mean_distance, kind="stable")[:10]] == 2).sum() <= 2
    assert out.info["ot_converged"] and out.info["ot_marginal_error_l1_max"] <= 0.1


# ---------------------------------------------------------------- potentials against a dense reference


@pytest.mark.parametrize("reg", [0.2, 1.0])
def test_potentials_equal_the_gradient_of_the_entropic_ot_value(reg: float):
    """g is ∂OT_ε/∂b up to one constant: autograd through POT's torch-backend Sinkhorn of the regularised
    value. (The gradient of ``ot.sinkhorn2``, the transport cost ⟨M, P*⟩ alone, differs from g by O(ε)
    terms.)"""
    x, y = small_problem()
    g = gotd.potentials(x, y, reg, threshold=1e-12, max_iter=100000)
    b = torch.full((len(y),), 1.0 / len(y), dtype=torch.float64, requires_grad=True)
    entropic_value(b, x, y, reg).backward()
    reference = b.grad.numpy()
    np.testing.assert_allclose(centred(g), centred(reference), atol=1e-7 * np.ptp(reference))


def test_potential_differences_equal_finite_differences_of_the_entropic_ot_value():
    """Independent of autograd: (OT_ε(b + h(e_j − e_0)) − OT_ε(b − h(e_j − e_0))) / 2h = g_j − g_0."""
    x, y = small_problem(seed=1)
    reg, h = 0.3, 1e-5
    g = gotd.potentials(x, y, reg, threshold=1e-12, max_iter=100000)
    base = torch.full((len(y),), 1.0 / len(y), dtype=torch.float64)
    for j in range(1, len(y)):
        step = torch.zeros_like(base)
        step[j], step[0] = h, -h
        up, down = entropic_value(base + step, x, y, reg), entropic_value(base - step, x, y, reg)
        diff = (up - down).item() / (2 * h)
        assert diff == pytest.approx(g[j] - g[0], abs=1e-5 * np.ptp(g))


def test_one_chunk_gives_pots_own_potentials():
    """With one chunk, g is the c-transform of POT's f: POT's reg·log_v at convergence (up to the gauge)."""
    x, y = small_problem(seed=2, m=20, n=30, d=4)
    reg = 0.1
    _, log = ot.sinkhorn(np.full(20, 1 / 20), np.full(30, 1 / 30), ot.dist(x, y), reg, method="sinkhorn_log",
                         log=True, numItermax=100000, stopThr=1e-13)
    g = gotd.potentials(x, y, reg, threshold=1e-11, max_iter=100000)
    np.testing.assert_allclose(centred(g), centred(reg * log["log_v"]), atol=1e-8 * np.ptp(g))


# ---------------------------------------------------------------- calibration


def test_calibration_is_the_papers_formula_and_ranks_as_the_repos_form():
    g = np.random.default_rng(0).normal(size=50)
    n = len(g)
    by_loop = np.array([g[j] - sum(g[i] for i in range(n) if i != j) / (n - 1) for j in range(n)])
    np.testing.assert_allclose(gotd.calibrate(g), by_loop, rtol=1e-12, atol=1e-12)
    repo = g * (1 + 1 / n) - g.mean()  # DV4LLM's ot-selection notebook
    assert list(np.argsort(gotd.calibrate(g))) == list(np.argsort(repo))
    assert list(gotd.calibrate(np.array([3.0]))) == [3.0]


# ---------------------------------------------------------------- chunked OT


def clustered(n: int, clusters: int, g: torch.Generator, centres: torch.Tensor) -> torch.Tensor:
    """Unit-norm points around the first ``clusters`` centres (as sentence embeddings are unit-norm)."""
    noise = 0.6 * torch.randn(n, centres.shape[1], generator=g, dtype=torch.float64)
    return torch.nn.functional.normalize(centres[torch.arange(n) % clusters] + noise, dim=1)


def test_chunked_potentials_agree_with_unchunked():
    """Four random chunks of 300 against the whole target: each chunk's target potential estimates the full
    problem's up to sampling noise, and every candidate's g is the c-transform of their average, so the
    ranking stays that of the unchunked problem. Asserted: rank correlation ≥ 0.999 and ≥ 95% of the unchunked
    top 10% (measured over seeds 0-4: > 0.99997 and 100%). Calibrating each chunk on its own instead (the
    simpler merge) keeps each chunk's constant in the ranking and is asserted to do worse (measured: 71-90% of
    the top 10%)."""
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(5, 8, generator=g, dtype=torch.float64)
    cand, target = clustered(1200, 5, g, centres), clustered(80, 2, g, centres)
    full = gotd.potentials(target, cand, 0.1)
    chunked, info = gotd.solve(target, cand, 0.1, chunk=300, seed=0)
    assert info["ot_chunks"] == 4 and len(info["ot_iterations"]) == 4 and info["ot_converged"]
    k = len(full) // 10
    top = set(np.argsort(full)[:k])
    assert spearman(full, chunked) >= 0.999
    assert len(top & set(np.argsort(chunked)[:k])) >= 0.95 * k
    per_chunk = np.empty(len(full))
    for part in gotd._split(len(full), 300, seed=0):
        per_chunk[part] = gotd.calibrate(gotd.potentials(target, cand[torch.as_tensor(part)], 0.1))
    assert len(top & set(np.argsort(per_chunk)[:k])) < len(top & set(np.argsort(chunked)[:k]))


def test_chunks_are_an_equal_split_of_every_candidate():
    parts = gotd._split(1003, 250, seed=0)
    assert len(parts) == 5 and {len(p) for p in parts} == {200, 201}
    assert sorted(np.concatenate(parts).tolist()) == list(range(1003))
    assert [p.tolist() for p in gotd._split(10, 250, seed=0)] == [list(range(10))]


# ---------------------------------------------------------------- run: determinism, progress, info


def run_toy(seed: int, **options) -> tuple:
    target, points, _ = toy()
    pool, table = points_pool(points, "p")
    tgt, ttable = points_pool(target, "t")
    calls: list[tuple[str, int, int]] = []
    out = gotd.run(pool, gotd.Options(**{"budget": 0.05, **options}), seed=seed, target=tgt,
                   embed=table_embed(table, ttable), progress=lambda *a: calls.append(a))
    return out, calls


def test_run_is_deterministic_by_seed_and_reports_progress_and_timings():
    first, calls = run_toy(seed=7, chunk=300, max_target=60)
    second, _ = run_toy(seed=7, chunk=300, max_target=60)
    assert first.indices == second.indices and first.scores == second.scores
    assert len(first.indices) == 50 and len(set(first.indices)) == 50
    assert calls == [("ot", i, 4) for i in range(1, 5)]
    info = first.info
    assert info["target_rows"] == 100 and info["target_rows_used"] == 60 and info["ot_chunks"] == 4
    assert info["seconds_embed"] >= 0 and info["seconds_ot"] > 0 and info["ot_iterations_max"] >= 1
    # the seeded target sample and chunk split are what the seed changes
    other, _ = run_toy(seed=8, chunk=300, max_target=60)
    assert other.scores != first.scores


def test_a_text_target_serves_a_classification_pool():
    target, points, kind = toy()
    pool, table = points_pool(points, "p")
    tgt, ttable = points_pool(target, "t", task="text")
    out = gotd.run(pool, gotd.Options(budget=10), seed=0, target=tgt, embed=table_embed(table, ttable))
    assert list(kind[out.indices]) == [2] * 10


def test_stratify_keeps_the_pools_label_shares_and_each_labels_most_negative_rows():
    target, points, kind = toy()
    pool, table = points_pool(points, "p")
    for row, k in zip(pool.rows, kind, strict=True):
        row["label"] = "far" if k == 0 else "near"  # 490 far, 510 near (T1 and T2)
    tgt, ttable = points_pool(target, "t")
    embed = table_embed(table, ttable)
    plain = gotd.run(pool, gotd.Options(budget=100), seed=0, target=tgt, embed=embed)
    assert all(kind[i] != 0 for i in plain.indices)  # the paper's rule takes no far row: every label share moves
    out = gotd.run(pool, gotd.Options(budget=100, stratify=True), seed=0, target=tgt, embed=embed)
    labels = [pool.rows[i]["label"] for i in out.indices]
    assert labels.count("far") == 49 and labels.count("near") == 51  # 100 x 490/1000 and x 510/1000
    assert out.scores == sorted(out.scores) and out.info["stratified"] and not plain.info["stratified"]
    # within "near" the choice is the plain rule's: its 51 lowest, which the unstratified 100 hold
    near = [i for i in out.indices if pool.rows[i]["label"] == "near"]
    assert near == [i for i in plain.indices if pool.rows[i]["label"] == "near"][:51]


def test_stratify_refuses_a_pool_without_labels():
    target, points, _ = toy()
    pool, table = points_pool(points, "p", task="text")
    pool.label_field = None
    tgt, ttable = points_pool(target, "t")
    with pytest.raises(DeltatuneError, match="stratify=true needs a labelled pool"):
        gotd.run(pool, gotd.Options(budget=10, stratify=True), seed=0, target=tgt, embed=table_embed(table, ttable))


def test_lowest_takes_each_labels_share_from_its_own_lowest_scores():
    scores = np.array([0.5, -3.0, 2.0, -1.0, 0.0, -2.0])
    assert gotd.lowest(scores, 3) == [1, 5, 3]
    labels = ["a", "a", "b", "a", "b", "b"]  # shares 1/2 and 1/2 of 4: two each
    assert gotd.lowest(scores, 4, labels) == [1, 5, 3, 4]


# ---------------------------------------------------------------- bad input


def test_budget_errors():
    target, points, _ = toy()
    pool, table = points_pool(points[:5], "p")
    tgt, ttable = points_pool(target, "t")
    embed = table_embed(table, ttable)
    with pytest.raises(DeltatuneError, match="larger than the pool"):
        gotd.run(pool, gotd.Options(budget=6), seed=0, target=tgt, embed=embed)
    with pytest.raises(DeltatuneError, match="the pool is empty"):
        gotd.run(Pool([]), gotd.Options(budget=0.1), seed=0, target=tgt, embed=embed)
    with pytest.raises(DeltatuneError, match="must be a share in"):
        gotd.run(pool, gotd.Options(budget=0.0), seed=0, target=tgt, embed=embed)


@pytest.mark.parametrize(("options", "match"), [
    ({"epsilon": 0.0}, "epsilon=0.0 must be a finite number > 0"),
    ({"threshold": float("nan")}, "threshold=nan must be a finite number > 0"),
    ({"chunk": 0}, "chunk=0 must be a whole number ≥ 1"),
    ({"max_iter": 1.5}, "max_iter=1.5 must be a whole number ≥ 1"),
    ({"max_target": 0}, "max_target=0 must be a whole number ≥ 1, or null"),
    ({"stratify": "yes"}, "stratify='yes' must be true or false"),
])
def test_bad_options(options: dict, match: str):
    pool, table = points_pool(torch.zeros(4, 2), "p")
    with pytest.raises(DeltatuneError, match=match):
        gotd.run(pool, gotd.Options(budget=2, **options), seed=0, target=pool, embed=table_embed(table))


def test_bad_targets_and_pools():
    pool, table = points_pool(torch.zeros(4, 2), "p")
    embed = table_embed(table)
    opts = gotd.Options(budget=2)
    with pytest.raises(DeltatuneError, match="gotd needs a target"):
        gotd.run(pool, opts, seed=0, embed=embed)
    with pytest.raises(DeltatuneError, match="the target t is empty"):
        gotd.run(pool, opts, seed=0, target=Pool([], source="t"), embed=embed)
    with pytest.raises(DeltatuneError, match="the target t is a 'chat' source"):
        gotd.run(pool, opts, seed=0, target=Pool([{"text": "a"}], task="chat", source="t"), embed=embed)
    with pytest.raises(DeltatuneError, match="the pool rows is a 'edit' source"):
        gotd.run(Pool([{"text": "a"}] * 3, task="edit"), opts, seed=0, target=pool, embed=embed)
    with pytest.raises(DeltatuneError, match="row 1 of the target t has no 'text' field"):
        gotd.run(pool, opts, seed=0, target=Pool([{"text": "p0"}, {"body": "p1"}], source="t"), embed=embed)
    with pytest.raises(DeltatuneError, match=r"embeddings have shape \(3, 2\), expected \(8, d\)"):
        gotd.run(pool, opts, seed=0, target=pool, embed=lambda texts: torch.zeros(3, 2))
    with pytest.raises(DeltatuneError, match="non-finite embeddings"):
        gotd.run(pool, opts, seed=0, target=pool,
                 embed=lambda texts: torch.full((len(texts), 2), float("nan")))


def test_an_unconverged_solve_says_so(caplog: pytest.LogCaptureFixture):
    target, points, _ = toy()
    _, info = gotd.solve(target, points, 0.1, max_iter=1, threshold=1e-9)
    assert info["ot_converged"] is False and info["ot_iterations_max"] == 1
    assert "raise max_iter or epsilon" in caplog.text


# ---------------------------------------------------------------- end to end (real encoder)


@pytest.mark.slow
def test_tweets_with_minilm_lean_to_the_targets_label():
    """200 shipped tweets as the pool, 50 other tweets of one label as the target, the real minilm-l6: the
    chosen 20% hold a larger share of that label than the pool does (what a random pick holds on average)."""
    from deltatune import data

    tweets = data.load("tweets")
    order = list(range(len(tweets)))
    random.Random(0).shuffle(order)
    label = tweets.label_names.index("neutral")
    target_idx = [i for i in order[200:] if tweets.labels[i] == label][:50]
    row = lambda i: {"text": tweets.texts[i], "label": tweets.label_names[tweets.labels[i]]}  # noqa: E731
    pool = Pool([row(i) for i in order[:200]], source="tweets")
    target = Pool([row(i) for i in target_idx], source="target")
    out = gotd.run(pool, gotd.Options(budget=0.2), seed=0, target=target)
    assert len(out.indices) == 40 and out.info["ot_converged"]
    share_pool = np.mean([r["label"] == "neutral" for r in pool.rows])
    share_chosen = np.mean([r["label"] == "neutral" for r in out.rows])
    assert share_chosen > share_pool + 0.15, (share_chosen, share_pool)
