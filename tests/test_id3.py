"""ID3: the spec's CPU tests (schedule, selection, λ, monotone masks, masked weight decay, summary round
trip, ties), the dense -> sparse switch, bad budgets, and exact resume through dt.train."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import batch, output_of, tiny_llama, train_then_resume, word_run_config

import deltatune as dt
from deltatune.core.forms.sparse import Sparse
from deltatune.methods.id3 import MaskedDense, pack_mask, unmask_count, unmasked_by, unpack_mask
from deltatune.train.loop import sync_optimizer
from deltatune.train.state import load_checkpoint

NAMES = ["0.weight", "2.weight"]
N_TOY = 6 * 8 + 8 * 4


def toy(**options) -> dt.Tuned:
    """Two bias-free Linear layers, both targeted by module name."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 4, bias=False))
    return dt.attach(model, "id3", targets=["0", "2"], **options)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(32, 6, generator=g), torch.randint(0, 4, (32,), generator=g)


def train(tuned: dt.Tuned, steps: int, *, total: int | None = None, lr: float = 1e-2, weight_decay: float = 0.0,
          on_step=None) -> torch.optim.Optimizer:
    """The native loop's order of calls: backward, policy, step, policy, optimizer sync."""
    x, y = data()
    tuned.policy.plan(total or steps, 1)
    opt = torch.optim.AdamW(list(tuned.deltas.parameters()), lr=lr, weight_decay=weight_decay)
    trainable = {id(p) for p in tuned.deltas.parameters() if p.requires_grad}
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(tuned(x), y).backward()
        tuned.policy.before_optimizer_step(step, tuned, opt)
        opt.step()
        tuned.policy.after_optimizer_step(step, tuned, opt)
        trainable = sync_optimizer(opt, tuned, trainable)
        if on_step is not None:
            on_step(step, tuned)
    return opt


def chosen_sets(tuned: dt.Tuned) -> dict[str, set[int]]:
    out = {}
    for name, form in tuned.forms().items():
        if isinstance(form, Sparse):
            out[name] = set(form.indices.tolist())
        else:
            out[name] = set(torch.nonzero(form.mask.reshape(-1)).flatten().tolist())
    return out


def effective(form) -> torch.Tensor:
    return form.base.detach() + form.delta_weight().detach()


def set_grads(tuned: dt.Tuned, grads: dict[str, torch.Tensor]) -> None:
    for name, g in grads.items():
        tuned.forms()[name].delta.grad = g.clone()


# -- 1. schedule ----------------------------------------------------------------------------------
def test_schedule_spreads_the_budget_with_the_extra_units_first_and_stops_at_T() -> None:
    assert [unmask_count(10, 4, t) for t in range(7)] == [3, 3, 2, 2, 0, 0, 0]
    assert [unmasked_by(10, 4, t) for t in range(7)] == [3, 6, 8, 10, 10, 10, 10]
    assert [unmask_count(3, 5, t) for t in range(6)] == [1, 1, 1, 0, 0, 0]  # B < T
    assert [unmask_count(12, 4, t) for t in range(4)] == [3, 3, 3, 3]
    # the policy follows it, and a run longer than T (the official code keeps unmasking) stays at B
    counts: list[int] = []
    train(toy(budget=10, max_steps=4), 7, on_step=lambda s, t: counts.append(t.policy.chosen(t)))
    assert counts == [3, 6, 8, 10, 10, 10, 10]


# -- 2. selection ---------------------------------------------------------------------------------
def test_the_globally_largest_gradients_are_chosen_and_the_rest_masked() -> None:
    tuned = toy(budget=6, max_steps=2)
    tuned.policy.plan(2, 1)
    g = torch.Generator().manual_seed(0)
    grads = {n: torch.rand(tuned.forms()[n].delta.shape, generator=g) - 0.5 for n in NAMES}  # |g| < 0.5
    grads["0.weight"][1, 3], grads["0.weight"][6, 0] = -5.0, 4.0
    grads["2.weight"][3, 7] = 4.5
    set_grads(tuned, grads)
    tuned.policy.before_optimizer_step(0, tuned, None)
    assert chosen_sets(tuned) == {"0.weight": {1 * 6 + 3, 6 * 6 + 0}, "2.weight": {3 * 8 + 7}}
    for name in NAMES:
        form = tuned.forms()[name]
        assert torch.equal(form.delta.grad, torch.where(form.mask, grads[name], 0.0)), "gradients off the mask are 0"


@pytest.mark.parametrize("exp", [0.0, 0.5, 1.0])
def test_choice_is_the_top_of_the_d3_score(exp: float) -> None:
    tuned = toy(budget=10, max_steps=2, exp=exp, eps=1e-3)
    tuned.policy.plan(2, 1)
    g = torch.Generator().manual_seed(1)
    grads = {n: torch.randn(tuned.forms()[n].delta.shape, generator=g) for n in NAMES}
    set_grads(tuned, grads)
    tuned.policy.before_optimizer_step(0, tuned, None)
    h = torch.cat([(grads[n].abs() / (1e-3 + tuned.forms()[n].base.abs()) ** exp).reshape(-1) for n in NAMES])
    top = set(torch.argsort(h, descending=True)[:5].tolist())
    got = chosen_sets(tuned)
    assert {i for i in got["0.weight"]} | {48 + i for i in got["2.weight"]} == top


# -- 3. λ = 1 prefers small weights ---------------------------------------------------------------------
def test_lambda_one_with_equal_gradients_prefers_the_smallest_weights() -> None:
    tuned = toy(budget=14, max_steps=2, exp=1.0)
    tuned.policy.plan(2, 1)
    set_grads(tuned, {n: torch.ones_like(tuned.forms()[n].delta) for n in NAMES})
    tuned.policy.before_optimizer_step(0, tuned, None)
    w = torch.cat([tuned.forms()[n].base.abs().reshape(-1) for n in NAMES])
    got = chosen_sets(tuned)
    assert {i for i in got["0.weight"]} | {48 + i for i in got["2.weight"]} == set(torch.argsort(w)[:7].tolist())
    # λ = 0 on the same gradients is a pure tie: the first entries instead
    plain = toy(budget=14, max_steps=2, exp=0.0)
    plain.policy.plan(2, 1)
    set_grads(plain, {n: torch.ones_like(plain.forms()[n].delta) for n in NAMES})
    plain.policy.before_optimizer_step(0, plain, None)
    assert chosen_sets(plain) == {"0.weight": set(range(7)), "2.weight": set()}


# -- 4. monotone, never above B -----------------------------------------------------------------
def test_masks_only_grow_and_never_exceed_the_budget() -> None:
    history: list[dict[str, set[int]]] = []
    train(toy(budget=25, max_steps=6), 9, on_step=lambda s, t: history.append(chosen_sets(t)))
    for step, (before, after) in enumerate(zip([{n: set() for n in NAMES}] + history, history, strict=False)):
        assert all(before[n] <= after[n] for n in NAMES), f"an entry left the mask at step {step}"
        assert sum(len(s) for s in after.values()) == unmasked_by(25, 6, step) <= 25


# -- 5. unchosen weights never move, weight decay included ------------------------------------------
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_unchosen_weights_are_bitwise_unchanged_after_20_steps(weight_decay: float) -> None:
    tuned = toy(budget=15, max_steps=10)
    w0 = {n: tuned.forms()[n].base.detach().clone() for n in NAMES}

    def check(step: int, t: dt.Tuned) -> None:
        for name, idx in chosen_sets(t).items():
            off = torch.ones(w0[name].numel(), dtype=torch.bool)
            off[list(idx)] = False
            w = effective(t.forms()[name]).reshape(-1)
            assert torch.equal(w[off], w0[name].reshape(-1)[off]), f"an unchosen entry of {name} moved at step {step}"
        if isinstance(t.forms()["0.weight"], MaskedDense):  # dense phase: the module computes with W0 + Δ
            assert torch.equal(t.model[0].weight, effective(t.forms()["0.weight"]))

    train(tuned, 20, lr=5e-2, weight_decay=weight_decay, on_step=check)
    assert tuned.policy.phase == "sparse"
    moved = sum(int((effective(tuned.forms()[n]) != w0[n]).sum()) for n in NAMES)
    assert moved == 15, "every chosen entry trains"


# -- 6. summary round trip ----------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [2, 5], ids=["dense-phase", "after-switch"])
def test_summary_round_trip_in_memory_and_from_disk(steps: int, tmp_path) -> None:
    x = batch()
    tuned = dt.attach(tiny_llama(), "id3", budget=120)
    tuned.policy.plan(4, 1)
    opt = torch.optim.AdamW(list(tuned.deltas.parameters()), lr=1e-2, weight_decay=0.01)
    trainable = {id(p) for p in tuned.deltas.parameters() if p.requires_grad}
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        tuned(**x).logits.float().logsumexp(-1).mean().backward()
        tuned.policy.before_optimizer_step(step, tuned, opt)
        opt.step()
        tuned.policy.after_optimizer_step(step, tuned, opt)
        trainable = sync_optimizer(opt, tuned, trainable)
    assert tuned.policy.phase == ("dense" if steps < 4 else "sparse")
    trained = output_of(tuned, x)
    summary = tuned.delta_state_dict()
    n_chosen = unmasked_by(120, 4, steps - 1)
    assert sum(v.numel() for k, v in summary.items() if k.endswith(".values")) == n_chosen, "O(B): chosen entries only"
    assert tuned.stored_bytes() == n_chosen * (4 + 4)

    in_memory = dt.attach(tiny_llama(), tuned.method_config, _loading=True)
    in_memory.load_delta_state_dict(summary)
    assert torch.equal(output_of(in_memory, x), trained)
    tuned.save(tmp_path / "a")
    from_disk = dt.load(tiny_llama(), tmp_path / "a")
    assert torch.equal(output_of(from_disk, x), trained)
    for name, form in tuned.forms().items():
        assert torch.equal(effective(from_disk.forms()[name]), effective(form)), name


# -- 7. ties --------------------------------------------------------------------------------------
def test_all_scores_equal_still_unmask_exactly_n_t() -> None:
    tuned = toy(budget=10, max_steps=4)
    tuned.policy.plan(4, 1)
    counts = []
    for step in range(4):
        set_grads(tuned, {n: torch.full_like(tuned.forms()[n].delta, 0.25) for n in NAMES})
        tuned.policy.before_optimizer_step(step, tuned, None)
        counts.append(tuned.policy.chosen(tuned))
    assert counts == [3, 6, 8, 10]
    assert chosen_sets(tuned) == {"0.weight": set(range(10)), "2.weight": set()}, "ties go to the first entries"


# -- the switch, the forms, bad input -------------------------------------------------------------------
def test_switch_to_sparse_trains_like_the_dense_masked_run() -> None:
    """Optimizer moments of the chosen entries carry over: the sparse phase continues the dense one."""
    switched, kept = toy(budget=20, max_steps=3), toy(budget=20, max_steps=3)
    kept.policy.after_optimizer_step = lambda *a: None  # never switch: dense with a gradient mask throughout
    train(switched, 8, lr=3e-2)
    train(kept, 8, lr=3e-2)
    assert all(isinstance(f, Sparse) for f in switched.forms().values())
    assert all(isinstance(f, MaskedDense) for f in kept.forms().values())
    assert switched.num_trainable() == 20 and kept.num_trainable() == N_TOY
    for name in NAMES:
        a, b = effective(switched.forms()[name]), effective(kept.forms()[name])
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
        assert not torch.equal(a, switched.forms()[name].base)


def test_masks_pack_eight_entries_a_byte() -> None:
    mask = torch.rand(5, 7, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == 5  # ceil(35 / 8)
    assert torch.equal(unpack_mask(packed, mask.shape), mask)


def test_bad_budgets_and_targets_name_the_fix() -> None:
    with pytest.raises(dt.DeltatuneError, match="positive"):
        toy(budget=0)
    with pytest.raises(dt.DeltatuneError, match="exceeds the 80 targeted"):
        toy(budget=81)
    with pytest.raises(dt.DeltatuneError, match="not both"):
        toy(budget=5, density=0.1)
    with pytest.raises(dt.DeltatuneError, match=r"\(0, 1\]"):
        toy(density=0.0)
    with pytest.raises(dt.DeltatuneError, match="no entry at all"):
        toy(density=0.001)
    with pytest.raises(dt.DeltatuneError, match="'q_porj' matches no"):
        dt.attach(tiny_llama(), "id3", targets=["q_porj"])
    assert toy(budget=N_TOY).policy.budget == N_TOY
    assert toy(density=0.5).policy.budget == 40
    default = dt.attach(tiny_llama(), "id3")  # block matrices only, not embeddings or head
    assert all(".layers." in n and n.endswith("_proj.weight") for n in default.forms())
    with pytest.raises(dt.DeltatuneError, match="plan"):
        t = toy(budget=4)
        t.policy.before_optimizer_step(0, t, None)


def test_a_one_step_run_unmasks_the_whole_budget(tmp_path) -> None:
    tuned = toy(density=0.25)
    train(tuned, 1)
    assert tuned.policy.phase == "sparse" and tuned.num_trainable() == 20


# -- resume -----------------------------------------------------------------------------------
@pytest.mark.parametrize("max_steps", [4, 2], ids=["mid-unmasking", "right-after-switch"])
def test_resume_ends_bit_identical_to_an_uninterrupted_run(word_run, max_steps: int, tmp_path) -> None:
    out = tmp_path / "run"
    method = {"name": "id3", "budget": 200, "max_steps": max_steps, "exp": 0.5}
    cfg = word_run_config(word_run, method, out, steps=6, keep_last=3)

    def inspect(folders: list) -> None:  # the run dies after writing step 2
        policy = load_checkpoint(folders[0])["policy"]
        if max_steps == 4:
            assert policy["phase"] == "dense"
            assert all(m.dtype == torch.uint8 for m in policy["masks"].values()), "masks are bit-packed"
            assert sum(m.numel() for m in policy["masks"].values()) == sum((n + 7) // 8 for n in [256, 128, 128, 256,
                                                                                                     512, 512, 512] * 2)
        else:
            assert policy["phase"] == "sparse" and policy["moments"], "the switch's moments wait in the checkpoint"

    straight, resumed = train_then_resume(cfg, keep=1, inspect=inspect)
    assert resumed["resumed_from"] == 2
    folder = word_run[0]
    assert straight["trainable"] == 200
    loaded = dt.load(dt.models.load(folder), out)
    assert sum(f.k for f in loaded.forms().values()) == 200
