"""The quick demo (MiniLM + a fresh head on BBC topics) end to end: report, plots, artifacts, and that training
beats zero-shot. Runs the real subprocess workers once for the module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli import demo as demo_module
from deltatune.cli.demo import DEFAULT_SETUP, QUICK_SETUP, Row, baseline_config, demo, run_config
from deltatune.cli.main import app
from deltatune.errors import DeltatuneError

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("demo") / "report"
    return demo(quick=True, out=out, show=False), out


@pytest.mark.slow  # the quick demo: three subprocesses that load MiniLM and train
def test_rows(quick_run: tuple[list[dict], Path]) -> None:
    rows, _ = quick_run
    assert [r["method"] for r in rows] == ["untrained head", "lora", "full"]
    zero = rows[0]
    assert zero["trainable"] == 0 and zero["artifact"] is None and zero["peak_memory_bytes"] > 0
    for row in rows[1:]:
        assert row["trainable"] > 0 and row["seconds_per_step"] > 0 and row["peak_memory_bytes"] > 0
        assert row["steps"] == run_config(QUICK_SETUP, row["method"])["train"]["steps"] == len(row["losses"])
        assert row["accuracy"] > zero["accuracy"], f"{row['method']} did not beat the untrained head"
        assert [s for s, _ in row["evals"]] == [10, 20, 30] and row["evals"][-1][1] == row["accuracy"]
    lora, full = rows[1], rows[2]
    assert lora["trainable"] < full["trainable"] and lora["artifact_bytes"] < full["artifact_bytes"]


@pytest.mark.slow  # the quick demo: three subprocesses that load MiniLM and train
def test_report_files(quick_run: tuple[list[dict], Path]) -> None:
    rows, out = quick_run
    report = (out / "report.md").read_text()
    assert "| method | trainable params | peak memory | s / step | held-out accuracy | artifact |" in report
    for row in rows:
        assert f"| {row['method']} |" in report
    assert "CPUs" in report and "threads" in report and "deltatune demo --quick" in report
    for name in ("cost.png", "curves.png", "confusion.png", "loss.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, name
    assert not (out / "artifacts" / "lora" / "checkpoints").exists()


@pytest.mark.slow  # the quick demo: three subprocesses that load MiniLM and train
def test_artifacts_load(quick_run: tuple[list[dict], Path]) -> None:
    rows, out = quick_run
    classes = len(dt.data.load("bbc").label_names)
    for row in rows[1:]:
        folder = out / "artifacts" / row["method"]
        assert Path(row["artifact"]) == folder
        torch.manual_seed(1234)  # the caller's seed does not matter: fresh heads start from a fixed seed
        tuned = dt.load(dt.models.load("minilm-l6", task="classification", num_labels=classes), folder)
        assert tuned.num_trainable() == row["trainable"]


@pytest.mark.slow  # the quick demo: three subprocesses that load MiniLM and train
def test_the_reports_next_commands_work_on_minilm(quick_run: tuple[list[dict], Path]) -> None:
    """The quick demo's own artifacts (MiniLM + a fresh head) evaluate, classify, export and merge from the CLI,
    as the report writes the commands."""
    from test_demo_report import bash_argv, commands

    rows, out = quick_run
    lines = commands((out / "report.md").read_text())
    assert [bash_argv(line)[0] for line in lines] == ["eval", "generate", "export", "merge", "eval", "generate",
                                                      "merge"]
    for line in lines:
        result = CliRunner().invoke(app, bash_argv(line))
        assert result.exit_code == 0, f"{line}\n{result.output}"
        if line.startswith("deltatune eval "):
            row = next(r for r in rows if r["artifact"] and line.startswith(f"deltatune eval {r['artifact']} "))
            assert f"{row['accuracy']:.4f}" in result.output
    assert (out / "merged" / "full" / "config.json").is_file() and (out / "peft" / "lora").is_dir()


def test_bad_arguments() -> None:
    with pytest.raises(DeltatuneError, match="runs any of"):
        demo(quick=True, methods="lora,bogus", show=False)
    with pytest.raises(DeltatuneError, match="steps"):
        demo(quick=True, steps=0, show=False)
    with pytest.raises(DeltatuneError, match="LoRA option"):
        demo(quick=True, lora_options={"rank": 4}, show=False)


def test_cli_passes_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict = {}
    monkeypatch.setattr(demo_module, "demo", lambda **kw: seen.update(kw) or [])
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path), "--methods", "lora",
                                      "--steps", "3", "--seed", "1", "-o", "r=4"])
    assert result.exit_code == 0, result.output
    assert seen["quick"] and seen["out"] == str(tmp_path) and seen["methods"] == "lora"
    assert seen["steps"] == 3 and seen["seed"] == 1 and seen["lora_options"] == {"r": 4}


def test_rows_train_their_presets_with_the_demos_changes() -> None:
    from deltatune.train import load_config

    for setup in (DEFAULT_SETUP, QUICK_SETUP):
        for name, row in setup["methods"].items():
            preset, config = load_config(row.preset), load_config(run_config(setup, name, seed=3, output="o"))
            assert config.model == setup["model"] and config.output == "o"
            assert {k: v for k, v in config.method.items() if k != "data"} == \
                {k: v for k, v in preset.method.items() if k != "data"}, name
            assert config.train.lr == preset.train.lr and config.train.seed == config.data.seed == 3
            assert config.train.steps == row.train.get("steps", preset.train.steps)
            assert config.data.head == preset.data.head and config.data.name == setup["data"]["name"]
            if "data" in config.method:  # CorDA calibrates on the demo's data
                assert config.method["data"]["max_train"] == setup["data"]["max_train"]
    # the LoRA row's learning rate, as docs/demo-results.md measured it
    assert run_config(DEFAULT_SETUP, "lora")["train"]["lr"] == 2e-3
    assert run_config(DEFAULT_SETUP, "mezo", steps=5)["train"]["steps"] == 5
    assert run_config(DEFAULT_SETUP, "lora", lora_options={"r": 16})["method"]["r"] == 16
    # a row's own data keys (a data step) join the demo's data section for that row only
    subset = {**DEFAULT_SETUP, "methods": {"sub": Row("lora", data={"prune": {"method": "random", "budget": 100}})}}
    data = run_config(subset, "sub", seed=2)["data"]
    assert data == {**DEFAULT_SETUP["data"], "prune": {"method": "random", "budget": 100}, "seed": 2}
    # a row's own model keys (a quantized base) make the model a mapping for that row only
    nf4 = load_config(run_config({**DEFAULT_SETUP, "methods": {"q": Row("lora", model={"quantize": "nf4"})}}, "q"))
    assert nf4.model == DEFAULT_SETUP["model"] and nf4.quantization == {"quantize": "nf4"}
    # the baseline is the setup's model as it is, whichever row comes first (a row over nf4 did change it)
    base = load_config(baseline_config({**DEFAULT_SETUP, "methods": {"q": Row("lora", model={"quantize": "nf4"})}},
                                       "q", seed=0, train_seed=0, output="x"))
    assert base.model == DEFAULT_SETUP["model"] and not base.quantization
    # and the base model's label-word accuracy whatever the first row trains with: a DPO row first in a fresh
    # folder made the zero-shot run a DPO run on classification data, which load_config refuses
    dpo = {**DEFAULT_SETUP, "methods": {"d": Row("lora", {"objective": {"name": "dpo"}}, data={"task": "preference"})}}
    base = load_config(baseline_config(dpo, "d", seed=0, train_seed=0, output="x"))
    assert base.data.task == "classification" and base.train.objective == "sft"


def test_cli_passes_the_protocol_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict = {}
    monkeypatch.setattr(demo_module, "demo", lambda **kw: seen.update(kw) or [])
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path), "--seeds", "3",
                                      "--lr-grid", "0.5,1,2"])
    assert result.exit_code == 0, result.output
    assert seen["seeds"] == 3 and demo_module.parse_lr_grid(seen["lr_grid"]) == [0.5, 1.0, 2.0]
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert seen["seeds"] == 1 and seen["lr_grid"] is None  # the defaults: one run per row, the presets' rates
