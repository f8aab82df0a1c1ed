"""``deltatune search --refit K`` and ``search.pruner``: the front's chosen configurations trained again with seeds
(mock runner), intermediate evaluations judged by optuna's pruner (mock runner, and a real trial process that streams
them), pruned trials recorded as pruned."""

from __future__ import annotations

import json
import math
import statistics
import textwrap
import time
from pathlib import Path

import pytest
from test_search import config as search_config
from test_search import mock

import deltatune as dt
from deltatune.api import config_problems
from deltatune.ops import search as search_ops
from deltatune.ops.search_refit import chosen
from deltatune.ops.search_run import isolated


def test_refit_trains_the_fronts_best_again_with_seeds_on_the_full_data(sentiment_file: Path, tmp_path: Path) -> None:
    calls: list[dict] = []

    def runner(config: dict, folder: Path) -> dict:
        calls.append(config)
        out = mock(config, folder)
        if "refit" in folder.parts:  # the refit's score moves with the seed, as a real run's does
            out["metrics"]["accuracy"] += 0.01 * config["train"]["seed"]
        return out

    cfg = search_config(sentiment_file, 10, startup=4, refit_seeds=3)
    cfg["train"]["seed"] = 5
    study = dt.search(cfg, tmp_path / "s", runner=runner, refit=2)
    spec = search_ops.prepare(cfg, config_problems)
    rows = search_ops.front_rows(study, spec)
    record = json.loads((tmp_path / "s" / "refit.json").read_text())
    picked = [c["trial"] for c in record["configurations"]]
    best = sorted(rows, key=lambda r: (-r["objectives"]["accuracy"], r["objectives"]["trainable"], r["trial"]))
    assert picked == [r["trial"] for r in best[:2]] == [r["trial"] for r in chosen(rows, spec, 2)]
    refits = calls[10:]
    assert len(refits) == 6  # 2 configurations x 3 seeds
    assert [c["train"]["seed"] for c in refits] == [5, 6, 7, 5, 6, 7]
    assert all(c["data"]["path"] == str(sentiment_file) for c in refits)  # its own data, not the search's pool
    assert all(c["data"].get("eval_fraction") == 0.25 for c in refits)  # scored on the config's eval split
    for conf in record["configurations"]:
        accs = [r["metrics"]["accuracy"] for r in conf["runs"]]
        mean, se = conf["summary"]["accuracy"]["mean"], conf["summary"]["accuracy"]["se"]
        assert mean == pytest.approx(statistics.fmean(accs)) and se == pytest.approx(statistics.stdev(accs) / math.sqrt(3))
        assert conf["summary"]["trainable"]["se"] == 0.0 and conf["summary"]["failed"] == 0
        assert conf["config"]["method"]["name"] in ("lora", "adapter")
    # refit again (a resumed search): every finished run is reused, nothing trains
    calls.clear()
    dt.search(cfg, tmp_path / "s", runner=runner, refit=2, resume=True)
    assert calls == []


def test_refit_through_the_cli_prints_mean_and_standard_error(sentiment_file: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml
    from typer.testing import CliRunner

    from deltatune import api
    from deltatune.cli.main import app

    real = api.search
    monkeypatch.setattr(api, "search", lambda *a, **k: real(*a, **{**k, "runner": mock}))
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(search_config(sentiment_file, 6, startup=3, refit_seeds=2)))
    result = CliRunner().invoke(app, ["search", str(path), "--out", str(tmp_path / "s"), "--refit", "1"])
    assert result.exit_code == 0, result.output
    assert "Refit: the front's 1 best by accuracy, 2 seeds each" in result.output and " ± " in result.output
    assert (tmp_path / "s" / "refit.json").is_file()


# -- pruning -------------------------------------------------------------------------------------------------------
def curve(config: dict) -> list[float]:
    """The mock's dev accuracy after each of 4 evaluations: it approaches the final accuracy of ``mock``."""
    final = mock(config, Path("."))["metrics"]["accuracy"]
    return [final * (1 - 0.5 ** (k + 1)) for k in range(4)]


def test_a_median_pruner_stops_lagging_trials_and_records_them_pruned(sentiment_file: Path, tmp_path: Path) -> None:
    reported: list[list[int]] = []

    def runner(config: dict, folder: Path, report=None) -> dict:
        steps = []
        for step, value in enumerate(curve(config), start=1):
            steps.append(step)
            if report is not None and report(step, {"accuracy": value, "loss": 1 - value}):
                reported.append(steps)
                return {"pruned": step}
        reported.append(steps)
        return mock(config, folder)

    cfg = search_config(sentiment_file, 14, startup=3, pruner="median", sampler="random")
    cfg["train"].update(eval_every=1, steps=4)
    study = dt.search(cfg, tmp_path / "s", runner=runner)
    states = [t.state.name for t in study.trials]
    assert len(states) == 14 and "PRUNED" in states and "COMPLETE" in states  # pruned trials count as trials
    assert states[:3] == ["COMPLETE"] * 3  # the median needs finished trials first
    for t, steps in zip(study.trials, reported, strict=True):
        if t.state.name == "PRUNED":
            assert t.user_attrs["pruned_at"] == steps[-1]  # the runner stopped where the pruner said
            assert t.values is None
            # pruned: its value at the step it stopped lagged the median of the finished trials there
            value = dict(t.user_attrs["intermediate"])[steps[-1]]
            done = [dict(d.user_attrs["intermediate"])[steps[-1]] for d in study.trials[: t.number]
                    if d.state.name == "COMPLETE"]
            assert value < statistics.median(done)
    csv_text = (tmp_path / "s" / "trials.csv").read_text()
    assert ",pruned," in csv_text
    spec = search_ops.prepare(cfg, config_problems)
    assert all(r["trial"] in {t.number for t in study.trials if t.state.name == "COMPLETE"}
               for r in search_ops.front_rows(study, spec))  # the front is made of finished trials only


def test_hyperband_runs_and_a_pruner_needs_evaluations_and_a_metric(sentiment_file: Path, tmp_path: Path) -> None:
    def runner(config: dict, folder: Path, report=None) -> dict:
        for step, value in enumerate(curve(config), start=1):
            if report is not None and report(step, {"accuracy": value}):
                return {"pruned": step}
        return mock(config, folder)

    cfg = search_config(sentiment_file, 8, startup=2, pruner="hyperband")
    cfg["train"].update(eval_every=1, steps=4)
    study = dt.search(cfg, tmp_path / "hb", runner=runner)
    assert len([t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]) == 8
    bad = search_config(sentiment_file, 8, pruner="sometimes", objectives={"trainable": "minimize"})
    with pytest.raises(dt.DeltatuneError) as e:
        dt.search(bad, tmp_path / "bad", runner=runner)
    assert "search.pruner='sometimes'" in str(e.value)
    bad = search_config(sentiment_file, 8, pruner="median", objectives={"trainable": "minimize",
                                                                        "accuracy": "maximize"})
    with pytest.raises(dt.DeltatuneError) as e:
        dt.search(bad, tmp_path / "bad", runner=runner)
    assert "first objective (trainable) must be a dev metric" in str(e.value)
    assert "train.eval_every=None" in str(e.value)


TARGET = textwrap.dedent("""
    import time
    from deltatune.ops.search_run import report_intermediate

    def slow_trial(config):
        for step in range(1, 6):
            report_intermediate(step, {"accuracy": 0.1 * step})
            time.sleep(0.4)
        return {"metrics": {"accuracy": 0.5}, "trainable": 1}
""")


@pytest.mark.slow  # starts trial processes (each imports transformers): ~15 s on a busy 2-core machine
def test_a_trial_process_streams_its_evaluations_and_is_terminated_when_pruned(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "streaming_trial.py").write_text(TARGET)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    runner = isolated("streaming_trial:slow_trial")
    seen: list[tuple[int, float]] = []

    def report(step: int, metrics: dict) -> bool:
        seen.append((step, metrics["accuracy"]))
        return step == 2

    start = time.monotonic()
    result = runner({}, tmp_path / "t", report=report)
    assert result["pruned"] == 2 and seen == [(1, 0.1), (2, 0.2)]
    assert [line["step"] for line in result["intermediate"]] == [1, 2]
    assert time.monotonic() - start < 30
    # unpruned, it runs to the end and every evaluation came back while it ran
    seen.clear()
    result = runner({}, tmp_path / "u", report=lambda s, m: seen.append(s) or False)
    assert result == {"metrics": {"accuracy": 0.5}, "trainable": 1} and seen == [1, 2, 3, 4, 5]
