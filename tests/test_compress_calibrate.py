"""`dt.compress(..., calibrate=DATA)` / `deltatune compress --calibrate`: ComPEFT's density, α and scope chosen on a
dev split carved from the training part of the data. Checked: the dev split is disjoint from the eval split and from
the training examples a run uses; the choice follows the rule given the recorded scores; the recorded scores are
what the written artifact (and the source, and other grid points) score when loaded and evaluated again; without
calibrate nothing changes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import word_run_config
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.main import app
from deltatune.core import artifact
from deltatune.data import models, tasks
from deltatune.data.config import DataConfig
from deltatune.errors import DeltatuneError
from deltatune.ops.compress_calibrate import CalibrationWarning, choose, dev_split

pytestmark = pytest.mark.usefixtures("one_thread")

ALPHAS = [0.5, 1.0, 2.0, 4.0]


def _data(word_run: tuple[str, str], task: str, **extra: object) -> dict:
    """The word model's sentiment rows: 48, of which 12 eval and 36 train; a run uses 24 of those (max_train)."""
    common = {"path": word_run[1], "task": task, "max_length": 16, "eval_fraction": 0.25, "max_train": 24}
    labels = {"labels": ["negative", "positive"]} if task == "classification" else {}
    return {**common, **labels, **extra}


@pytest.fixture(scope="module")
def lora(word_run: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA trained for 12 steps on the word model's texts (task text, 24 training texts): it lowers the loss,
    so compressing it costs dev loss (B stays far smaller than A, as in a short real run)."""
    out = tmp_path_factory.mktemp("calibrate") / "lora"
    cfg = word_run_config(word_run, {"name": "lora", "r": 4, "alpha": 8}, out, steps=12, lr=5e-2, save_every=0)
    dt.train({**cfg, "data": _data(word_run, "text")})
    return out


def _keys(features: list[dict]) -> set[tuple[int, ...]]:
    return {tuple(f["input_ids"]) for f in features}


# -- the dev split ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ["classification", "text"])
def test_dev_split_is_disjoint_from_the_eval_split_and_the_training_examples_used(word_run, task: str) -> None:
    model, tok = models.load(word_run[0]), models.load_tokenizer(word_run[0])
    cfg = DataConfig(**_data(word_run, task, max_eval=4))
    dev, record = dev_split(cfg, tok, model, 8)
    whole = tasks.build_task(dataclasses.replace(cfg, max_train=None, max_eval=None), tok, model)
    used = tasks.build_task(cfg, tok, model).train
    keys = _keys(dev.eval)
    assert len(dev.eval) == len(keys) == 8 and record["available"] == 36 - 24 and not record["seen_in_training"]
    assert not keys & _keys(whole.eval), "no dev example is in the eval split (all of it, not only max_eval's cut)"
    assert not keys & _keys(used), "no dev example is one the run trains on"
    assert keys <= _keys(whole.train), "dev examples come from the training split"
    assert _keys(dev_split(cfg, tok, model, 8)[0].eval) == keys, "deterministic for a data.seed"
    # without max_train every training example may have trained the delta: drawn from them, and said so
    unheld, record = dev_split(dataclasses.replace(cfg, max_train=None), tok, model, 100)
    assert record["seen_in_training"] and record["examples"] == 36 and not _keys(unheld.eval) & _keys(whole.eval)


def test_an_edit_task_has_no_dev_split() -> None:
    with pytest.raises(DeltatuneError, match="task 'edit' trains and evaluates on the edits themselves"):
        dev_split(DataConfig(path="edits.jsonl", task="edit"), None, None, 8)


# -- the rule ----------------------------------------------------------------------------------------------------------
def _point(size: int, accuracy: float, loss: float = 0.5, evaluated: bool = True) -> dict:
    metrics = {"accuracy": accuracy, "loss": loss} if evaluated else None
    return {"stored_bytes": size, "score": accuracy if evaluated else None, "metrics": metrics}


def test_choose_takes_the_smallest_within_tolerance_else_the_best_score() -> None:
    points = [_point(100, 0.80), _point(200, 0.845), _point(200, 0.85, loss=0.4), _point(300, 0.86),
              _point(50, 0.0, evaluated=False)]
    assert choose(points, 0.855, "accuracy", 1.0) == (2, "smallest within tolerance"), "equal size: the better score"
    assert choose([_point(200, 0.845)], 0.855, "accuracy", 1.0)[1] == "smallest within tolerance", "1 point below"
    assert choose(points, 0.855, "accuracy", 0.0)[0] == 3
    assert choose(points, 0.70, "accuracy", 1.0)[0] == 0, "the smallest of all when all qualify (not the skipped)"
    assert choose(points, 0.95, "accuracy", 1.0) == (3, "best score (none within tolerance)")
    tied = [_point(200, 0.85, loss=0.6), _point(200, 0.85, loss=0.4)]
    assert choose(tied, 0.85, "accuracy", 1.0)[0] == 1, "equal size and accuracy: the lower loss"
    losses = [{"stored_bytes": s, "score": v, "metrics": {"loss": v}} for s, v in ((10, 2.1), (20, 2.02), (30, 1.9))]
    assert choose(losses, 2.0, "loss", 1.0)[0] == 1, "loss: within 1 % above the reference"
    assert choose(losses, 1.0, "loss", 1.0) == (2, "best score (none within tolerance)")


def test_choose_with_a_size_target_takes_the_best_score_among_the_points_that_small() -> None:
    def at(ratio: float, accuracy: float, loss: float = 0.5) -> dict:
        return {**_point(int(1000 / ratio), accuracy, loss), "ratio": ratio}

    points = [at(40, 0.80), at(20, 0.84), at(20, 0.84, loss=0.3), at(12, 0.83), at(5, 0.86)]
    assert choose(points, 0.85, "accuracy", 1.0, 10) == (2, "best score at >= 10x"), "not the 5x; ties: lower loss"
    assert choose(points, 0.85, "accuracy", 1.0, 30) == (0, "best score at >= 30x (not within tolerance)")
    assert choose(points, 0.85, "accuracy", 1.0, 4)[0] == 4, "a looser target admits the larger, better point"
    same = [at(20, 0.84), at(30, 0.84)]
    assert choose(same, 0.84, "accuracy", 1.0, 10)[0] == 1, "equal scores: the smaller artifact"
    assert choose(points, 0.85, "accuracy", 0.5)[0] == 4, "without a target: the smallest within tolerance"


def test_a_size_target_evaluates_every_point_that_small_and_no_other(word_run, lora: Path, tmp_path: Path) -> None:
    data = _data(word_run, "text")
    out = dt.compress(lora, tmp_path / "c", calibrate=data, alphas=[1.0, 4.0], densities=[0.05, 0.1, 0.3],
                      scope="tensor", dev_size=12, min_ratio=20)
    meta, _ = artifact.read_artifact(out)
    cal = meta["compression"]["calibration"]
    evaluated = [p for p in cal["points"] if p["metrics"] is not None]
    assert cal["min_ratio"] == 20 and {p["ratio"] >= 20 for p in cal["points"]} == {True, False}, "the grid straddles"
    assert evaluated == [p for p in cal["points"] if p["ratio"] >= 20], "every point that small, no other"
    chosen = _chosen(cal)
    assert chosen["score"] == min(p["score"] for p in evaluated) and cal["chosen"]["rule"].startswith("best score at")
    assert meta["compression"]["ratio"] >= 20
    with pytest.raises(DeltatuneError, match="no grid point is at least 1000x smaller .* lower min_ratio"):
        dt.compress(lora, tmp_path / "x", calibrate=data, alphas=[1.0], densities=[0.3], dev_size=12, min_ratio=1000)
    assert not (tmp_path / "x").exists(), "nothing written"


def _chosen(cal: dict) -> dict:
    keys = ("scope", "density", "alpha")
    [point] = [p for p in cal["points"] if all(p[k] == cal["chosen"][k] for k in keys)]
    return point


@pytest.mark.parametrize(("lowrank", "tolerance"), [(None, 1.0), ("delta", 1.0), (None, 0.0), (None, 1000.0)])
def test_the_choice_follows_the_rule_on_the_recorded_scores_and_is_a_plain_compression(
        word_run, lora: Path, tmp_path: Path, lowrank: str | None, tolerance: float) -> None:
    out = dt.compress(lora, tmp_path / "c", calibrate=_data(word_run, "text"), lowrank=lowrank, alphas=ALPHAS,
                      dev_size=12, tolerance=tolerance)
    meta, tensors = artifact.read_artifact(out)
    cal = meta["compression"]["calibration"]
    assert cal["metric"] == "loss" and cal["grid"]["scopes"] == ["global", "tensor"] and len(cal["points"]) == 32
    ref, chosen = cal["reference"]["score"], _chosen(cal)
    evaluated = [p for p in cal["points"] if p["metrics"] is not None]
    within = [p for p in evaluated if p["score"] <= ref * (1 + tolerance / 100) + 1e-12]
    if within:
        assert cal["chosen"]["rule"] == "smallest within tolerance" and chosen in within
        smallest = min(p["stored_bytes"] for p in within)
        assert chosen["stored_bytes"] == smallest
        assert chosen["score"] == min(p["score"] for p in within if p["stored_bytes"] == smallest)
        assert all(p["stored_bytes"] > smallest for p in cal["points"] if p["metrics"] is None), "only larger skipped"
    else:
        assert chosen["score"] == min(p["score"] for p in evaluated) and "no grid point is within" in cal["warnings"][-1]
    if tolerance > 100:  # every point qualifies: the smallest artifact of the whole grid
        assert chosen["stored_bytes"] == min(p["stored_bytes"] for p in cal["points"])
    assert {k: meta["config"][k] for k in ("scope", "density", "alpha")} == {k: chosen[k] for k in cal["chosen"]
                                                                            if k != "rule"}
    plain = dt.compress(lora, tmp_path / "p", lowrank=lowrank, scope=chosen["scope"], density=chosen["density"],
                        alpha=chosen["alpha"])
    p_meta, p_tensors = artifact.read_artifact(plain)
    assert tensors.keys() == p_tensors.keys() and all(torch.equal(tensors[k], p_tensors[k]) for k in tensors)
    assert meta["config"] == p_meta["config"] and meta["sizes"] == p_meta["sizes"] == {
        **meta["sizes"], "stored_bytes": chosen["stored_bytes"]}


def test_recorded_scores_reproduce_when_the_artifacts_are_loaded_and_evaluated_again(
        word_run, lora: Path, tmp_path: Path) -> None:
    data = _data(word_run, "classification")
    with pytest.warns(CalibrationWarning, match="fewer than the 200 asked for"):
        out = dt.compress(lora, tmp_path / "c", calibrate=data, alphas=ALPHAS, densities=[0.1, 0.3])
    cal = artifact.read_meta(out)["compression"]["calibration"]
    assert cal["metric"] == "accuracy" and cal["dev"]["examples"] == 12
    model, tok = models.load(word_run[0]), models.load_tokenizer(word_run[0])
    dev, _ = dev_split(DataConfig(**data), tok, model, 200)

    def again(path: Path) -> dict:
        tuned = dt.load(model, path)
        try:
            return dev.evaluate(tuned)
        finally:
            tuned.detach()

    def same(found: dict, recorded: dict) -> None:
        assert found["accuracy"] == recorded["accuracy"]
        assert found["loss"] == pytest.approx(recorded["loss"], rel=1e-6)

    same(again(lora), cal["reference"]["metrics"])
    same(again(out), _chosen(cal)["metrics"])
    others = [p for p in cal["points"] if p["metrics"] is not None and p is not _chosen(cal)]
    for p in (others[0], others[-1]):
        other = dt.compress(lora, tmp_path / f"{p['scope']}-{p['density']}-{p['alpha']}", scope=p["scope"],
                            density=p["density"], alpha=p["alpha"])
        same(again(other), p["metrics"])


# -- without calibrate, and the options -------------------------------------------------------------------------------
def test_without_calibrate_nothing_changes(lora: Path, tmp_path: Path) -> None:
    default = dt.compress(lora, tmp_path / "d")  # a LoRA's factors, each tensor its own top-k
    explicit = dt.compress(lora, tmp_path / "e", density=0.2, alpha=1.0, scope="tensor")
    assert (default / artifact.TENSOR_FILE).read_bytes() == (explicit / artifact.TENSOR_FILE).read_bytes()
    d_meta, e_meta = artifact.read_meta(default), artifact.read_meta(explicit)
    assert "calibration" not in d_meta["compression"] and d_meta["config"] == e_meta["config"]
    assert d_meta["config"]["density"] == 0.2 and d_meta["config"]["alpha"] == 1.0
    with pytest.raises(DeltatuneError, match="pass calibrate=DATA"):
        dt.compress(lora, tmp_path / "x", densities=[0.1])


@pytest.mark.parametrize(("options", "message"), [
    ({"tolerance": -1}, "tolerance=-1 must be a number >= 0"), ({"dev_size": 0}, "dev_size=0"),
    ({"density": 0.1, "densities": [0.2]}, "density .one. or densities"), ({"alphas": []}, "alphas=.. must be"),
    ({"densities": [0.1, 2.0]}, r"densities=\[0.1, 2.0\]"), ({"min_ratio": 0.5}, "min_ratio=0.5 must be a number >= 1"),
])
def test_bad_calibration_options_are_refused_before_anything_loads(options: dict, message: str,
                                                                   tmp_path: Path) -> None:
    with pytest.raises(DeltatuneError, match=message):
        dt.compress(tmp_path / "missing", tmp_path / "c", calibrate={"name": "tweets"}, **options)


def test_cli_prints_the_curve_and_writes_only_the_artifact(word_run, lora: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["compress", str(lora), "--out", str(tmp_path / "c"), "--calibrate", "--data", word_run[1],
            "--set", "data.labels=[negative, positive]", "--set", "max_length=16", "--set", "eval_fraction=0.25",
            "--set", "max_train=24", "--alphas", "1,2", "--densities", "0.1,0.2", "--scope", "tensor"]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    cal = artifact.read_meta(tmp_path / "c")["compression"]["calibration"]
    assert cal["grid"] == {"scopes": ["tensor"], "densities": [0.1, 0.2], "alphas": [1.0, 2.0]}
    assert "uncompressed" in result.stdout and "chosen (" in result.stdout and "dev accuracy" in result.stdout
    assert f"{cal['reference']['score']:.2%}" in result.stdout
    assert "warning: the dev split has 12 examples" in result.stderr
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted([artifact.META_FILE, artifact.TENSOR_FILE])
    json.dumps(cal)  # the record is plain JSON
    for extra in (["--data", word_run[1]], ["--min-ratio", "10"]):
        refused = runner.invoke(app, ["compress", str(lora), "--out", str(tmp_path / "d"), *extra])
        assert refused.exit_code == 2 and "add --calibrate" in refused.stderr and not (tmp_path / "d").exists()
