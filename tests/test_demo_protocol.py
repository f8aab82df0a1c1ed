"""The demo's protocol (issue 18) on the tiny stand-in of test_demo_report, every run in this process: several
training seeds on one held-out split, reported as mean ± standard error, and a learning rate chosen per row on a dev
split carved from the training data, never from the held-out split."""

from __future__ import annotations

import json
import math
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from test_demo_report import stand_in
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.demo import Row, aggregate, choose_lr, demo, mean_se, parse_lr_grid
from deltatune.cli.main import app
from deltatune.core.artifact import REPORT_MARKER
from deltatune.data.tasks import load_for_task
from deltatune.errors import DeltatuneError
from deltatune.train.config import load_config

# the grid's x3 rate (0.3) makes the loop warn that a run looks diverged: that is what the search is there to see
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:.*looks diverged")]

SEEDS = 3
GRID = "0.05,1,3"


@pytest.fixture(scope="module")
def protocol(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    """LoRA on the stand-in, 3 seeds after a search over 3 rates. 40 steps at lr 0.1 learn the task on some seeds
    and not on others, so the seeds' accuracies (and the rates' dev accuracies) differ."""
    root = tmp_path_factory.mktemp("demo-protocol")
    setup = stand_in(root)
    setup["methods"]["lora"] = Row("lora-minilm", {"steps": 40, "lr": 0.1})
    out = root / "report"
    return demo(setup=setup, out=out, methods=["lora"], seeds=SEEDS, lr_grid=GRID, show=False, isolate=False), out


def table_cells(report_md: str, method: str) -> list[str]:
    """The main table's cells of ``method``'s row."""
    table = report_md.split("| method | trainable params", 1)[1].split("\n\n", 1)[0]
    line = next(x for x in table.splitlines() if x.startswith(f"| {method} |"))
    return [c.strip() for c in line.strip("|").split(" | ")]


def hand_mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def texts(task_part: list[dict], tokenizer: object) -> list[str]:
    return [tokenizer.decode(f["input_ids"], skip_special_tokens=True) for f in task_part]  # type: ignore[attr-defined]


def test_the_table_shows_the_mean_and_standard_error_of_the_seeds(protocol: tuple[list[dict], Path]) -> None:
    rows, out = protocol
    report = (out / "report.md").read_text()
    lora = rows[1]
    assert [s["seed"] for s in lora["seeds"]] == [0, 1, 2]
    mean, se = hand_mean_se([s["accuracy"] for s in lora["seeds"]])
    assert math.isclose(lora["accuracy"], mean, rel_tol=1e-12) and math.isclose(lora["accuracy_se"], se, rel_tol=1e-9)
    assert table_cells(report, "lora")[4] == f"{mean:.1%} ± {se:.1%}"
    per_seed = report.split("## Per seed", 1)[1].split("\n## ", 1)[0]
    assert f"| lora | {' | '.join(format(s['accuracy'], '.1%') for s in lora['seeds'])} | {mean:.1%} ± {se:.1%} |" \
        in per_seed
    assert json.loads((out / "rows.json").read_text())[1]["seeds"] == lora["seeds"]  # the per-seed values, kept


def test_each_seed_is_its_own_run_on_the_same_held_out_split(protocol: tuple[list[dict], Path]) -> None:
    """The seeds change training only: one data section (split, subsample) for every seed, its own training
    seed, its own artifact, whose accuracy on the held-out split is the one the row lists for it."""
    rows, out = protocol
    lora = rows[1]
    configs = [yaml.safe_load((out / s["config_file"]).read_text()) for s in lora["seeds"]]
    assert [c["train"]["seed"] for c in configs] == [0, 1, 2]
    assert all(c["data"] == configs[0]["data"] for c in configs) and configs[0]["data"]["seed"] == 0
    for seen, config in zip(lora["seeds"], configs, strict=True):
        assert Path(seen["artifact"]) == out / "artifacts" / f"lora-seed{seen['seed']}"
        assert config["train"]["lr"] == lora["lr_search"]["chosen_lr"]
        assert dt.eval(seen["artifact"], config["data"])["accuracy"] == pytest.approx(seen["accuracy"], rel=1e-9)


def test_the_dev_split_is_training_data_apart_from_what_the_search_trains_on(
        protocol: tuple[list[dict], Path]) -> None:
    """By content: the dev examples the search scores on are none of the held-out examples the table reports and
    none of the examples the search trains on; all of them come from the reported runs' training split."""
    rows, out = protocol
    search = rows[1]["lr_search"]
    reported = load_config(out / rows[1]["seeds"][0]["config_file"])
    _, tok, task = load_for_task(reported.data, reported.model)
    held, train = texts(task.eval, tok), texts(task.train, tok)
    for run in search["runs"]:
        config = load_config(out / run["config_file"])
        assert config.train.lr == pytest.approx(run["multiplier"] * 0.1, rel=1e-9)
        _, tok, searched = load_for_task(config.data, config.model)
        dev, search_train = texts(searched.eval, tok), texts(searched.train, tok)
        assert len(set(dev)) == len(dev) == search["dev_examples"] == len(held)
        assert len(search_train) == search["train_examples"] > 0
        assert not set(dev) & set(held) and not set(dev) & set(search_train)
        assert not set(search_train) & set(held)
        assert set(dev) | set(search_train) <= set(train)  # no max_train here: the training split is every other row


def test_the_chosen_rate_is_the_best_on_the_dev_split(protocol: tuple[list[dict], Path]) -> None:
    rows, out = protocol
    search = rows[1]["lr_search"]
    dev = {r["multiplier"]: r["dev_accuracy"] for r in search["runs"]}
    assert sorted(dev) == [0.05, 1.0, 3.0] and all(a is not None for a in dev.values())
    best = max(dev.values())
    assert dev[search["chosen_multiplier"]] == best
    if dev[1.0] == best:
        assert search["chosen_multiplier"] == 1.0  # a tie goes to the preset's rate
    assert search["chosen_lr"] == pytest.approx(0.1 * search["chosen_multiplier"], rel=1e-9)
    for accuracy in dev.values():  # scored on whole dev examples
        assert accuracy * search["dev_examples"] == pytest.approx(round(accuracy * search["dev_examples"]))
    section = (out / "report.md").read_text().split("## Learning-rate search", 1)[1].split("\n## ", 1)[0]
    assert "| lora | " + " | ".join(f"{r['lr']:g}: {r['dev_accuracy']:.1%}" for r in search["runs"]) in section
    assert not (out / "lr-search" / "artifacts").exists()  # the search keeps its dev accuracies, not its deltas


def test_choose_lr_breaks_ties_towards_the_presets_rate() -> None:
    def runs(*pairs: tuple[float, float | None]) -> list[dict]:
        return [{"multiplier": m, "lr": m * 1e-3, "dev_accuracy": a} for m, a in pairs]

    assert choose_lr(runs((0.5, 0.7), (1.0, 0.6), (2.0, 0.8)))["multiplier"] == 2.0
    assert choose_lr(runs((0.5, 0.8), (1.0, 0.8), (2.0, 0.8)))["multiplier"] == 1.0
    assert choose_lr(runs((0.25, 0.8), (0.5, 0.8), (4.0, 0.8)))["multiplier"] == 0.5  # nearest to x1
    assert choose_lr(runs((0.5, 0.8), (2.0, 0.8)))["multiplier"] == 0.5  # as near: the lower
    assert choose_lr(runs((0.5, None), (2.0, 0.55)))["multiplier"] == 2.0  # a failed rate is not a candidate
    assert choose_lr(runs((0.5, None), (2.0, None))) is None


def test_aggregate_is_the_mean_and_standard_error_of_the_seeds() -> None:
    def run(accuracy: float, loss: float, peak: int) -> dict:
        return {"accuracy": accuracy, "eval_loss": loss, "seconds_per_step": 0.5, "peak_memory_bytes": peak,
                "steps": 8, "artifact": f"a{accuracy}", "config_file": "c", "seconds": 1.0}

    runs = [run(0.5, 0.9, 10), run(0.75, 0.6, 30), run(0.625, 0.7, 20)]
    row = aggregate(runs, [4, 5, 6])
    assert row["accuracy"] == pytest.approx(0.625, rel=1e-12)
    assert row["accuracy_se"] == pytest.approx(0.125 / math.sqrt(3), rel=1e-12)  # sample sd 0.125, n = 3
    assert row["eval_loss"] == pytest.approx(2.2 / 3, rel=1e-12) and row["seconds_per_step_se"] == 0
    assert row["peak_memory_bytes"] == 30 and row["artifact"] == "a0.5" and [s["seed"] for s in row["seeds"]] == [4, 5, 6]
    assert mean_se([1.0, 3.0]) == (2.0, 1.0)
    assert aggregate(runs[:1], [0]) is runs[0]  # one seed: the run as it is, no ± anywhere


def test_bad_protocol_options() -> None:
    assert parse_lr_grid("0.5, 1x, 2") == [0.5, 1.0, 2.0] and parse_lr_grid([2, 0.5]) == [0.5, 2.0]
    assert parse_lr_grid(None) is None
    for grid in ("1", "1,1", "0,1", "-1,1", "a,1", "nan,1"):
        with pytest.raises(DeltatuneError, match="lr_grid"):
            parse_lr_grid(grid)
    for seeds in (0, -1, 1.5, True):
        with pytest.raises(DeltatuneError, match="seeds"):
            demo(quick=True, seeds=seeds, show=False)
    with pytest.raises(DeltatuneError, match="lr_grid"):
        demo(quick=True, lr_grid="2", show=False)


def test_a_label_word_demo_runs_its_baseline_once_and_searches_on_its_prompt(
        word_run: tuple[str, str], tmp_path: Path) -> None:
    """The default demo's shape (a causal LM scoring label words after a prompt) with max_train / max_eval: the
    zero-shot row does not depend on the seed and runs once; the search reads its pool with the same prompt and
    labels, trains on as many examples as a reported run, and scores on as many as the held-out split holds."""
    folder, path = word_run
    setup = {"title": "a tiny Llama scoring label words", "model": folder,
             "data": {"path": path, "task": "classification", "labels": ["negative", "positive"], "max_length": 16,
                      "eval_fraction": 0.25, "max_train": 24, "max_eval": 8},
             "batch_size": 4, "eval_batch_size": 16, "baseline": "zero-shot", "eval_points": 1,
             "methods": {"lora": Row("lora", {"steps": 4})}}
    out = tmp_path / "report"
    rows = demo(setup=setup, out=out, methods="lora", seeds=2, lr_grid="0.5,2", show=False, isolate=False)
    assert "seeds" not in rows[0] and [s["seed"] for s in rows[1]["seeds"]] == [0, 1]
    assert "zero-shot: the same for every seed" in (out / "report.md").read_text()
    search = rows[1]["lr_search"]
    reported = load_config(out / rows[1]["seeds"][0]["config_file"])
    _, _, task = load_for_task(reported.data, reported.model)
    held, train = ({tuple(f["input_ids"]) for f in part} for part in (task.eval, task.train))
    config = load_config(out / search["runs"][0]["config_file"])
    assert config.data.resolved_prompt() == reported.data.resolved_prompt() and config.data.labels == ["negative",
                                                                                                      "positive"]
    _, _, searched = load_for_task(config.data, config.model)
    dev, search_train = ({tuple(f["input_ids"]) for f in part} for part in (searched.eval, searched.train))
    assert len(dev) == len(searched.eval) == search["dev_examples"] == len(task.eval) == 8
    assert len(searched.train) == search["train_examples"] == len(task.train) == 24
    assert not dev & held and not dev & search_train and not search_train & held


def test_a_dpo_row_is_scored_by_label_word_accuracy_on_the_same_splits(word_run: tuple[str, str],
                                                                       tmp_path: Path) -> None:
    """A row trained with DPO on pairs built from the labels (issue 21): its search trains on pairs of the search's
    training tweets and is judged by the label-word accuracy on the same dev tweets as a classification row; each
    seed's accuracy is its saved delta's label-word accuracy on the held-out tweets, and DPO's own held-out metrics
    (the reward margin) stay in the run's summary."""
    folder, path = word_run
    setup = {"title": "a tiny Llama scoring label words", "model": folder,
             "data": {"path": path, "task": "classification", "labels": ["negative", "positive"], "max_length": 16,
                      "eval_fraction": 0.25, "max_train": 24, "max_eval": 8},
             "batch_size": 4, "eval_batch_size": 16, "baseline": "zero-shot", "eval_points": 1,
             "methods": {"lora": Row("lora", {"steps": 4}),
                         "dpo": Row("lora", {"steps": 4, "objective": {"name": "dpo", "beta": 0.1}},
                                    data={"task": "preference"})}}
    out = tmp_path / "report"
    rows = demo(setup=setup, out=out, methods="lora,dpo", seeds=2, lr_grid="0.5,2", show=False, isolate=False)
    sft, dpo = rows[1]["lr_search"], rows[2]["lr_search"]
    searched = [load_config(out / s["runs"][0]["config_file"]) for s in (sft, dpo)]
    assert searched[1].data.task == "preference" and searched[1].data.pairs_from_labels
    assert searched[1].train.objective["name"] == "dpo"
    _, tokenizer, dev_sft = load_for_task(searched[0].data, searched[0].model)
    _, _, dev_dpo = load_for_task(searched[1].data, searched[1].model)
    # the same dev tweets: each classification dev prompt is a DPO dev pair's prompt
    assert sorted(tuple(f["input_ids"]) for f in dev_sft.eval) == sorted(tuple(f["prompt_ids"]) for f in dev_dpo.eval)
    assert all(r["dev_accuracy"] is not None for r in dpo["runs"])
    seed = rows[2]["seeds"][0]
    reported = load_config(out / seed["config_file"])
    scored = dt.eval(out / seed["artifact"], {**yaml.safe_load((out / seed["config_file"]).read_text())["data"],
                                               "task": "classification"}, batch_size=16)
    assert reported.data.task == "preference" and seed["accuracy"] == scored["accuracy"]
    kept = json.loads((out / "runs" / "dpo-seed0.json").read_text())["result"]["summary"]["final"]
    assert "eval_rewards/margins" in kept and kept["eval_accuracy"] == scored["accuracy"]
    # the report's command evaluates what the table shows: the label-word accuracy
    line = next(x for x in (out / "report.md").read_text().splitlines() if x.startswith("deltatune eval")
                and "dpo-seed0" in x)
    result = CliRunner().invoke(app, shlex.split(line)[1:])
    assert result.exit_code == 0, result.output
    assert f"{scored['accuracy']:.4f}" in result.output


def test_resume_reuses_kept_runs_and_reruns_what_changed_or_is_gone(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A long protocol stopped part-way continues run by run: with resume, a run whose spec and artifact are kept
    is not made again (the same numbers come back); a run whose artifact is gone, or whose config changed, is."""
    from deltatune.cli import demo as demo_module

    setup = stand_in(tmp_path)
    setup["methods"]["lora"] = Row("lora-minilm", {"steps": 4, "lr": 2e-2})
    out = tmp_path / "report"

    def run(**options: object) -> list[dict]:
        return demo(setup=setup, out=out, methods=["lora"], seeds=2, lr_grid="0.5,2", show=False, isolate=False,
                    **options)

    first = run(resume=True)
    made: list[str] = []
    real = demo_module._run_worker
    monkeypatch.setattr(demo_module, "_run_worker", lambda spec, *a: made.append(spec["label"]) or real(spec, *a))
    again = run(resume=True)
    assert made == [] and [s["accuracy"] for s in again[1]["seeds"]] == [s["accuracy"] for s in first[1]["seeds"]]
    assert again[1]["lr_search"]["runs"] == first[1]["lr_search"]["runs"]

    shutil.rmtree(out / "artifacts" / "lora-seed1")
    run(resume=True)
    assert made == ["lora-seed1"]  # only the run whose artifact is gone

    made.clear()
    setup["methods"]["lora"] = Row("lora-minilm", {"steps": 3, "lr": 2e-2})
    run(resume=True)
    lora_runs = ["lora lr 0.01", "lora lr 0.04", "lora-seed0", "lora-seed1"]
    assert sorted(m for m in made if m.startswith("lora")) == lora_runs  # the config changed: every run again

    made.clear()
    run()
    assert sorted(m for m in made if m.startswith("lora")) == lora_runs  # without resume: every run is made again
    assert made.count("untrained head") == 2  # a fresh head per training seed


def test_the_baseline_is_the_same_run_whichever_row_comes_first() -> None:
    """The zero-shot evaluation does not depend on the first row's method or training settings, so demos of
    different rows into one folder reuse it (``--resume``)."""
    from deltatune.cli.demo import DEFAULT_SETUP, ZERO_SHOT, _spec_key, run_config

    def spec(first: str, seed: int = 0) -> dict:
        return {"kind": ZERO_SHOT, "config": run_config(DEFAULT_SETUP, first, train_seed=seed), "label": "zero-shot"}

    assert _spec_key(spec("lora")) == _spec_key(spec("full"))
    assert _spec_key(spec("lora")) != _spec_key(spec("lora", seed=1))  # a fresh head would differ per seed
    trained = [{"kind": "train", "config": run_config(DEFAULT_SETUP, name)} for name in ("lora", "full")]
    assert _spec_key(trained[0]) != _spec_key(trained[1])


def test_a_run_killed_part_way_leaves_nothing_that_stops_the_next_one(tmp_path: Path) -> None:
    """A search run killed part-way leaves its output folder (logs) behind; the next demo into the folder makes the
    run afresh instead of failing on a folder that is not empty (and keeping that failure as the row's)."""
    setup = stand_in(tmp_path)
    setup["methods"]["lora"] = Row("lora-minilm", {"steps": 2, "lr": 2e-2})
    out = tmp_path / "report"
    for stem in ("lora-x0.5", "lora-x2"):
        (out / "lr-search" / "artifacts" / stem / "logs").mkdir(parents=True)
    (out / "artifacts" / "lora").mkdir(parents=True)
    (out / "artifacts" / "lora" / "stale.txt").write_text("from a killed run")
    (out / REPORT_MARKER).write_text(json.dumps({"writer": "deltatune demo"}))  # written as the killed demo began
    rows = demo(setup=setup, out=out, methods=["lora"], lr_grid="0.5,2", show=False, isolate=False, resume=True)
    assert all(r["dev_accuracy"] is not None for r in rows[1]["lr_search"]["runs"]) and rows[1]["accuracy"] is not None
    assert not (out / "artifacts" / "lora" / "stale.txt").exists()


def test_a_failed_baseline_kept_in_the_folder_is_made_again(tmp_path: Path) -> None:
    """A zero-shot run that failed stops the demo; with resume it is made again, not repeated from its kept error
    (a DPO row first in a fresh folder left such a failure behind until the baseline was fixed)."""
    setup = stand_in(tmp_path)
    setup["methods"]["lora"] = Row("lora-minilm", {"steps": 2, "lr": 2e-2})
    out = tmp_path / "report"
    first = demo(setup=setup, out=out, methods=["lora"], show=False, isolate=False, resume=True)
    for kept_run in (out / "runs").glob("zero-shot-seed*.json"):
        kept = json.loads(kept_run.read_text())
        kept["result"] = {"error": "bad run config: from an older version"}
        kept_run.write_text(json.dumps(kept))
    again = demo(setup=setup, out=out, methods=["lora"], show=False, isolate=False, resume=True)
    assert again[0]["accuracy"] == first[0]["accuracy"] and again[1]["accuracy"] == first[1]["accuracy"]
