"""The policy interface: the loop's hooks, state for checkpoints, optimizer consistency."""

from __future__ import annotations

import torch
from conftest import batch, loss_of, tiny_llama

import deltatune as dt
from deltatune.core.policy import Policy, release_state
from deltatune.core.registry import Built, register


class EveryOtherStep(Policy):
    """A toy dynamic policy: freezes the low-rank B factors on odd steps."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.flips = 0

    def before_optimizer_step(self, step, tuned, optimizer) -> None:
        assert all(p.grad is not None for p in tuned.trainable_parameters())
        self.calls.append(("before", step))

    def after_optimizer_step(self, step, tuned, optimizer) -> None:
        self.calls.append(("after", step))
        frozen = [f.B for f in tuned.forms().values()]
        for p in frozen:
            p.requires_grad_(step % 2 == 1)
        if step % 2 == 0:
            release_state(optimizer, frozen)
        self.flips += 1

    def state_dict(self):
        return {"flips": self.flips}

    def load_state_dict(self, state) -> None:
        self.flips = int(state["flips"])


def test_a_dynamic_policy_plugs_in_without_core_changes() -> None:
    from dataclasses import dataclass

    from deltatune.methods.lora import LoraConfig
    from deltatune.methods.lora import build as lora_build

    @dataclass
    class ToyConfig(LoraConfig):
        pass

    @register("_toy_every_other", ToyConfig, "test-only dynamic policy")
    def build(model, cfg, *, loading=False):
        return Built(lora_build(model, cfg).forms, EveryOtherStep())

    try:
        tuned = dt.attach(tiny_llama(), "_toy_every_other", r=2, init=False)
        policy = tuned.policy
        opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
        for step in range(4):
            opt.zero_grad()
            loss_of(tuned, batch()).backward()
            policy.before_optimizer_step(step, tuned, opt)
            opt.step()
            policy.after_optimizer_step(step, tuned, opt)
        b = next(iter(tuned.forms().values())).B
        assert b not in opt.state, "state of a frozen parameter is released"
        assert policy.calls[:2] == [("before", 0), ("after", 0)]
        fresh = EveryOtherStep()
        fresh.load_state_dict(policy.state_dict())
        assert fresh.flips == 4
    finally:
        from deltatune.core import registry

        registry._REGISTRY.pop("_toy_every_other", None)


def test_static_policy_has_no_state() -> None:
    tuned = dt.attach(tiny_llama(), "lora")
    assert tuned.policy.state_dict() == {} and tuned.policy.extra_loss(tuned) is None
