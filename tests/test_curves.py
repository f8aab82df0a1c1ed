"""``logs/curves.png``: a finished run's curves from its metrics stream (deltatune.train.curves)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import word_run_config

import deltatune as dt
from deltatune.train import curves, reporting
from deltatune.train.callbacks import Callback, SummaryTable

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real drawing (the suite turns it off for every other run)."""
    monkeypatch.setattr(reporting, "write_curves", curves.write_curves)


def test_a_finished_run_leaves_its_curves_and_a_failed_one_does_not(
        word_run, tmp_path: Path, drawn, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = word_run_config(word_run, {"name": "lora", "r": 2, "targets": ["q_proj", "v_proj"]}, tmp_path / "run",
                          eval_every=4, save_every=0)
    monkeypatch.setenv("COLUMNS", "400")  # the summary table at full width
    dt.train(cfg, callbacks=[SummaryTable()])
    png = tmp_path / "run" / "logs" / "curves.png"
    assert png.read_bytes().startswith(PNG)
    shown = [line.split("│")[1:3] for line in capsys.readouterr().out.splitlines() if line.startswith("│")]
    assert [cell.strip() for cell in shown[-1]] == ["curves", str(png)]  # the summary table names it
    records = curves.read_records(tmp_path / "run" / "logs" / "metrics.jsonl")
    drawn_panels = curves.panels(records)
    assert [name for name, _, _ in drawn_panels] == ["loss", "accuracy"]
    loss, accuracy = drawn_panels
    assert [s for s, _ in loss[1]] == list(range(1, 9)) and [s for s, _ in loss[2]] == [4, 8]
    assert accuracy[1] == [] and accuracy[2] == [(r["step"], r["eval_accuracy"]) for r in records
                                                 if "eval_accuracy" in r]

    class Boom(Callback):
        def on_step_end(self, record: dict) -> None:
            if record["step"] == 2:
                raise RuntimeError("killed at step 2")

    with pytest.raises(RuntimeError, match="killed at step 2"):
        dt.train({**cfg, "output": str(tmp_path / "broken")}, callbacks=[Boom()])
    assert not (tmp_path / "broken" / "logs" / "curves.png").exists()


def test_panels_follow_the_objective() -> None:
    """GRPO's reward (training and evaluation) and DPO's margin get panels; bookkeeping numbers, flags and
    non-finite values do not."""
    grpo = [{"step": s, "epoch": 0.1, "lr": 1e-4, "loss": 0.1, "reward": 0.2 * s, "kl": 0.01, "seconds": 3.0,
             "tokens": 100, **({"eval_reward": 0.5} if s == 2 else {})} for s in (1, 2)]
    names = [name for name, _, _ in curves.panels(grpo)]
    assert names == ["loss", "reward", "kl"]
    reward = curves.panels(grpo)[1]
    assert reward[1] == [(1, 0.2), (2, 0.4)] and reward[2] == [(2, 0.5)]
    dpo = [{"step": 1, "loss": 0.69, "rewards/margins": 0.0, "rewards/accuracies": 0.5, "eval_loss": 0.6,
            "eval_rewards/margins": 0.1, "skipped": True, "nan": float("nan")}]
    assert [n for n, _, _ in curves.panels(dpo)] == ["loss", "rewards/margins", "rewards/accuracies"]


def test_the_title_says_what_the_curves_are_of() -> None:
    assert reporting._title({"model": {"name": "smollm2-135m", "quantize": "nf4"}, "method": {"name": "lora"},
                             "train": {"objective": "sft"}}) == "lora on smollm2-135m (nf4)"
    assert reporting._title({"model": "m", "method": {"name": "spiel"},
                             "train": {"objective": {"name": "dpo", "beta": 0.1}}}) == "spiel on m, objective dpo"


def test_running_mean() -> None:
    assert curves.running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert curves.running_mean([2.0], 5) == [2.0]


def test_a_torn_line_is_skipped_and_nothing_to_draw_writes_nothing(tmp_path: Path) -> None:
    stream = tmp_path / "metrics.jsonl"
    stream.write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n" + '{"step": 2, "lo')
    assert curves.read_records(stream) == [{"step": 1, "loss": 0.5}]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert not curves.write_curves(empty, tmp_path / "none.png") and not (tmp_path / "none.png").exists()
