"""The random baseline of select / prune (deltatune.data.steps.random_subset): the budget exactly, each label's share
kept, the same rows for the same seed, and through ``dt.data.prune`` with its manifest."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

import deltatune as dt
from deltatune.data.steps import Pool, random_subset


def pool(n_pos: int, n_neg: int) -> Pool:
    return Pool([{"text": f"t{i}", "label": "pos" if i < n_pos else "neg"} for i in range(n_pos + n_neg)])


def test_stratified_shares_and_determinism() -> None:
    rows = pool(30, 70)
    out = random_subset.run(rows, random_subset.Options(budget=0.15), seed=1)
    assert len(out.rows) == 15 and out.indices == sorted(out.indices) and len(set(out.indices)) == 15
    assert Counter(r["label"] for r in out.rows) == {"pos": 5, "neg": 10}  # 4.5 / 10.5: the tie goes to the first label
    assert [rows.rows[i] for i in out.indices] == out.rows
    assert random_subset.run(rows, random_subset.Options(budget=0.15), seed=1).indices == out.indices
    assert random_subset.run(rows, random_subset.Options(budget=0.15), seed=2).indices != out.indices
    plain = random_subset.run(rows, random_subset.Options(budget=15, stratify=False), seed=1)
    assert len(plain.rows) == 15 and not plain.info["stratified"]
    with pytest.raises(dt.DeltatuneError, match="larger than the pool"):
        random_subset.run(rows, random_subset.Options(budget=101), seed=0)


def test_prune_random_writes_the_subset_and_its_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTATUNE_DATA_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "pool.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in pool(10, 30).rows))
    result = dt.data.prune(source, method="random", out=tmp_path / "out", seed=0, budget=0.25)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["method"] == "random" and manifest["rows"] == 10 and len(result.rows) == 10
    assert Counter(r["label"] for r in result.rows) == {"pos": 3, "neg": 7}  # 2.5 / 7.5
