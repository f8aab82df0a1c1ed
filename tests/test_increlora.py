"""IncreLoRA: start at the base, the module score against autograd, one allocation's bookkeeping, the growth
timing and budget, advance learning, artifact round trips with final ranks, exact resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import batch, output_of, tiny_llama, train_then_resume, word_run_config

import deltatune as dt
from deltatune.methods.increlora import RESERVE_LAMBDA, growth_schedule
from deltatune.train.loop import sync_optimizer

TARGETS = ["q_proj", "v_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add waits


def loss(tuned, x) -> torch.Tensor:
    return tuned(**x).logits.float().logsumexp(-1).mean()


def run(tuned, steps: int, x, total: int | None = None) -> list[int]:
    """The native loop's order: backward, step, policy, sync_optimizer. Returns the total rank after each step."""
    tuned.policy.plan(total or steps, 1)
    opt = torch.optim.AdamW(list(tuned.deltas.parameters()), lr=1e-2)
    trainable = {id(p) for p in tuned.deltas.parameters() if p.requires_grad}
    totals = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        (loss(tuned, x) + tuned.policy.extra_loss(tuned)).backward()
        opt.step()
        tuned.policy.after_optimizer_step(step, tuned, opt)
        trainable = sync_optimizer(opt, tuned, trainable)
        totals.append(tuned.policy.total_rank())
    return totals


def test_fresh_delta_is_the_base_until_reserves_come() -> None:
    x = batch()
    tuned = dt.attach(tiny_llama(), "increlora", targets=TARGETS)
    assert torch.equal(output_of(tuned, x), output_of(tiny_llama(), x))
    assert tuned.policy.budget == 2 * 6 and tuned.policy.total_rank() == 6


def test_score_equals_autograd_on_the_materialised_delta() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    tuned = dt.attach(model, "increlora", targets=["0"], init_r=2)
    form = tuned.forms()["0.weight"]
    with torch.no_grad():
        form.E.normal_()
    x = torch.randn(4, 3, 6)
    tuned.train()
    tuned(x).pow(2).sum().backward()
    score = form.take_score()
    dw = form.delta_weight().detach().requires_grad_(True)  # the same function with ΔW as a leaf
    out = nn.functional.linear(x, model[0].weight + dw, model[0].bias)
    (g,) = torch.autograd.grad(out.pow(2).sum(), dw)
    expected = (dw.detach() * g).abs().sum().item() / dw.numel() ** 0.5
    assert score == pytest.approx(expected, rel=1e-5) and expected > 0


def test_one_allocation_adds_exactly_the_rank_parameters_and_optimizer_slots() -> None:
    x = batch()
    tuned = dt.attach(tiny_llama(), "increlora", targets=TARGETS, top_h=1, incre_rank_num=2, target_rank=4,
                      init_warmup=100, incre_interval=100)
    run(tuned, 1, x, total=500)  # step 0: reserves for every matrix
    pol = tuned.policy
    names = pol.names
    for i, n in enumerate(names):  # fabricated smoothed scores: module 3 wins
        pol.importance.avg[n] = torch.tensor(float(i == 3), dtype=torch.float64)
        pol.importance.unc[n] = torch.tensor(1.0, dtype=torch.float64)
    opt = torch.optim.AdamW(list(tuned.deltas.parameters()), lr=1e-2)
    before_opt = sum(len(g["params"]) for g in opt.param_groups)
    before, trainable = tuned.num_trainable(), {id(p) for p in tuned.deltas.parameters() if p.requires_grad}
    assert pol.grow() == [names[3]]
    sync_optimizer(opt, tuned, trainable)
    form = tuned.forms()[names[3]]
    d_in, d_out = form.d_in, form.d_out
    assert pol.ranks()[names[3]] == 1 + 2 and form.ranknum == 3
    assert tuned.num_trainable() - before == 2 * (d_in + d_out) + 2
    assert sum(len(g["params"]) for g in opt.param_groups) - before_opt == 2 * 3, "new reserves join the optimizer"


def test_growth_follows_the_schedule_and_stops_at_the_budget() -> None:
    assert [s for s, _ in growth_schedule(4, 8, 1, 1, 10, 5, 4)] == [15, 20, 25, 30]
    x = batch()
    tuned = dt.attach(tiny_llama(), "increlora", targets=["q_proj"], layers=[0, 1], init_r=1, target_rank=2,
                      top_h=1, init_warmup=4, incre_interval=2)
    expected = growth_schedule(2, 4, 1, 1, 4, 2, 2)
    assert expected == [(6, 3), (8, 4)]
    totals = run(tuned, 11, x)
    assert totals == [2] * 6 + [3, 3, 4, 4, 4], "the rank after each growth step equals the schedule's"
    assert tuned.policy.done
    assert all(f._probe is None for f in tuned.policy._forms().values()), "scoring stops at the budget"
    for f in tuned.policy._forms().values():  # the last reserves are off: λ = 0, frozen
        assert all(e.item() == 0 and not a.requires_grad for a, e, _ in f.reserves)


def test_budget_is_never_passed_when_the_rank_step_does_not_divide_it() -> None:
    x = batch()
    tuned = dt.attach(tiny_llama(), "increlora", targets=TARGETS, top_h=2, incre_rank_num=2, budget=9,
                      init_warmup=1, incre_interval=1)
    totals = run(tuned, 6, x)
    assert totals == [6, 6, 9, 9, 9, 9] and tuned.policy.done, "one round: +2 and +1, never past 9"


def test_reserves_learn_ahead_while_their_lambda_stays_fixed() -> None:
    x = batch()
    tuned = dt.attach(tiny_llama(), "increlora", targets=TARGETS, init_warmup=50, incre_interval=50)
    run(tuned, 1, x, total=200)
    form = next(iter(tuned.policy._forms().values()))
    a0 = [a.detach().clone() for a, _, _ in form.reserves]
    opt = torch.optim.AdamW(list(tuned.deltas.parameters()), lr=1e-2)
    for step in range(1, 4):
        opt.zero_grad()
        (loss(tuned, x) + tuned.policy.extra_loss(tuned)).backward()
        opt.step()
        tuned.policy.after_optimizer_step(step, tuned, opt)
    assert all(not torch.equal(a, b) for (a, _, _), b in zip(form.reserves, a0, strict=True)), "reserve A trains"
    assert all(e.item() == pytest.approx(RESERVE_LAMBDA) and not e.requires_grad for _, e, _ in form.reserves)
    assert form.ranknum == 1


def test_artifact_round_trip_knows_final_ranks_and_merges(tmp_path) -> None:
    x = batch()
    tuned = dt.attach(tiny_llama(), "increlora", targets=TARGETS, top_h=2, target_rank=3, init_warmup=1,
                      incre_interval=1)
    run(tuned, 9, x)
    ranks = tuned.policy.ranks()
    assert tuned.policy.done and sum(ranks.values()) == 18 and len(set(ranks.values())) > 1
    trained = output_of(tuned, x)
    tuned.save(tmp_path / "a")
    loaded = dt.load(tiny_llama(), tmp_path / "a")
    assert {n: int(f.ranknum) for n, f in loaded.forms().items()} == ranks
    assert {n: f.r for n, f in loaded.forms().items()} == ranks, "reserves (λ = 0) are not stored"
    assert (output_of(loaded, x) - trained).abs().max() <= 1e-6
    plain = tuned.merge()
    assert (output_of(plain, x) - trained).abs().max() <= 1e-5


@pytest.mark.parametrize("kill_after", [3, 5], ids=["mid-growth", "after-budget"])
def test_resume_ends_bit_identical_to_an_uninterrupted_run(word_run, kill_after: int, tmp_path) -> None:
    out = tmp_path / "run"
    method = {"name": "increlora", "target_rank": 2, "top_h": 3, "init_warmup": 1, "incre_interval": 1, "dropout": 0.1}
    cfg = word_run_config(word_run, method, out, save_every=1, keep_last=10)
    _, resumed = train_then_resume(cfg, keep=kill_after)
    assert resumed["resumed_from"] == kill_after
    folder = word_run[0]
    loaded = dt.load(dt.models.load(folder), out)
    assert sum(int(f.ranknum) for f in loaded.forms().values()) == 2 * len(loaded.forms())
