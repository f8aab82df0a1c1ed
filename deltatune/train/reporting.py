"""Where a run's metrics go while it runs: ``train.report_to`` (Trainer's name) and the always-on JSONL stream.

Every reporter is a ``Callback`` on rank 0 and writes under ``<output>/logs/`` (next to ``metrics.json``): the run's
artifact is swapped into ``<output>`` at the end and only sub-folders are carried across that swap.

- ``logs/metrics.jsonl`` (always): one JSON line per optimizer step as it ends, flushed, with the step's ``eval_*``
  metrics when it evaluated, so a run can be watched (``tail -f``) or read after a crash; and ``logs/curves.png``
  drawn from it when the run has finished (loss, evaluated metrics, an objective's reward);
- ``logs/completions.jsonl`` (an objective that samples, GRPO): every completion a step trained on and the
  evaluation's greedy ones, one JSON line each (TRL's ``log_completions``, as a file: the samples of the first
  steps against the last show what the run learnt);
- ``csv``: ``logs/metrics.csv``, the same records as a table (a new column, e.g. the first evaluation's metrics,
  rewrites it with the wider header);
- ``tensorboard``: ``logs/tensorboard/`` through ``torch.utils.tensorboard`` (``train/loss``,
  ``train/learning_rate``, ``train/epoch``, ``eval/<metric>``, as Trainer names them, and ``train/<key>`` for every
  other number of the record: an objective's per-step metrics such as ``train/rewards/margins`` or GRPO's
  ``train/reward``, ``train/kl``, ``train/completions/mean_length``);
- ``wandb`` / ``mlflow``: through their packages, when installed (the config check names the pip install).

A resumed run continues each stream where its checkpoint was written: lines of steps after it (written before the
run died) are dropped, TensorBoard purges them (``purge_step``), W&B and MLflow continue the same run.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from deltatune.core.artifact import replace_text
from deltatune.train.callbacks import Callback
from deltatune.train.curves import step_lines, write_curves

log = logging.getLogger(__name__)

LOGS = "logs"
JSONL, CSV, TENSORBOARD, CURVES = "metrics.jsonl", "metrics.csv", "tensorboard", "curves.png"
COMPLETIONS = "completions.jsonl"
FIRST_COLUMNS = ["step", "epoch", "loss", "lr"]  # the CSV's first columns; the rest in the order they appear


def reporters(output: str | os.PathLike, report_to: list[str], config: dict[str, Any], task: Any = None
              ) -> list[Callback]:
    """The reporters of a run writing to ``output``: the JSONL stream, the completions of a task that samples
    (one with ``step_completions``), then those ``report_to`` names."""
    logs = Path(output) / LOGS
    made: dict[str, Any] = {"csv": CsvReporter, "tensorboard": TensorBoardReporter, "wandb": WandbReporter,
                            "mlflow": MlflowReporter}
    out: list[Callback] = [JsonlReporter(logs, title=_title(config))]
    if hasattr(task, "step_completions"):
        out.append(CompletionsReporter(logs, task))
    for name in report_to:
        out.append(made[name](logs, config) if name in ("wandb", "mlflow") else made[name](logs))
    return out


def _title(config: dict[str, Any]) -> str:
    """``lora on smollm2-135m (nf4), objective dpo``: what the curves of a run are of (the default objective, sft,
    left out)."""
    def name(section: Any) -> str:
        return str(section.get("name") or section.get("path") or "?") if isinstance(section, dict) else str(section)

    model = config.get("model")
    quantize = model.get("quantize") if isinstance(model, dict) else None
    objective = (config.get("train") or {}).get("objective")
    return (f"{name(config.get('method'))} on {name(model)}" + (f" ({quantize})" if quantize else "")
            + (f", objective {name(objective)}" if objective and name(objective) != "sft" else ""))


def _kept_lines(path: Path, start_step: int) -> list[str]:
    """The JSON lines of ``path`` up to ``start_step`` (where a resumed run continues); a torn last line (the run
    died while writing it) is dropped."""
    return [line for line, record in step_lines(path) if record["step"] <= start_step]


class _Stream(Callback):
    """A file of step records that a run appends to as it goes. When the run fails, the file is cut back to the steps
    a ``--resume`` continues from (its newest checkpoint), and removed when there is none: a failed fresh run leaves
    its folder as it found it, so running it again is not refused as a used folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.kept = 0  # the newest step with a checkpoint

    def on_begin(self, total_steps: int, start_step: int) -> None:
        self.kept = start_step
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.start(start_step)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.kept = step

    def on_end(self, summary: dict[str, Any] | None) -> None:
        self.close()
        if summary is None:
            if self.kept:
                self.cut(self.kept)
            else:
                self.path.unlink(missing_ok=True)
                _remove_if_empty(self.path.parent)

    def start(self, start_step: int) -> None:
        """Open the stream: empty, or cut back to ``start_step`` on resume."""

    def cut(self, step: int) -> None:
        """Rewrite the file with the records up to ``step``."""

    def close(self) -> None:
        pass


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # other reporters' files are still there


class _Lines(_Stream):
    """A JSONL file held open for the run: lines written and flushed as each step ends, cut back on resume."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.file: io.TextIOBase | None = None

    def start(self, start_step: int) -> None:
        self.cut(start_step)
        self.file = open(self.path, "a")  # noqa: SIM115 - held open for the run, closed in on_end

    def cut(self, step: int) -> None:
        replace_text(self.path, "".join(line + "\n" for line in _kept_lines(self.path, step)))

    def write(self, records: list[dict[str, Any]]) -> None:
        if self.file is not None and records:
            self.file.write("".join(json.dumps(r) + "\n" for r in records))
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class JsonlReporter(_Lines):
    """``logs/metrics.jsonl``: one line per step, written and flushed as the step ends; and when the run has
    finished, ``logs/curves.png`` drawn from it (``deltatune.train.curves``)."""

    def __init__(self, logs: Path, title: str | None = None) -> None:
        super().__init__(logs / JSONL)
        self.title = title

    def on_end(self, summary: dict[str, Any] | None) -> None:
        super().on_end(summary)
        if summary is not None:
            try:
                write_curves(self.path, self.path.parent / CURVES, self.title)
            except Exception as e:  # a plot that fails must not fail a finished run
                log.warning("could not draw %s: %s", self.path.parent / CURVES, e)

    def on_step_end(self, record: dict[str, Any]) -> None:
        self.write([record])


class CompletionsReporter(_Lines):
    """``logs/completions.jsonl``: per step, each completion the step trained on (``split: train``: its prompt,
    text, summed reward, per-function rewards and advantage) and, when the step evaluated, each greedy completion
    of the evaluation (``split: eval``), every line with its ``step``."""

    def __init__(self, logs: Path, task: Any) -> None:
        super().__init__(logs / COMPLETIONS)
        self.task = task

    def on_step_end(self, record: dict[str, Any]) -> None:
        step = record["step"]
        lines = [{"step": step, "split": "train", **c} for c in self.task.step_completions]
        if any(key.startswith("eval_") for key in record):
            lines += [{"step": step, "split": "eval", **c} for c in self.task.last_eval_completions]
        self.write(lines)


class CsvReporter(_Stream):
    """``logs/metrics.csv``: the step records as rows; appended row by row, rewritten when a column is new."""

    def __init__(self, logs: Path) -> None:
        super().__init__(logs / CSV)
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = []

    def start(self, start_step: int) -> None:
        self.cut(start_step)

    def cut(self, step: int) -> None:
        rows: list[dict[str, Any]] = []
        if step and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= step]
        self.rows, self.columns = rows, []
        for row in rows:
            self._add_columns(row)
        self._rewrite()

    def _add_columns(self, record: dict[str, Any]) -> bool:
        new = [k for k in record if k not in self.columns]
        self.columns = [c for c in FIRST_COLUMNS if c in self.columns or c in record] + \
            [c for c in self.columns + new if c not in FIRST_COLUMNS]
        return bool(new)

    def _rewrite(self) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, self.columns, lineterminator="\n")
        if self.columns:
            writer.writeheader()
        writer.writerows(self.rows)
        replace_text(self.path, text.getvalue())

    def on_step_end(self, record: dict[str, Any]) -> None:
        self.rows.append(record)
        if self._add_columns(record):
            self._rewrite()
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns, lineterminator="\n").writerow(record)


class TensorBoardReporter(_Stream):
    """TensorBoard event files in ``logs/tensorboard/`` (``tensorboard --logdir <output>/logs``). Event files are
    not rewritten: a resumed run has TensorBoard purge the steps after its checkpoint (``purge_step``)."""

    def __init__(self, logs: Path) -> None:
        super().__init__(logs / TENSORBOARD)
        self.writer: Any = None

    def start(self, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.path), purge_step=start_step + 1 if start_step else None)

    def on_step_end(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            self.writer.add_scalar(_tensorboard_tag(key), value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def on_end(self, summary: dict[str, Any] | None) -> None:
        self.close()
        if summary is None and not self.kept:  # a failed fresh run: its folder as it found it
            shutil.rmtree(self.path, ignore_errors=True)
            _remove_if_empty(self.path.parent)


def _tensorboard_tag(key: str) -> str:
    """A record's key as Trainer's TensorBoard tag: ``eval/<metric>``, ``train/learning_rate``, ``train/<key>``."""
    if key.startswith("eval_"):
        return f"eval/{key.removeprefix('eval_')}"
    return "train/learning_rate" if key == "lr" else f"train/{key}"


def _metrics(record: dict[str, Any]) -> dict[str, float]:
    """A record's numbers as Trainer logs them (``train/loss``, ``eval/accuracy``), the step left out."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        out[f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"] = float(value)
    return out


class _RunId:
    """The id of the W&B / MLflow run a run folder logs to (``logs/<name>-run-id``), so a resume continues it."""

    def __init__(self, logs: Path, name: str) -> None:
        self.path = logs / f"{name}-run-id"

    def read(self, start_step: int) -> str | None:
        return self.path.read_text().strip() or None if start_step and self.path.is_file() else None

    def write(self, run_id: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        replace_text(self.path, run_id + "\n")


class WandbReporter(Callback):
    """Weights & Biases: one W&B run per deltatune run (project from ``WANDB_PROJECT``, else "deltatune")."""

    def __init__(self, logs: Path, config: dict[str, Any]) -> None:
        self.logs, self.config, self.run = logs, config, None
        self.run_id = _RunId(logs, "wandb")

    def on_begin(self, total_steps: int, start_step: int) -> None:
        import wandb

        previous = self.run_id.read(start_step)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "deltatune"), config=self.config,
                              name=Path(self.config["output"]).name, dir=str(self.logs), id=previous,
                              resume="allow" if previous else None)
        self.run_id.write(str(self.run.id))

    def on_step_end(self, record: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(_metrics(record), step=record["step"])

    def on_end(self, summary: dict[str, Any] | None) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if summary is not None else 1)
            self.run = None


class MlflowReporter(Callback):
    """MLflow: one MLflow run per deltatune run, in the tracking URI MLflow's environment names."""

    def __init__(self, logs: Path, config: dict[str, Any]) -> None:
        self.logs, self.config, self.active = logs, config, False
        self.run_id = _RunId(logs, "mlflow")

    def on_begin(self, total_steps: int, start_step: int) -> None:
        import mlflow

        previous = self.run_id.read(start_step)
        run = mlflow.start_run(run_id=previous) if previous else \
            mlflow.start_run(run_name=Path(self.config["output"]).name)
        self.active = True
        if previous is None:
            mlflow.log_params(_flat(self.config))
        self.run_id.write(str(run.info.run_id))

    def on_step_end(self, record: dict[str, Any]) -> None:
        if self.active:
            import mlflow

            mlflow.log_metrics(_metrics(record), step=record["step"])

    def on_end(self, summary: dict[str, Any] | None) -> None:
        if self.active:
            import mlflow

            mlflow.end_run(status="FINISHED" if summary is not None else "FAILED")
            self.active = False


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train.lr": "0.002", ...}``: a nested config as MLflow's flat parameters."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value)
    return out
