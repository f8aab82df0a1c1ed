"""SpIEL: budget, schedule, drop and regrow rules, optimizer seeding, SM3 growth, resume."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from conftest import tiny_llama

import deltatune as dt
from deltatune.core.optim import SM3
from deltatune.methods.spiel import SpielPolicy
from deltatune.train.loop import FAULT_ENV

IN, OUT = 16, 12


def toy(**options) -> tuple[dt.Tuned, SpielPolicy]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, OUT, bias=False))
    tuned = dt.attach(model, "spiel", targets=["0"], **options)
    return tuned, tuned.policy


def target_loss(tuned: dt.Tuned, pattern: torch.Tensor) -> torch.Tensor:
    """A loss linear in W: with x = I, dL/dW = patternᵀ at every step, whatever W is."""
    y = tuned(torch.eye(IN))  # (IN, OUT)
    return (y * pattern.T).sum()


def run(tuned: dt.Tuned, policy: SpielPolicy, steps: int, pattern, lr: float = 1e-2, on_step=None,
        total: int | None = None) -> torch.optim.Optimizer:
    """``steps`` optimizer steps of a run planned for ``total``; ``pattern`` is a tensor or step -> tensor."""
    policy.plan(total or steps, 1)
    opt = policy.make_optimizer(list(tuned.deltas.parameters()), lr, 0.0)
    for step in range(steps):
        opt.zero_grad()
        target_loss(tuned, pattern(step) if callable(pattern) else pattern).backward()
        opt.step()
        if on_step:
            on_step(step, opt)
        policy.after_optimizer_step(step, tuned, opt)
    return opt


def form_of(tuned: dt.Tuned):
    return tuned.forms()["0.weight"]


def test_budget_by_density_count_and_lora_match() -> None:
    model = tiny_llama()
    total = sum(p.numel() for p in model.parameters())
    tuned = dt.attach(model, "spiel")
    ks = {n: f.k for n, f in tuned.forms().items()}
    assert sum(ks.values()) == int(0.01 * total)
    for form in tuned.forms().values():  # each share ∝ the matrix size
        assert abs(form.k - sum(ks.values()) * form.numel_base / sum(f.numel_base for f in tuned.forms().values())) < 1
    tuned.detach()
    lora = dt.attach(tiny_llama(), "lora", r=8, targets=["q_proj", "v_proj"])
    matched = dt.attach(tiny_llama(), "spiel", match="lora:r=8", targets=["q_proj", "v_proj"])
    assert matched.num_trainable() == lora.num_trainable()
    with pytest.raises(dt.DeltatuneError, match="lora:r=<rank>"):
        dt.attach(tiny_llama(), "spiel", match="lora-8")


def test_schedule_selects_at_gamma_then_every_S_with_linear_rate() -> None:
    tuned, policy = toy(k=20, reselection_steps=20, selection_accumulation_steps=5)
    calls = []
    real = policy.reselect
    policy.reselect = lambda p, opt: (calls.append((policy.completed, p)), real(p, opt))  # type: ignore[method-assign]
    run(tuned, policy, 60, torch.randn(OUT, IN))
    assert [t for t, _ in calls] == [5, 25, 45]
    assert calls[0][1] == 1.0
    for t, p in calls[1:]:
        assert p == pytest.approx(0.2 * (1 - t / 60))


def test_growth_finds_the_positions_with_large_gradients() -> None:
    k = 10
    tuned, policy = toy(k=k, reselection_steps=20, selection_accumulation_steps=5)
    hot = torch.randperm(OUT * IN, generator=torch.Generator().manual_seed(3))[:k]
    pattern = torch.full((OUT * IN,), 1e-3)
    pattern[hot] = 5.0
    run(tuned, policy, 6, pattern.view(OUT, IN))  # the first selection (p = 1) runs after step 5
    assert set(form_of(tuned).indices.tolist()) == set(hot.tolist())


def test_reselection_drops_the_smallest_and_seeds_new_slots() -> None:
    k = 24
    tuned, policy = toy(k=k, reselection_steps=4, selection_accumulation_steps=2, initial_reselection_rate=0.5)
    first = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(5))
    later = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(6))
    form = form_of(tuned)
    snaps = {}

    def before_after(step: int, opt: torch.optim.Optimizer) -> None:
        if step + 1 == 6:  # the second selection (t = 6 = γ mod S): p = 0.5·(1 − 6/8)
            state = opt.state[form.values]
            snaps.update(idx=form.indices.clone(), val=form.values.detach().clone(),
                         m=state["exp_avg"].clone(), v=state["exp_avg_sq"].clone(), age=state["age"].clone())

    # the second phase (backwards of steps 4-6) sees another gradient, so candidates differ from the active set
    opt = run(tuned, policy, 6, lambda step: first if step < 3 else later, on_step=before_after, total=8)
    idx, val = form.indices, form.values.detach()
    n = int(k * 0.5 * (1 - 6 / 8))
    assert idx.numel() == k and torch.unique(idx).numel() == k
    changed = (idx != snaps["idx"]).nonzero().flatten()
    smallest = set(torch.topk(snaps["val"].abs(), n, largest=False).indices.tolist())
    assert 0 < changed.numel() <= n and set(changed.tolist()) <= smallest, "only the n smallest |φ| slots are swapped"
    assert torch.all(val[changed] == 0)
    same = (idx == snaps["idx"])
    state = opt.state[form.values]
    assert torch.equal(val[same], snaps["val"][same])
    for key in ("m", "v", "age"):
        got = {"m": state["exp_avg"], "v": state["exp_avg_sq"], "age": state["age"]}[key]
        assert torch.equal(got[same], snaps[key][same]), f"{key} of untouched slots must not change"
    # seeding: the phase's gradient is the constant `later`; it saw count = γ+1 = 3 backwards (steps 4, 5, 6)
    g = later.reshape(-1)[idx[changed].long()]
    b1, b2, a = 0.9, 0.999, 3.0
    assert torch.allclose(state["age"][changed], torch.full_like(g, a))
    assert torch.allclose(state["exp_avg"][changed], g * (1 - b1**a), atol=1e-6)
    assert torch.allclose(state["exp_avg_sq"][changed], g * g * (1 - b2**a), atol=1e-6)


def test_sm3_regrowth_takes_the_largest_row_times_column_scores() -> None:
    k = 15
    tuned, policy = toy(k=k, regrow="sm3", reselection_steps=20, selection_accumulation_steps=3)
    form = form_of(tuned)
    pattern = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(7))
    expected = {}

    def capture(step: int, opt: torch.optim.Optimizer) -> None:
        if step + 1 == 3:
            state = opt.state[form.values]
            score = torch.outer(state["row"], state["col"]).reshape(-1)
            expected["top"] = set(torch.topk(score, k).indices.tolist())

    opt = run(tuned, policy, 3, pattern, on_step=capture)
    assert isinstance(opt, SM3)
    assert set(form.indices.tolist()) == expected["top"]
    assert form.grad_observer is None, "SM3 regrowth never asks for a dense gradient"


def test_trains_from_a_config_and_resumes_bit_identically(tiny_folder, sentiment_file, tmp_path) -> None:
    def cfg(out: str) -> dict:
        return {
            "model": str(tiny_folder),
            "data": {"path": str(sentiment_file), "task": "classification", "max_length": 32, "eval_fraction": 0.25,
                     "labels": ["negative", "positive"]},
            "method": {"name": "spiel", "match": "lora:r=2", "reselection_steps": 3, "selection_accumulation_steps": 1},
            "train": {"steps": 8, "batch_size": 4, "lr": 1e-2, "save_every": 4, "progress": False},
            "output": str(tmp_path / out),
        }

    code = "import deltatune as dt, sys; dt.train(eval(sys.argv[1]))"
    straight = subprocess.run([sys.executable, "-c", code, repr(cfg("a"))], capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    crash = subprocess.run([sys.executable, "-c", code, repr(cfg("b"))], capture_output=True, text=True, timeout=300,
                           env={**os.environ, FAULT_ENV: "6"})
    assert crash.returncode == -9, crash.stderr[-2000:]
    dt.train(cfg("b"), resume=True)
    a = (tmp_path / "a" / "delta.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "delta.safetensors").read_bytes(), "resume must take the same selections"
    info = dt.inspect(tmp_path / "a")
    assert info["method"] == "spiel"
