"""Policies: which parts of a delta train at which step.

The training loop calls a policy around every optimizer step, or lets it take the whole step
(``train_step``: zeroth-order training from forward passes). A policy may change which
parameters train; when it does it must keep the optimizer consistent (``release_state`` for
parameters that stop training or whose slot now means something else). Its ``state_dict`` goes
into every checkpoint so a resumed run takes exactly the decisions of an uninterrupted one; it
must hold only tensors and JSON values, and must be the same on every data-parallel rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from deltatune.core.tuned import Tuned


class Policy:
    """The static policy: every parameter of the delta trains at every step."""

    def setup(self, tuned: Tuned) -> None:
        """Called once, when the delta is attached (a resume then calls ``load_state_dict``)."""

    def plan(self, total_steps: int, grad_accum: int) -> None:
        """Called by a training loop before its first step: the run's length (for schedules that
        depend on it) and the micro-batches per optimizer step."""

    def make_optimizer(self, params: list[torch.nn.Parameter], lr: float, weight_decay: float
                       ) -> torch.optim.Optimizer | None:
        """The optimizer this policy needs (per-element Adam ages, SM3); None: the run's own choice."""
        return None

    def lr_restarts(self, total_steps: int) -> list[int]:
        """Steps at which the learning-rate schedule starts again from its beginning (warm-up and
        decay over each segment): a policy with training phases, each with a fresh schedule."""
        return []

    def before_optimizer_step(self, step: int, tuned: Tuned, optimizer: torch.optim.Optimizer) -> None:
        """Gradients of this step are in ``.grad``; the optimizer has not stepped yet."""

    def after_optimizer_step(self, step: int, tuned: Tuned, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer has stepped; a policy may now change the trainable set."""

    def skip_step(self, step: int, loss: float) -> bool:
        """Called after ``before_optimizer_step`` with the step's task loss (the mean over its micro-batches
        and ranks): True drops this step's update (no optimizer step; the step still counts and the
        learning-rate schedule still advances). A loss-threshold recipe skips batches it already fits."""
        return False

    def should_stop(self, step: int, epoch_end: bool) -> bool:
        """Called after every optimizer step (``epoch_end``: the step finished a pass over the training
        data): True ends the run after this step, with the final evaluation, checkpoint and artifact."""
        return False

    def train_step(self, step: int, tuned: Tuned, batch: Any, loss_fn: Callable[[Any], torch.Tensor], lr: float,
                   weight_decay: float) -> float | None:
        """Take step ``step`` here, instead of the loop's backward and optimizer step (a zeroth-order method
        estimates the update from forward passes), and return its loss for the log; None (the default): the
        loop takes its usual step with ``batch`` as the first micro-batch. ``loss_fn(batch)`` is the task loss
        as the loop computes it (the policy's extra loss included, under the run's mixed precision, averaged
        over data-parallel ranks so every rank sees the same number); gradients and train/eval mode are the
        policy's business. ``lr`` is the schedule's learning rate for this step, ``weight_decay`` the run's.
        After such a step the loop calls neither ``before_optimizer_step`` nor ``skip_step``; the schedule
        advances, then ``after_optimizer_step`` and ``should_stop`` run as usual."""
        return None

    def extra_loss(self, tuned: Tuned) -> torch.Tensor | None:
        """A regulariser added to the task loss (AdaLoRA's orthogonality, KaSA's terms); None for none."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state but got keys {sorted(state)}")


def release_state(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    """Drop optimizer state (e.g. Adam moments) of ``params``: a parameter that stops training must
    not keep memory, and one that starts again must not inherit stale moments."""
    for p in params:
        optimizer.state.pop(p, None)
