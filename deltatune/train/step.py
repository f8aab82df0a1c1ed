"""The policy's part of an optimizer step, one implementation for both training loops.

The native loop (``train/loop.py``) and the ``transformers.Trainer`` bridge (``train/hf.py``) own the
forward, backward, clipping and the optimizer's own step; around it they call the same ``PolicyStep``:

    skip = policy_step.before(step, optimizer, loss)   # before_optimizer_step, then skip_step
    if not skip: clip, optimizer.step()                  # the loop's (or the Trainer's) own work
    policy_step.after(step, optimizer)                   # after_optimizer_step, then sync_optimizer

A policy that takes the whole step (``Policy.train_step``, zeroth-order methods) skips ``before``; ``after``
runs for every step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from deltatune.core.optim import group_for
from deltatune.core.policy import Policy
from deltatune.core.tuned import Tuned


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over the data-parallel ranks (``value`` itself in one process): a decision taken
    from a loss must be the same on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def sync_optimizer(optimizer: torch.optim.Optimizer, tuned: Tuned, before: set[int], *,
                   add_frozen: bool = True) -> set[int]:
    """Keep the optimizer consistent with what trains now; ``before`` holds the ids of the delta tensors
    that trained at the last call, the return value those that train now.

    - A tensor that stopped or started training loses its optimizer state and gradient (a restart gets fresh
      moments, and a frozen tensor keeps no memory).
    - A tensor that left the model (``Tuned.replace_forms``) leaves the optimizer with its state. Parameters
      still in the model stay, so a base tensor the user trains next to the delta keeps training.
    - A delta tensor the optimizer does not hold joins its first group (LoRA+: its role's group, ``group_for``).
      ``add_frozen``: frozen ones join too, for an optimizer that holds every delta tensor in a fixed order
      (the native loop: a resumed run rebuilds it the same way); the Trainer builds its optimizer from the
      tensors that train, so there a tensor joins when it starts training."""
    in_model = {id(p) for p in tuned.parameters()}
    delta = list(tuned.deltas.parameters())
    now = {id(p) for p in delta if p.requires_grad}
    changed = before ^ now
    known: set[int] = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in in_model:
                optimizer.state.pop(p, None)
        group["params"] = [p for p in group["params"] if id(p) in in_model]
        known |= {id(p) for p in group["params"]}
    for p in delta:
        if id(p) in changed:
            optimizer.state.pop(p, None)
            p.grad = None
        if id(p) not in known and (add_frozen or p.requires_grad):
            optimizer.param_groups[group_for(optimizer, p)]["params"].append(p)  # LoRA+: its own group
            known.add(id(p))
    return now


def skips_steps(policy: Policy) -> bool:
    """Whether the policy may skip a step: only then does a loop need the step's loss on every rank."""
    return type(policy).skip_step is not Policy.skip_step


def takes_whole_steps(policy: Policy) -> bool:
    """Whether the policy may take a step itself (``Policy.train_step``)."""
    return type(policy).train_step is not Policy.train_step


class PolicyStep:
    """The policy hooks around each optimizer step of one run, and the trainable set they leave behind."""

    def __init__(self, tuned: Tuned, *, add_frozen: bool = True) -> None:
        self.tuned = tuned
        self.add_frozen = add_frozen
        self.trainable = {id(p) for p in tuned.deltas.parameters() if p.requires_grad}

    def before(self, step: int, optimizer: torch.optim.Optimizer, loss: float | None) -> bool:
        """``before_optimizer_step`` (gradients present, not clipped yet), then ``skip_step`` with the step's
        loss, the same on every rank (None: the loop does not know it, nothing is skipped). True: the step is
        skipped, every gradient the optimizer would apply is dropped (the schedule still advances)."""
        policy = self.tuned.policy
        policy.before_optimizer_step(step, self.tuned, optimizer)
        if loss is None or not policy.skip_step(step, loss):
            return False
        optimizer.zero_grad(set_to_none=True)
        return True

    def after(self, step: int, optimizer: torch.optim.Optimizer | None) -> bool:
        """``after_optimizer_step``, then the optimizer follows the trainable set; True when that set changed
        (a DDP wrapper must then be rebuilt: it fixes its parameter list when it wraps)."""
        self.tuned.policy.after_optimizer_step(step, self.tuned, optimizer)
        return self.sync(optimizer) if optimizer is not None else False

    def sync(self, optimizer: torch.optim.Optimizer) -> bool:
        """Bring the optimizer in line with what trains now (see ``sync_optimizer``); True when that changed."""
        now = sync_optimizer(optimizer, self.tuned, self.trainable, add_frozen=self.add_frozen)
        changed = now != self.trainable
        self.trainable = now
        return changed


def inner_optimizer(optimizer: Any) -> Any:
    """accelerate wraps the optimizer; policies get the torch optimizer in both loops."""
    return getattr(optimizer, "optimizer", optimizer)
