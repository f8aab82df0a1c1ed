"""The training loop: config validation, schedules, policies, checkpoints and exact resume."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deltatune as dt
from deltatune.train import Callback, load_config, preset_names
from deltatune.train.config import PRESETS_DIR, TrainSettings
from deltatune.train.loop import FAULT_ENV, Batches, lr_lambda, sync_optimizer
from deltatune.train.step import PolicyStep


def config(folder: Path, data: Path, out: Path, **train) -> dict:
    return {
        "model": str(folder),
        "data": {"path": str(data), "task": "classification", "max_length": 32, "eval_fraction": 0.25,
                 "labels": ["negative", "positive"]},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
        "train": {"steps": 6, "batch_size": 4, "lr": 1e-2, "warmup": 0.2, "save_every": 2, "eval_every": 3,
                  "progress": False, **train},
        "output": str(out),
    }


def test_one_error_lists_every_bad_field(tiny_folder, sentiment_file, tmp_path) -> None:
    raw = config(tiny_folder, sentiment_file, tmp_path / "o")
    raw["trian"] = {}
    raw["train"]["lr"] = -1.0
    raw["train"]["scheduel"] = "cosine"
    raw["method"]["alpah"] = 3
    with pytest.raises(dt.DeltatuneError) as err:
        load_config(raw)
    msg = str(err.value)
    for needle in ("'trian'", "did you mean 'train'", "train.lr=-1.0", "train.scheduel", "did you mean 'schedule'",
                   "alpah", "did you mean 'alpha'"):
        assert needle in msg, needle


def test_overrides_and_yaml(tiny_folder, sentiment_file, tmp_path) -> None:
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config(tiny_folder, sentiment_file, tmp_path / "o")))
    cfg = load_config(path, ["train.steps=3", "method.r=2", "train.schedule=cosine"])
    assert cfg.train.steps == 3 and cfg.method["r"] == 2 and cfg.train.schedule == "cosine"
    with pytest.raises(dt.DeltatuneError, match="key=value"):
        load_config(path, ["train.steps"])


def test_exponents_without_a_dot_are_numbers_in_files_and_overrides(tiny_folder, sentiment_file, tmp_path) -> None:
    """PyYAML (YAML 1.1) reads `1e-4` as a string: `lr: 1e-4`, as papers write it, was refused as not a number."""
    import yaml

    raw = config(tiny_folder, sentiment_file, tmp_path / "o")
    text = yaml.safe_dump(raw).replace("lr: ", "lr: 1e-4 # was ", 1)
    assert "lr: 1e-4 #" in text and yaml.safe_load(text)["train"]["lr"] == "1e-4", "the case PyYAML gets wrong"
    path = tmp_path / "run.yaml"
    path.write_text(text)
    assert load_config(path).train.lr == 1e-4
    assert load_config(path, ["train.lr=3E-5"]).train.lr == 3e-5
    assert load_config(path, ["train.weight_decay=1e-2"]).train.weight_decay == 0.01
    # what is not a number stays text: a name may look like one only in part
    assert load_config(path, ["output=1e"]).output == "1e"


def test_schedules_warm_up_then_decay() -> None:
    lin = lr_lambda(TrainSettings(steps=10, warmup=2, schedule="linear"))
    assert [round(lin(i), 3) for i in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    cos = lr_lambda(TrainSettings(steps=10, warmup=0.0, schedule="cosine"))
    assert cos(0) == 1.0 and abs(cos(5) - 0.5) < 1e-9 and cos(10) == 0.0
    assert lr_lambda(TrainSettings(steps=10, schedule="constant"))(7) == 1.0


def test_batches_resume_at_the_same_position() -> None:
    a = Batches(10, 3, seed=1)
    seen = [a.next() for _ in range(5)]  # crosses an epoch boundary (3 full batches per epoch)
    b = Batches(10, 3, seed=1)
    for _ in range(2):
        b.next()
    c = Batches(10, 3, seed=1)
    c.load_state_dict(b.state_dict())
    assert [c.next() for _ in range(3)] == seen[2:]
    ranks = [Batches(10, 2, seed=1, rank=r, world=2).next() for r in range(2)]
    assert sorted(ranks[0] + ranks[1]) == sorted(Batches(10, 4, seed=1).next())


def test_sync_optimizer_releases_and_adds_state() -> None:
    from conftest import batch, loss_of, tiny_llama

    tuned = dt.attach(tiny_llama(), "lora", r=2, init=False)
    params = list(tuned.deltas.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    loss_of(tuned, batch()).backward()
    opt.step()
    before = {id(p) for p in params}
    params[0].requires_grad_(False)
    now = sync_optimizer(opt, tuned, before)
    assert params[0] not in opt.state and params[1] in opt.state and id(params[0]) not in now
    params[0].requires_grad_(True)
    sync_optimizer(opt, tuned, now)
    assert params[0] not in opt.state, "a parameter that starts again gets fresh moments"


def test_presets_load_by_name(tmp_path, monkeypatch) -> None:
    assert {"lora", "lora-minilm", "spiel", "full", "locft"} <= set(preset_names())
    by_name, by_file = load_config("lora"), load_config(PRESETS_DIR / "lora.yaml")
    assert by_name == by_file and by_name.method["name"] == "lora"
    assert load_config("lora.yaml", ["train.steps=3"]).train.steps == 3
    # a preset's data file ships next to it, wherever the run starts
    monkeypatch.chdir(tmp_path)
    assert Path(load_config("locft").data.path) == PRESETS_DIR / "edits.jsonl"
    # a file of that name comes first
    (tmp_path / "lora").write_text("model: m\ndata: {name: tweets}\nmethod: lora\noutput: o\n")
    assert load_config("lora").model == "m"
    with pytest.raises(dt.DeltatuneError, match=r"neither a config file nor a preset; did you mean the preset 'lora'\?.*"
                                                r"lora-minilm"):
        load_config("examples/lorra.yaml")


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_begin(self, total_steps, start_step) -> None:
        self.events.append(("begin", total_steps, start_step))

    def on_eval(self, step, metrics) -> None:
        self.events.append(("eval", step, sorted(metrics)))

    def on_step_end(self, record) -> None:
        self.events.append(("step", record["step"], "eval_loss" in record))

    def on_checkpoint(self, step, path) -> None:
        self.events.append(("checkpoint", step, path.name))

    def on_end(self, summary) -> None:
        self.events.append(("end", None if summary is None else summary["steps"]))


class NanAfter(Callback):
    """Writes NaN into the delta at the end of step ``step``, so the next step's loss is NaN. Injected, as a real
    divergence is not deterministic: SGD at lr 1e12 drove the hidden states to float32's overflow edge (the loss
    sat at exactly ln 2 once the RMSNorm saturated), and whether the next backward gave NaN or a finite gradient
    (no NaN to the end) turned on whether sums crossed 3.4e38, i.e. on rounding and summation order. The config
    refuses a learning rate above 10 in any case."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, step: int) -> None:
        from deltatune.train import loop

        self.step, self.tuned = step, None
        build = loop.build

        def build_and_keep(config):
            run = build(config)
            self.tuned = run.tuned
            return run

        monkeypatch.setattr(loop, "build", build_and_keep)

    def on_step_end(self, record) -> None:
        if record["step"] == self.step:
            with torch.no_grad():  # every tensor: a NaN query alone does not reach the output of CPU sdpa
                for p in self.tuned.deltas.parameters():  # in torch 2.13 (its softmax drops the row); NaN values do
                    p.fill_(float("nan"))


def test_callbacks_see_every_event_in_order(tiny_folder, sentiment_file, tmp_path, monkeypatch) -> None:
    seen = Recorder()
    dt.train(config(tiny_folder, sentiment_file, tmp_path / "run", steps=4, eval_every=2, save_every=4),
             callbacks=[seen])
    metrics = ["accuracy", "loss"]
    assert seen.events == [
        ("begin", 4, 0), ("step", 1, False), ("eval", 2, metrics), ("step", 2, True), ("step", 3, False),
        ("eval", 4, metrics), ("step", 4, True), ("checkpoint", 4, "step-0000004"), ("end", 4),
    ]
    failed = Recorder()
    with pytest.raises(dt.DeltatuneError, match=r"at step 2; stopped"):
        dt.train(config(tiny_folder, sentiment_file, tmp_path / "nan"), callbacks=[failed, NanAfter(monkeypatch, 1)])
    assert failed.events[-1] == ("end", None), "a failed run still ends its callbacks (a progress bar stops)"


def test_a_skipped_step_drops_every_gradient_and_the_optimizer_follows_the_trainable_set() -> None:
    from conftest import batch, loss_of, tiny_llama

    from deltatune.core.policy import Policy

    class SkipAll(Policy):
        def skip_step(self, step, loss) -> bool:
            return loss > 0

    tuned = dt.attach(tiny_llama(), "lora", r=2, init=False)
    tuned.policy = SkipAll()
    params = list(tuned.deltas.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    step = PolicyStep(tuned)
    loss_of(tuned, batch()).backward()
    assert not step.before(0, opt, None), "no loss known: nothing is skipped"
    assert step.before(0, opt, 1.0) and all(p.grad is None for p in params)
    params[0].requires_grad_(False)
    assert step.after(0, opt) and id(params[0]) not in step.trainable
    assert not step.after(1, opt), "the trainable set did not change again"


def _run(cfg: dict, env: dict | None = None) -> subprocess.CompletedProcess:
    code = f"import deltatune as dt; dt.train({cfg!r})"
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow  # three training processes
def test_resume_after_sigkill_is_bit_identical(tiny_folder, sentiment_file, tmp_path) -> None:
    straight = config(tiny_folder, sentiment_file, tmp_path / "straight")
    killed = config(tiny_folder, sentiment_file, tmp_path / "killed")
    done = _run(straight)
    assert done.returncode == 0, done.stderr[-2000:]
    crash = _run(killed, {FAULT_ENV: "5"})  # SIGKILL before step 5: steps 1-4 done, checkpoint at 4
    assert crash.returncode == -9, crash.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "killed" / "checkpoints")) == ["step-0000002", "step-0000004"]
    assert not (tmp_path / "killed" / "deltatune.json").exists()
    summary = dt.train(killed, resume=True)
    assert summary["resumed_from"] == 4
    a = (tmp_path / "straight" / "delta.safetensors").read_bytes()
    b = (tmp_path / "killed" / "delta.safetensors").read_bytes()
    assert a == b, "a resumed run must end bit-identical to an uninterrupted one"
    hist = json.loads((tmp_path / "straight" / "logs" / "metrics.json").read_text())["history"]
    assert [h["loss"] for h in hist] == [h["loss"] for h in summary["history"]]
    assert sorted(os.listdir(tmp_path / "killed" / "checkpoints")) == ["step-0000004", "step-0000006"]


def test_nan_loss_stops_naming_the_step(tiny_folder, sentiment_file, tmp_path, monkeypatch) -> None:
    cfg = config(tiny_folder, sentiment_file, tmp_path / "nan")
    last_good = tmp_path / "nan" / "checkpoints" / "step-0000002"
    with pytest.raises(dt.DeltatuneError, match=rf"became nan at step 3; stopped \(the last good checkpoint is "
                       rf"{re.escape(str(last_good))}\)"):
        dt.train(cfg, callbacks=[NanAfter(monkeypatch, step=2)])


def test_trained_artifact_loads_and_learned(tiny_folder, sentiment_file, tmp_path) -> None:
    cfg = config(tiny_folder, sentiment_file, tmp_path / "run", steps=40, lr=5e-3, eval_every=20)
    cfg["method"] = {"name": "full"}
    summary = dt.train(cfg)
    assert summary["trainable"] == dt.inspect(tmp_path / "run")["trainable"]
    losses = [h["loss"] for h in summary["history"]]
    assert sum(losses[-4:]) < sum(losses[:4]) - 0.5, losses
    evals = [(h["step"], h["eval_accuracy"]) for h in summary["history"] if "eval_loss" in h]
    assert [s for s, _ in evals] == [20, 40] and evals[-1][1] >= 0.9
    assert "eval_accuracy" in summary["final"] and "eval_loss" in summary["final"]
    tuned = dt.load(dt.models.load(str(tiny_folder)), tmp_path / "run")
    assert tuned.num_trainable() == summary["trainable"]


def test_cli_train_eval_generate(tiny_folder, sentiment_file, tmp_path) -> None:
    import yaml
    from typer.testing import CliRunner

    from deltatune.cli.main import app

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config(tiny_folder, sentiment_file, tmp_path / "cli")))
    runner = CliRunner()
    r = runner.invoke(app, ["train", str(path), "--set", "train.steps=2", "--set", "train.save_every=0"])
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir(tmp_path / "cli" / "checkpoints")) == ["step-0000002"]
    r = runner.invoke(app, ["eval", str(tmp_path / "cli"), "--config", str(path), "--json"])
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.output)
    assert set(metrics) >= {"loss", "accuracy"} and 0.0 <= metrics["accuracy"] <= 1.0
    r = runner.invoke(app, ["generate", str(tmp_path / "cli"), "--prompt", "hello", "--max-new-tokens", "3"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", str(path), "--set", "train.lr=-1", "--set", "trian.steps=1"])
    assert r.exit_code == 2 and "train.lr=-1" in r.output and "did you mean 'train'" in r.output


def test_gradient_checkpointing_trains_the_same_delta(tiny_folder, sentiment_file, tmp_path) -> None:
    plain = dt.train(config(tiny_folder, sentiment_file, tmp_path / "a", steps=2, save_every=0, eval_every=0))
    ckpt = dt.train(config(tiny_folder, sentiment_file, tmp_path / "b", steps=2, save_every=0, eval_every=0,
                           gradient_checkpointing=True))
    assert [h["loss"] for h in plain["history"]] == pytest.approx([h["loss"] for h in ckpt["history"]], abs=1e-6)
    a = dt.load(dt.models.load(str(tiny_folder)), tmp_path / "a").delta_state_dict()
    b = dt.load(dt.models.load(str(tiny_folder)), tmp_path / "b").delta_state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a) and any(bool(a[k].any()) for k in a if k.endswith(".B"))
