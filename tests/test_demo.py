"""The demo on the real SmolLM2-135M, cut to a couple of steps and a handful of tweets.

The SmolLM2 cache is the session's temp cache (``cache`` in conftest.py), so nothing touches the
user's real cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli import app
from deltatune.demo import demo
from deltatune.errors import DeltatuneError

KEYS = {
    "accuracy_before", "accuracy_after", "eval_loss_before", "eval_loss_after", "majority_accuracy",
    "trainable_params", "model_params", "trainable_percent", "artifact", "artifact_bytes", "seconds",
    "train_seconds", "steps", "method",
}
SMALL = {"steps": 2, "batch_size": 2, "eval_size": 6, "max_length": 32, "show": False}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("runs") / "demo"
    return demo(out=out, **SMALL), out


def test_metrics_and_artifact(small_run: tuple[dict, Path]) -> None:
    metrics, out = small_run
    assert KEYS <= set(metrics)
    assert metrics["method"] == "lora" and metrics["steps"] == 2
    assert metrics["trainable_params"] == 460_800  # r=8 on q_proj and v_proj of 30 layers
    assert metrics["model_params"] == 134_515_008
    for key in ("accuracy_before", "accuracy_after", "majority_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
        assert metrics[key] * 6 == pytest.approx(round(metrics[key] * 6))  # a count out of 6 tweets
    assert metrics["eval_loss_before"] > 0 and metrics["eval_loss_after"] > 0
    assert (out / "deltatune.json").is_file() and (out / "delta.safetensors").is_file()
    assert metrics["artifact_bytes"] == sum(f.stat().st_size for f in out.iterdir())
    info = dt.inspect(out)
    assert info["method"] == "lora" and info["trainable"] == 460_800
    assert info["config"]["alpha"] == 16 and info["config"]["targets"] == ["q_proj", "v_proj"]


def test_before_is_the_base_model(small_run: tuple[dict, Path]) -> None:
    """LoRA starts at the base model (B = 0), and the evaluation does not depend on the training run."""
    metrics, _ = small_run
    again = demo(out=None, **{**SMALL, "steps": 0})
    assert again["accuracy_before"] == metrics["accuracy_before"]
    assert again["eval_loss_before"] == pytest.approx(metrics["eval_loss_before"], abs=1e-5)
    assert again["eval_loss_after"] == pytest.approx(again["eval_loss_before"], abs=1e-6)
    assert again["artifact"] is None and again["artifact_bytes"] is None


def test_bad_settings_are_deltatune_errors() -> None:
    with pytest.raises(DeltatuneError, match="max_length"):
        demo(out=None, **{**SMALL, "max_length": 5})
    with pytest.raises(DeltatuneError, match="steps"):
        demo(out=None, **{**SMALL, "steps": -1})
    with pytest.raises(DeltatuneError, match="bad config"):
        demo(out=None, **{**SMALL, "options": {"rank": 4}})


def test_cli_demo(tmp_path: Path) -> None:
    out = tmp_path / "cli-demo"
    result = CliRunner().invoke(app, [
        "demo", "--steps", "1", "--batch-size", "2", "--eval-size", "3", "--max-length", "32",
        "-o", "r=2", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.stdout and "wall time" in result.stdout
    assert dt.inspect(out)["config"]["r"] == 2
