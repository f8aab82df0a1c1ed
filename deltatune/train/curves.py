"""``logs/curves.png``: a finished run's curves, drawn from ``logs/metrics.jsonl`` (every sitting of a resumed run).

One panel per quantity, steps on the x axis: the training loss (each step faint, a running mean over it) with the
evaluation loss as points, every other evaluated metric (accuracy, perplexity, GRPO's reward, ...) with its training
counterpart where the objective logs one, and an objective's own per-step quantities (GRPO's reward, DPO's reward
margin and accuracy, the KL term). TensorBoard (``train.report_to``) shows the same numbers live; this is the
picture a finished run leaves behind without a server.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from deltatune.core.artifact import replace_bytes

NOT_CURVES = {"step", "epoch", "lr", "tokens_per_s", "seconds", "tokens", "skipped"}
# an objective's per-step numbers worth a panel of their own (TRL's names)
OBJECTIVE_CURVES = ("reward", "rewards/margins", "rewards/accuracies", "kl", "completions/mean_length")
MAX_PANELS = 6

Series = list[tuple[int, float]]


def step_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Each line of a JSONL stream that holds a step record, with the record; a torn line (a run killed while
    writing it) is skipped."""
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append((line, record))
    return out


def read_records(path: Path) -> list[dict[str, Any]]:
    """The step records of a JSONL stream (``step_lines``)."""
    return [record for _, record in step_lines(path)]


def panels(records: list[dict[str, Any]]) -> list[tuple[str, Series, Series]]:
    """``(name, training series, evaluation series)`` per panel, in the order drawn: the loss, the evaluated
    metrics, then the objective's own quantities; at most ``MAX_PANELS``."""
    train: dict[str, Series] = {}
    evals: dict[str, Series] = {}
    for record in records:
        for key, value in record.items():
            if key in NOT_CURVES or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):
                continue
            side, name = (evals, key.removeprefix("eval_")) if key.startswith("eval_") else (train, key)
            side.setdefault(name, []).append((record["step"], float(value)))
    names = ["loss"] if "loss" in train or "loss" in evals else []
    names += [k for k in evals if k not in names]
    names += [k for k in OBJECTIVE_CURVES if k in train and k not in names]
    return [(k, train.get(k, []), evals.get(k, [])) for k in names[:MAX_PANELS]]


def running_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def write_curves(jsonl: Path, png: Path, title: str | None = None) -> bool:
    """Draw ``png`` from the records of ``jsonl`` (written whole, or not at all); False when there is nothing to
    draw."""
    chosen = panels(read_records(jsonl))
    if not chosen:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(chosen))
    rows = math.ceil(len(chosen) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax, (name, train, evals) in zip(axes.flat, chosen, strict=False):
        draw_panel(ax, name, train, evals)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    save_figure(fig, png, title)
    return True


def draw_panel(ax: Any, name: str, train: Series, evals: Series, *, train_label: str = "training",
               eval_label: str = "evaluation", window_share: int = 10) -> None:
    """One quantity over the steps: each training step faint with a running mean over 1/``window_share`` of them,
    the evaluations as points."""
    if train:
        steps, values = zip(*train, strict=True)
        window = max(1, len(values) // window_share)
        if window > 1:
            ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(steps, running_mean(list(values), window), color="tab:blue",
                label=train_label + (f" (mean of {window} steps)" if window > 1 else ""))
    if evals:
        steps, values = zip(*evals, strict=True)
        ax.plot(steps, values, "o-", color="tab:orange", label=eval_label)
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def save_figure(fig: Any, png: Path, title: str | None = None) -> None:
    """Title, lay out and write ``fig`` to ``png`` atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    replace_bytes(png, buf.getvalue())
