"""Callbacks of the native loop: what a caller may watch without patching the loop.

    class Peak(Callback):
        def on_step_end(self, record):
            print(record["step"], record["loss"])

    dt.train("lora", callbacks=[Peak()])

The loop calls, in this order: ``on_begin`` once; per optimizer step ``on_eval`` (when it evaluated),
``on_step_end`` and ``on_checkpoint`` (when it wrote one); ``on_end`` once, also when the run fails (then
with ``summary=None``), so a callback can release what it holds. Every rank calls them under data
parallelism; ``on_checkpoint`` runs where the checkpoint was written (rank 0).

``train.progress: true`` adds ``ProgressBar`` and ``SummaryTable`` on rank 0; the reporters of ``train.report_to``
and the ``logs/metrics.jsonl`` stream are callbacks too (``train/reporting.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Callback:
    """The hooks of the native loop; each does nothing unless overridden."""

    def on_begin(self, total_steps: int, start_step: int) -> None:
        """Before the first step (``start_step`` > 0 on a resumed run)."""

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """After the evaluation at ``step`` (1-based): the task's metrics (``loss``, ``accuracy``, ...)."""

    def on_step_end(self, record: dict[str, Any]) -> None:
        """After each optimizer step, before its checkpoint: the history record (``step``, ``epoch`` (passes over
        the training split so far), ``loss``, ``lr`` (the learning rate this step used), ``tokens_per_s``,
        ``seconds``, ``tokens``, ``eval_*`` when it evaluated, ``skipped`` when the policy skipped the update)."""

    def on_checkpoint(self, step: int, path: Path) -> None:
        """After the checkpoint of ``step`` was written to ``path``."""

    def on_end(self, summary: dict[str, Any] | None) -> None:
        """After the artifact and ``logs/metrics.json`` were written: the run's summary (what ``train``
        returns); None when the run stopped with an error."""


class ProgressBar(Callback):
    """A rich progress bar with the epoch, loss, lr, tokens/s, the last eval loss and the time left. The lr shown is
    the one the step used (a linear schedule's last step uses a small non-zero lr; the next step's would be 0)."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_begin(self, total_steps: int, start_step: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                            TimeRemainingColumn())
        self.task = self.bar.add_task("train", total=total_steps, completed=start_step, info="")
        self.bar.start()

    def on_step_end(self, record: dict[str, Any]) -> None:
        if self.bar is None:
            return
        epoch = f"epoch {record['epoch']:.2f} · " if "epoch" in record else ""
        info = f"{epoch}loss {record['loss']:.4f} · lr {record['lr']:.2e} · {record['tokens_per_s']:.0f} tok/s"
        if "eval_loss" in record:
            info += f" · eval {record['eval_loss']:.4f}"
        elif "eval_reward" in record:  # GRPO's evaluation scores rewards, it has no loss
            info += f" · eval reward {record['eval_reward']:.4f}"
        self.bar.update(self.task, advance=1, info=info)

    def on_end(self, summary: dict[str, Any] | None) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class PeakMemory(Callback):
    """The process's peak memory (``peak_memory_bytes``: the RSS high-water mark, or CUDA's peak allocation)
    after each step, before that step's checkpoint is written: at the end of the run it is training's peak
    (evaluation included) without the checkpoint's serialised copy of the state. Benchmarks read ``peak``.

    ``train_peak``: the peak over the steps alone, the high-water mark reset when training begins (after the model
    was loaded and the delta attached: a quantized base's loading peak, the full-precision weights it reads, is not
    in it); ``peak`` stays the whole process's (the larger of the two). None where the mark cannot be reset."""

    def __init__(self, device: Any = "cpu") -> None:
        import torch

        self.device = torch.device(device)
        self.peak: int | None = None
        self.train_peak: int | None = None
        self._before: int | None = None

    def on_begin(self, total_steps: int, start_step: int) -> None:
        from deltatune.train.loop import peak_memory_bytes, reset_peak_memory

        before = peak_memory_bytes(self.device)
        self._before = before if reset_peak_memory(self.device) else None

    def on_step_end(self, record: dict[str, Any]) -> None:
        from deltatune.train.loop import peak_memory_bytes

        now = peak_memory_bytes(self.device)
        self.train_peak = now if self._before is not None else None
        self.peak = max(now, self._before or 0)


class SummaryTable(Callback):
    """The run's summary as a table at the end: trainable share, artifact size, speed, memory, final metrics."""

    def on_end(self, summary: dict[str, Any] | None) -> None:
        if summary is not None:
            print_summary(summary)


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"deltatune train: {summary['method']} on {summary['model']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("steps", f"{summary['steps']}"),
        ("epochs", f"{summary['epochs']:.2f}" if summary.get("epochs") is not None else "-"),
        ("trainable parameters", f"{summary['trainable']:,} ({100 * summary['trainable'] / summary['model_parameters']:.2f}%)"),
        ("artifact bytes", f"{summary['stored_bytes']:,}"),
        ("seconds / step (median)", f"{summary['seconds_per_step']:.3f}" if summary["seconds_per_step"] else "-"),
        ("tokens / s", f"{summary['tokens_per_s']:.0f}" if summary["tokens_per_s"] else "-"),
        ("peak memory", f"{summary['peak_memory_bytes'] / 2**30:.2f} GiB"),
    ] + [(k, f"{v:.4f}") for k, v in summary["final"].items()] + _best_row(summary.get("best"))
    for k, v in rows:
        table.add_row(k, v)
    table.add_row("output", summary["output"])
    curves = Path(summary["output"]) / "logs" / "curves.png"  # drawn by the metrics stream's reporter, which ends first
    if curves.is_file():
        table.add_row("curves", str(curves))
    for note in summary.get("warnings", []):  # a skipped corrupt checkpoint, a run that looks diverged
        table.add_row("[yellow]warning[/]", f"[yellow]{escape(note)}[/]")
    Console().print(table)


def _best_row(best: dict[str, Any] | None) -> list[tuple[str, str]]:
    """With early stopping: the step whose delta the artifact holds."""
    if best is None:
        return []
    stopped = ", stopped early" if best["stopped_early"] else ""
    return [("artifact (best)", f"step {best['step']}: {best['metric']} {best['value']:.4f}{stopped}")]
