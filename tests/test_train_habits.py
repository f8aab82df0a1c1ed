"""Trainer / axolotl habits in the native loop: ``train.epochs``, early stopping that ends with the best delta,
``train.report_to`` and the metrics streamed while the run runs, the learning rate each step used."""

from __future__ import annotations

import csv
import importlib.machinery
import json
import os
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import word_run_config

import deltatune as dt
from deltatune.train import Callback
from deltatune.train import loop as loop_module
from deltatune.train.callbacks import ProgressBar
from deltatune.train.config import EarlyStopping, TrainSettings
from deltatune.train.early_stopping import Stopper
from deltatune.train.loop import lr_lambda, run_length
from deltatune.train.state import checkpoints, load_checkpoint

LORA = {"name": "lora", "r": 2, "alpha": 4}
N_TRAIN, BATCH = 36, 4  # the word_run data: 48 rows, a quarter held out


def jsonl(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(out: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


# -- train.epochs -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("epochs", "grad_accum", "world", "steps"), [
    (1, 1, 1, 9), (0.5, 1, 1, 5), (2, 1, 1, 18), (1, 2, 1, 5), (3, 4, 1, 7), (1, 1, 2, 4), (0.01, 1, 1, 1),
])
def test_epochs_become_enough_steps_to_see_every_example_that_often(epochs, grad_accum, world, steps) -> None:
    s = TrainSettings(epochs=epochs, batch_size=BATCH, grad_accum=grad_accum)
    assert run_length(s, N_TRAIN, world) == steps
    # the invariant: the fewest steps whose micro-batches cover `epochs` passes over the full batches of the split
    per_pass = N_TRAIN // (BATCH * world)
    assert steps * grad_accum >= epochs * per_pass > (steps - 1) * grad_accum or steps == 1
    assert run_length(TrainSettings(steps=7), N_TRAIN) == 7, "without epochs, steps is the length"


class Streamed(Callback):
    """What ``logs/metrics.jsonl`` holds when each step ends: the metrics must be on disk as the run goes."""

    def __init__(self, out: Path) -> None:
        self.out, self.seen = out, []

    def on_step_end(self, record: dict[str, Any]) -> None:
        self.seen.append([r["step"] for r in jsonl(self.out)])


def test_an_epochs_run_reports_as_it_goes(word_run, tmp_path) -> None:
    out = tmp_path / "run"
    cfg = word_run_config(word_run, LORA, out, epochs=0.5, eval_every=2, report_to=["csv", "tensorboard"],
                          schedule="linear", warmup=1)
    del cfg["train"]["steps"]
    streamed = Streamed(out)
    summary = dt.train(cfg, callbacks=[streamed])
    history = summary["history"]

    assert summary["steps"] == 5 and [r["step"] for r in history] == [1, 2, 3, 4, 5]
    assert [r["epoch"] for r in history] == [round(k * BATCH / N_TRAIN, 4) for k in range(1, 6)]
    assert summary["epochs"] == history[-1]["epoch"]
    assert streamed.seen == [list(range(1, k + 1)) for k in range(1, 6)], "one line per step, written as it ends"
    assert jsonl(out) == history
    with open(out / "logs" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert [float(r["loss"]) for r in rows] == [r["loss"] for r in history]
    assert [r["eval_loss"] != "" for r in rows] == [False, True, False, True, True]
    losses = tensorboard_scalars(out, "train/loss")
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose([v for _, v in losses], [r["loss"] for r in history], rtol=1e-6)
    assert [s for s, _ in tensorboard_scalars(out, "eval/loss")] == [2, 4, 5]
    assert json.loads((out / "logs" / "metrics.json").read_text())["steps"] == 5, "metrics.json is still written"


def test_each_record_holds_the_learning_rate_its_step_used(word_run, tmp_path) -> None:
    """A linear schedule reaches 0 after the last step; the last step itself used a small non-zero lr, which is
    what the history and the progress line show."""
    summary = dt.train(word_run_config(word_run, LORA, tmp_path / "run", steps=4, warmup=1, schedule="linear",
                                       save_every=0))
    schedule = lr_lambda(TrainSettings(steps=4, warmup=1, schedule="linear"))
    used = [r["lr"] for r in summary["history"]]
    np.testing.assert_allclose(used, [1e-2 * schedule(i) for i in range(4)], rtol=1e-12)
    assert used[-1] > 0 and schedule(4) == 0.0
    bar = ProgressBar()
    bar.on_begin(4, 0)
    try:
        bar.on_step_end(summary["history"][-1])
        info = bar.bar.tasks[0].fields["info"]
    finally:
        bar.on_end(summary)
    assert f"lr {used[-1]:.2e}" in info and "epoch 0.44" in info


# -- early stopping -----------------------------------------------------------------------------------
def trainers_judgement(values: list[float], patience: int, threshold: float, greater: bool) -> tuple[int, int | None]:
    """(the evaluation at which Trainer stops, 0 = never; the best evaluation), from transformers' own
    EarlyStoppingCallback and Trainer._determine_best_metric, called in Trainer's order."""
    from transformers import EarlyStoppingCallback, Trainer, TrainerControl, TrainerState
    from transformers.trainer_utils import SaveStrategy

    args = types.SimpleNamespace(metric_for_best_model="eval_loss", greater_is_better=greater,
                                 save_strategy=SaveStrategy.STEPS, load_best_model_at_end=True)
    trainer = types.SimpleNamespace(args=args, state=TrainerState())
    callback, control = EarlyStoppingCallback(patience, threshold), TrainerControl()
    for i, value in enumerate(values, 1):
        trainer.state.global_step = i
        callback.on_evaluate(args, trainer.state, control, {"eval_loss": value})
        Trainer._determine_best_metric(trainer, {"eval_loss": value}, None)
        if control.should_training_stop:
            return i, trainer.state.best_global_step
    return 0, trainer.state.best_global_step


def ours(values: list[float], patience: int, threshold: float, greater: bool) -> tuple[int, int | None]:
    stopper = Stopper(EarlyStopping(metric="loss", patience=patience, threshold=threshold,
                                    mode="max" if greater else "min"))
    for i, value in enumerate(values, 1):
        if stopper.judge({"step": i, "eval_loss": value}).stop:
            return i, stopper.best_step
    return 0, stopper.best_step


@pytest.mark.parametrize("patience", [1, 2, 3])
@pytest.mark.parametrize("threshold", [0.0, 0.05])
@pytest.mark.parametrize("greater", [False, True])
def test_early_stopping_judges_as_trainer_does(patience, threshold, greater) -> None:
    g = torch.Generator().manual_seed(patience * 10 + int(threshold * 100) + greater)
    for _ in range(20):
        walk = (torch.randn(12, generator=g, dtype=torch.float64) * 0.05).cumsum(0) + 1.0
        values = [round(v, 3) for v in walk.tolist()]  # ties happen too
        assert ours(values, patience, threshold, greater) == trainers_judgement(values, patience, threshold, greater)


class ScriptedEval(Callback):
    """Evaluations that report ``script[step]`` as the loss (the run evaluates every step): a run whose metric
    turns when the test says. A resumed run starts counting at the step it resumes from."""

    def __init__(self, script: dict[int, float]) -> None:
        self.script, self.step = script, 0

    def on_begin(self, total_steps: int, start_step: int) -> None:
        self.step = start_step

    def evaluate(self, model: torch.nn.Module, batch_size: int = 16) -> dict[str, float]:
        self.step += 1
        return {"loss": self.script[self.step], "accuracy": 0.5}


@pytest.fixture
def scripted(monkeypatch):
    """Install a ``ScriptedEval`` as the run's evaluation; returns a function that makes one for a script."""
    made: list[ScriptedEval] = []
    build = loop_module.build

    def scripted_build(config):
        run = build(config)
        run.task.evaluate = made[-1].evaluate
        return run

    monkeypatch.setattr(loop_module, "build", scripted_build)

    def make(script: dict[int, float]) -> ScriptedEval:
        made.append(ScriptedEval(script))
        return made[-1]

    return make


def delta_of(out: Path, word_run) -> dict[str, torch.Tensor]:
    return dt.load(dt.models.load(word_run[0]), out).deltas.state_dict()


def test_early_stopping_ends_with_the_best_delta_and_keeps_its_checkpoint(word_run, tmp_path, scripted) -> None:
    out = tmp_path / "run"
    cfg = word_run_config(word_run, LORA, out, steps=8, eval_every=1, save_every=0, keep_last=1,
                          early_stopping={"metric": "eval_loss", "patience": 2})
    summary = dt.train(cfg, callbacks=[scripted({1: 1.0, 2: 0.8, 3: 0.85, 4: 0.9, 5: 0.7})])

    assert summary["steps"] == 4, "two evaluations without improvement after step 2 stop the run"
    assert summary["best"] == {"step": 2, "metric": "eval_loss", "value": 0.8, "stopped_early": True}
    assert [p.name for p in checkpoints(out / "checkpoints")] == ["step-0000002", "step-0000004"], \
        "keep_last=1 keeps the newest checkpoint and never the best one less"
    artifact = delta_of(out, word_run)
    best, last = (load_checkpoint(p)["delta"] for p in checkpoints(out / "checkpoints"))
    assert artifact.keys() == best.keys()
    assert all(torch.equal(artifact[k], best[k]) for k in best), "the artifact is the best step's delta"
    assert any(not torch.equal(best[k], last[k]) for k in best), "(the last step's delta differs)"


def test_early_stopping_and_the_streams_resume_as_the_run_went(word_run, tmp_path, scripted) -> None:
    out = tmp_path / "run"
    script = {1: 1.0, 2: 0.9, 3: 0.8, 4: 0.85, 5: 0.9, 6: 0.5}
    cfg = word_run_config(word_run, LORA, out, steps=8, eval_every=1, save_every=2, keep_last=8,
                          early_stopping={"metric": "loss", "patience": 2}, report_to=["csv", "tensorboard"])
    straight = dt.train(cfg, callbacks=[scripted(script)])
    assert straight["steps"] == 5 and straight["best"]["step"] == 3
    uninterrupted = (out / "delta.safetensors").read_bytes()
    for c in checkpoints(out / "checkpoints")[2:]:  # as if the run had died after step 2 (it had logged 5 steps)
        shutil.rmtree(c)

    resumed = dt.train(cfg, resume=True, callbacks=[scripted(script)])

    assert resumed["resumed_from"] == 2 and resumed["best"] == straight["best"]
    assert (out / "delta.safetensors").read_bytes() == uninterrupted, "the same best delta"
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in straight["history"]]
    assert jsonl(out) == resumed["history"], "no step twice in the stream"
    with open(out / "logs" / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5]
    assert [s for s, _ in tensorboard_scalars(out, "train/loss")] == [1, 2, 3, 4, 5]

    again = dt.train(cfg, resume=True, callbacks=[scripted(script)])  # a run that stopped early stays stopped
    assert again["steps"] == 5 and (out / "delta.safetensors").read_bytes() == uninterrupted


def test_a_metric_the_evaluation_lacks_is_named(word_run, tmp_path) -> None:
    cfg = word_run_config(word_run, LORA, tmp_path / "run", steps=2, eval_every=1,
                          early_stopping={"metric": "f1"})
    with pytest.raises(dt.DeltatuneError, match=r"train.early_stopping.metric='eval_f1' is not among the "
                                                r"evaluation's metrics \(eval_accuracy, eval_loss\)"):
        dt.train(cfg)


# -- W&B, through its package -------------------------------------------------------------------------
class FakeWandbRun:
    def __init__(self, calls: list) -> None:
        self.id, self.calls = "run-1", calls

    def log(self, metrics: dict, step: int) -> None:
        self.calls.append(("log", step, sorted(metrics)))

    def finish(self, exit_code: int = 0) -> None:
        self.calls.append(("finish", exit_code))


def test_wandb_gets_every_step_when_installed(word_run, tmp_path, monkeypatch) -> None:
    calls: list = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw["project"], kw["config"]["train"]["lr"])) or FakeWandbRun(calls)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    dt.train(word_run_config(word_run, LORA, tmp_path / "run", steps=2, report_to="wandb"))
    assert calls[0] == ("init", "deltatune", 1e-2)
    assert calls[1] == ("log", 1, ["train/epoch", "train/loss", "train/lr", "train/seconds", "train/tokens",
                                   "train/tokens_per_s"])
    assert calls[2][:2] == ("log", 2) and "eval/loss" in calls[2][2]
    assert calls[3] == ("finish", 0)
    assert len(calls) == 4


class FailAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, record: dict[str, Any]) -> None:
        if record["step"] == self.step:
            raise dt.DeltatuneError(f"stopped at step {self.step}")


def test_a_failed_run_leaves_the_streams_where_resume_continues(word_run, tmp_path) -> None:
    """Cut back to the newest checkpoint; a fresh run that wrote none leaves its folder as it found it, so running it
    again is not refused as a used folder."""
    out = tmp_path / "run"
    cfg = word_run_config(word_run, LORA, out, steps=6, save_every=2, report_to=["csv", "tensorboard"])
    with pytest.raises(dt.DeltatuneError, match="stopped at step 3"):
        dt.train(cfg, callbacks=[FailAt(3)])
    assert [r["step"] for r in jsonl(out)] == [1, 2]
    with open(out / "logs" / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2]

    fresh = tmp_path / "fresh"
    with pytest.raises(dt.DeltatuneError, match="stopped at step 1"):
        dt.train({**cfg, "output": str(fresh)}, callbacks=[FailAt(1)])
    assert not [p for p in fresh.rglob("*") if p.is_file()], "no file of a failed run without a checkpoint"
    assert dt.train({**cfg, "output": str(fresh)})["steps"] == 6, "and the same run starts there again"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the resident set (Linux)")
def test_the_heap_freed_by_a_step_is_handed_back_on_a_cpu(word_run, tmp_path, monkeypatch) -> None:
    """``train.trim_memory`` (off by default: it costs step time): after each CPU step the heap's free pages go back
    to the system, so a step's freed tensors do not stay resident; off, nothing is trimmed. And the trim itself
    returns freed memory."""
    from deltatune.train import loop

    calls: list[int] = []
    real = loop.release_freed_memory
    monkeypatch.setattr(loop, "release_freed_memory", lambda: calls.append(1) or real())
    dt.train(word_run_config(word_run, LORA, tmp_path / "on", steps=3, save_every=0, trim_memory=True))
    assert len(calls) == 3
    calls.clear()
    dt.train(word_run_config(word_run, LORA, tmp_path / "off", steps=3, save_every=0))
    assert calls == []

    def resident() -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    if loop._malloc_trim() is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        pytest.skip("not glibc's default heap")
    # 2,048 blocks of 64 KiB (under glibc's mmap threshold: heap memory), then one more that keeps them off the heap's
    # top (which glibc would shrink by itself): freed, they stay resident until trimmed
    blocks = [torch.ones(2**14) for _ in range(2048)]
    pin = torch.ones(2**14)
    held = resident()
    del blocks
    assert resident() > held - 16 * 2**20  # freed, still resident
    loop.release_freed_memory()
    assert resident() < held - 96 * 2**20  # most of the 128 MiB is handed back
    del pin
