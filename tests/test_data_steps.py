"""The data steps' shared machinery (``deltatune.data.steps``): the pool, the manifest, the atomic output, the cache,
the inline YAML and the CLI, on a stand-in method so that no model loads."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.main import app
from deltatune.data import steps
from deltatune.data.config import DataConfig
from deltatune.data.steps import _manifest
from deltatune.data.steps._base import Outcome, budget_count
from deltatune.errors import DeltatuneError

CALLS: list[int] = []


@dataclass
class EveryOther:
    budget: float | int = 0.5  # the share kept
    explode: bool = False  # raise inside the step
    target: str | None = None  # a data source the step reads too


def _run(pool, options, *, seed, progress, target=None):
    CALLS.append(len(pool.rows))
    if options.explode:
        raise DeltatuneError("the step failed")
    k = budget_count(options.budget, len(pool.rows), "test")
    idx = list(range(0, len(pool.rows), 2))[:k]
    progress("pick", len(idx), len(idx))
    return Outcome([pool.rows[i] for i in idx], idx, [float(i) for i in idx],
                   {"target_rows": len(target.rows) if target else 0, "seed": seed})


@pytest.fixture(autouse=True)
def fake_method(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    module = types.ModuleType("fake_step")
    module.Options, module.run = EveryOther, _run
    monkeypatch.setitem(sys.modules, "fake_step", module)
    monkeypatch.setitem(steps.STEPS, "select", {"fake": "fake_step"})
    monkeypatch.setenv("DELTATUNE_DATA_CACHE", str(tmp_path / "cache"))
    CALLS.clear()


def rows_file(path: Path, n: int = 40) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"text number {i}", "label": ["neg", "pos"][i % 2]}) + "\n")
    return path


def test_output_folder_and_manifest_round_trip(tmp_path: Path) -> None:
    source = rows_file(tmp_path / "pool.jsonl")
    target = rows_file(tmp_path / "target.jsonl", 6)
    result = dt.data.select(source, method="fake", out=tmp_path / "out", seed=3, budget=5, target=str(target))
    rows, manifest = _manifest.read(tmp_path / "out")
    assert rows == result.rows and len(rows) == 5
    assert manifest["indices"] == [0, 2, 4, 6, 8] and manifest["scores"] == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert [r["text"] for r in rows] == [f"text number {i}" for i in (0, 2, 4, 6, 8)]
    assert manifest["step"] == "select" and manifest["method"] == "fake" and manifest["seed"] == 3
    assert manifest["options"]["budget"] == 5 and manifest["info"] == {"target_rows": 6, "seed": 3}
    pool_rows = [json.loads(line) for line in source.read_text().splitlines()]
    assert manifest["inputs"]["pool"] == _manifest.rows_sha256(pool_rows)
    assert manifest["inputs"]["target"] == _manifest.rows_sha256(pool_rows[:6])
    assert manifest["pool_size"] == 40 and manifest["rows"] == 5


def test_a_failing_step_leaves_no_output_and_keeps_what_was_there(tmp_path: Path) -> None:
    source = rows_file(tmp_path / "pool.jsonl")
    dt.data.select(source, method="fake", out=tmp_path / "out", budget=4)
    before = (tmp_path / "out" / "data.jsonl").read_text()
    with pytest.raises(DeltatuneError, match="the step failed"):
        dt.data.select(source, method="fake", out=tmp_path / "out", explode=True)
    assert (tmp_path / "out" / "data.jsonl").read_text() == before
    with pytest.raises(DeltatuneError, match="the step failed"):
        dt.data.select(source, method="fake", out=tmp_path / "new", explode=True)
    assert not (tmp_path / "new").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(DeltatuneError, match="not empty"):
        dt.data.select(source, method="fake", out=other, budget=4)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_bad_input_is_one_clear_error(tmp_path: Path) -> None:
    source = rows_file(tmp_path / "pool.jsonl", 10)
    with pytest.raises(DeltatuneError, match="unknown option.*bugdet.*budget"):
        dt.data.select(source, method="fake", bugdet=0.1)
    with pytest.raises(DeltatuneError, match="unknown method 'nope'"):
        dt.data.select(source, method="nope")
    with pytest.raises(DeltatuneError, match="larger than the pool"):
        dt.data.select(source, method="fake", budget=11)
    with pytest.raises(DeltatuneError, match="empty"):
        dt.data.select([], method="fake")
    with pytest.raises(DeltatuneError, match="neither a shipped set"):
        dt.data.select(tmp_path / "missing.jsonl", method="fake")


def test_inline_step_sees_only_the_training_part_and_is_cached(tmp_path: Path) -> None:
    source = rows_file(tmp_path / "pool.jsonl", 40)
    cfg = DataConfig(path=str(source), eval_fraction=0.25, select={"method": "fake", "budget": 0.5})
    pool = steps.read_pool(cfg)
    held = {t for t in (json.loads(x)["text"] for x in source.read_text().splitlines())} - set(pool.texts())
    assert len(pool.rows) == 30 and len(held) == 10
    ds = dt.data.labelled(dt.data.read_records(source))
    train, _ = ds.split(0.25, seed=0)
    out = steps.apply_labelled(cfg, train)
    assert len(out) == 15 and not set(out.texts) & held
    assert out.texts == [train.texts[i] for i in range(0, 30, 2)]
    assert out.label_names == train.label_names
    again = steps.apply_labelled(cfg, train)
    assert again.texts == out.texts and CALLS == [30]  # the second time comes from the cache
    changed = DataConfig(path=str(source), eval_fraction=0.25, select={"method": "fake", "budget": 0.4})
    steps.apply_labelled(changed, train)
    assert CALLS == [30, 30]  # other options: another cache entry


def test_data_section_refuses_an_unknown_step_method() -> None:
    with pytest.raises(DeltatuneError, match="data.select.method='gotdd' is unknown"):
        DataConfig(name="tweets", select={"method": "gotdd"})
    with pytest.raises(DeltatuneError, match="data.prune must be a mapping"):
        DataConfig(name="tweets", prune="dealrec")


def test_cli_writes_the_folder_and_prints_the_summary(tmp_path: Path) -> None:
    source = rows_file(tmp_path / "pool.jsonl", 12)
    result = CliRunner().invoke(app, ["data", "select", str(source), "--method", "fake", "--budget", "3",
                                      "--out", str(tmp_path / "sel"), "-o", "explode=false"])
    assert result.exit_code == 0, result.output
    assert "rows written" in result.output and "wrote 3 rows" in result.output
    assert len((tmp_path / "sel" / "data.jsonl").read_text().splitlines()) == 3
    missing = CliRunner().invoke(app, ["data", "select", str(source), "--method", "fake"])
    assert missing.exit_code == 2 and "--out" in missing.output


def test_the_output_may_not_replace_the_folder_of_what_the_step_reads(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    source = rows_file(folder / "pool.jsonl", 10)
    with pytest.raises(DeltatuneError, match="which this command reads"):
        dt.data.select(source, method="fake", out=folder, budget=2, overwrite=True)
    assert source.is_file() and len(source.read_text().splitlines()) == 10


def test_embeddings_are_cached_per_text_and_per_encoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """embed_texts: a text embedded before comes from the cache bit for bit (in any order, with new texts beside
    it), the encoder runs only on the new ones, and another encoder's weights are another cache."""
    import torch
    from test_head_artifacts import save_tiny_encoder

    from deltatune.data.steps import _embed

    monkeypatch.setenv("DELTATUNE_DATA_CACHE", str(tmp_path / "cache"))
    encoder = str(save_tiny_encoder(tmp_path / "enc", tmp_path / "data.jsonl"))
    texts = ["good movie", "bad plot", "great fun", "good movie"]
    fresh = _embed.embed_texts(texts, encoder, cache=False)
    first = _embed.embed_texts(texts, encoder)
    assert torch.allclose(first, fresh, rtol=1e-5, atol=1e-6) and torch.equal(first[0], first[3])
    (cached,) = (tmp_path / "cache" / "embeddings").glob("*.safetensors")
    seen: list[int] = []
    second = _embed.embed_texts(["awful acting", *texts[::-1]], encoder,
                                progress=lambda stage, done, total: seen.append(total))
    assert seen == [1]  # only the new text went through the encoder
    assert torch.equal(second[1:], first.flip(0)) and torch.equal(second[1:2], first[3:4])
    assert torch.allclose(second[0], _embed.embed_texts(["awful acting"], encoder, cache=False)[0], rtol=1e-5,
                          atol=1e-6)
    raw = _embed.embed_texts(texts[:1], encoder, normalize=False)  # the cache holds the pooled, unnormalised vector
    assert torch.allclose(torch.nn.functional.normalize(raw, dim=-1), first[:1])
    other = save_tiny_encoder(tmp_path / "enc2", tmp_path / "data2.jsonl")
    from transformers import BertModel

    model = BertModel.from_pretrained(other)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.add_(0.5)
    model.save_pretrained(other)
    _embed.embed_texts(texts, str(other))
    assert len(list((tmp_path / "cache" / "embeddings").glob("*.safetensors"))) == 2 and cached.is_file()
