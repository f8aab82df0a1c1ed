"""Early stopping on an evaluation metric, and which step's delta is the best (``train.early_stopping``).

Trainer's ``EarlyStoppingCallback`` with ``load_best_model_at_end``: an evaluation that improves on the best value
so far (in the direction of ``mode``) becomes the best; one that does not improve it by more than ``threshold``
adds one to a count of evaluations without improvement, and the run stops when that count reaches ``patience``. The loop writes a checkpoint at every
improvement, keep-last pruning never deletes the best one, and the artifact the run ends with is the best delta.

The state is a function of the run's history (every record holds its step's evaluation), so a resumed run replays
the checkpoint's history and judges exactly as the run it continues.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from deltatune.errors import DeltatuneError
from deltatune.train.config import EarlyStopping


@dataclass
class Judgement:
    improved: bool
    stop: bool


class Stopper:
    """The best evaluation so far and the evaluations since, judged one record at a time."""

    def __init__(self, spec: EarlyStopping, history: list[dict[str, Any]] | None = None) -> None:
        self.spec = spec
        self.best_step: int | None = None
        self.best_value: float | None = None
        self.waited = 0  # evaluations since the best
        for record in history or []:
            if spec.metric in record:
                self.judge(record)

    @property
    def exhausted(self) -> bool:
        """The patience ran out: the run stops (a resumed run that had stopped takes no more steps)."""
        return self.spec.patience is not None and self.waited >= self.spec.patience

    def _gain(self, value: float) -> float:
        """How much ``value`` improves on the best so far (negative: worse)."""
        if self.best_value is None:
            return math.inf
        return value - self.best_value if self.spec.greater_is_better else self.best_value - value

    def judge(self, record: dict[str, Any]) -> Judgement:
        """The evaluation in ``record`` (a history record holding ``eval_*``): is it the best so far, must the run
        stop. As Trainer judges: any gain makes it the best, only a gain above ``threshold`` restarts the count."""
        if self.spec.metric not in record:
            found = ", ".join(sorted(k for k in record if k.startswith("eval_"))) or "none"
            raise DeltatuneError(f"train.early_stopping.metric={self.spec.metric!r} is not among the evaluation's "
                                 f"metrics ({found}): set it to one of them")
        value = float(record[self.spec.metric])
        gain = self._gain(value)
        self.waited = 0 if gain > self.spec.threshold else self.waited + 1
        if gain > 0:
            self.best_step, self.best_value = int(record["step"]), value
        return Judgement(gain > 0, self.exhausted)

    def summary(self) -> dict[str, Any] | None:
        if self.best_step is None:
            return None
        return {"step": self.best_step, "metric": self.spec.metric, "value": self.best_value,
                "stopped_early": self.exhausted}
