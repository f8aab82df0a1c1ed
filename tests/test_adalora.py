"""AdaLoRA: parity with PEFT's AdaLoraModel (initial triplets, logits, loss with the orthogonal term, masks
after budget steps on the same gradients), the schedule, masking, importance smoothing, the orthogonality
term, artifact round trips with pruned ranks, and exact resume through dt.train."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, output_of, tiny_llama, train_then_resume, word_run_config

import deltatune as dt
from deltatune.methods._importance import SmoothedImportance, orthogonality
from deltatune.methods.adalora import budget_at

peft = pytest.importorskip("peft")
from peft import AdaLoraConfig, get_peft_model  # noqa: E402

TOL = 1e-5
TARGETS = ["q_proj", "v_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add waits


def pair(seed: int = 3, **schedule):
    """The same tiny Llama with deltatune's and PEFT's AdaLoRA (same seed, same config)."""
    opts = {"init_r": 4, "target_r": 2, "tinit": 2, "tfinal": 3, "delta_t": 2, **schedule}
    torch.manual_seed(seed)
    ours = dt.attach(tiny_llama(), "adalora", alpha=8.0, orth_reg_weight=0.5, targets=TARGETS, total_step=12, **opts)
    ours.policy.plan(12, 1)
    torch.manual_seed(seed)
    theirs = get_peft_model(tiny_llama(), AdaLoraConfig(
        init_r=opts["init_r"], target_r=opts["target_r"], tinit=opts["tinit"], tfinal=opts["tfinal"],
        deltaT=opts["delta_t"], lora_alpha=8, orth_reg_weight=0.5, target_modules=TARGETS, total_step=12))
    return ours, theirs


def peft_triplets(model) -> dict[str, tuple[torch.nn.Parameter, ...]]:
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_E") and "default" in module.lora_E:
            key = name.removeprefix("base_model.model.") + ".weight"
            out[key] = (module.lora_A["default"], module.lora_E["default"], module.lora_B["default"])
    return out


def test_initial_triplets_and_logits_match_peft() -> None:
    ours, theirs = pair()
    x = batch()
    theirs_t = peft_triplets(theirs)
    assert set(theirs_t) == set(ours.forms())
    for name, form in ours.forms().items():
        a, e, b = theirs_t[name]
        assert torch.equal(form.A, a) and torch.equal(form.E, e) and torch.equal(form.B, b), name
        assert torch.count_nonzero(form.E) == 0
    base = output_of(tiny_llama(), x)
    assert torch.equal(output_of(ours, x), base), "λ = 0: the fresh delta is the base model exactly"
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # give Λ values, the same in both, to compare a non-trivial forward
        for name, form in ours.forms().items():
            form.E.copy_(torch.randn(form.E.shape, generator=g))
            theirs_t[name][1].copy_(form.E)
    diff = (output_of(ours, x) - output_of(theirs, x)).abs().max().item()
    assert diff <= TOL and not torch.allclose(output_of(ours, x), base)
    # the training loss with the orthogonal regulariser: PEFT's AdaLoraModel.forward adds it when labels are
    # given (PeftModelForCausalLM.forward bypasses it in peft 0.21, so call the tuner model)
    ids = x["input_ids"]
    loss_ours = ours(input_ids=ids, labels=ids).loss + ours.policy.extra_loss(ours)
    loss_theirs = theirs.base_model(input_ids=ids, labels=ids).loss
    assert abs(loss_ours.item() - loss_theirs.item()) <= TOL


def test_masks_match_peft_update_and_allocate_on_the_same_gradients() -> None:
    """Same parameters and gradients each step -> the same λ, masks and final rank pattern as PEFT, through
    the warm-up, the cubic phase (masks every 2 steps) and the final phase (T=12, t_init=2, t_final=3)."""
    ours, theirs = pair()
    theirs_t = peft_triplets(theirs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, form in ours.forms().items():
            form.E.copy_(torch.randn(form.E.shape, generator=g))
            theirs_t[name][1].copy_(form.E)
    for step in range(12):
        for name, form in ours.forms().items():
            for mine, other in zip((form.A, form.E, form.B), theirs_t[name], strict=True):
                grad = torch.randn(mine.shape, generator=g)
                mine.grad, other.grad = grad.clone(), grad.clone()
                with torch.no_grad():  # the same plain SGD step in both
                    mine -= 0.01 * grad
                    other -= 0.01 * grad
        ours.policy.after_optimizer_step(step, ours, None)
        theirs.base_model.update_and_allocate(step)
        for name, form in ours.forms().items():
            assert torch.equal(form.E, theirs_t[name][1]), (step, name)
    pattern = theirs.peft_config["default"].rank_pattern
    for name, keep in ours.policy.rank_pattern.items():
        assert keep.tolist() == pattern[name.removesuffix(".weight") + ".lora_E.default"]
    assert sum(ours.policy.ranks().values()) == 2 * len(ours.forms()), "the final budget is target_r × #matrices"


def test_budget_schedule_is_cubic_and_monotone() -> None:
    b = [budget_at(t, 120, 40, 10, 10, 100, 1)[0] for t in range(101)]
    assert b[10] == 120 and b[90] == 40 and b[100] == 40
    assert all(x >= y for x, y in zip(b, b[1:], strict=False))
    assert b[50] == int(80 * 0.5 ** 3 + 40) == 50  # the midpoint of the cubic phase
    assert budget_at(11, 120, 40, 10, 10, 100, 5) == (int(80 * (1 - 1 / 80) ** 3 + 40), False)
    assert budget_at(15, 120, 40, 10, 10, 100, 5)[1] and budget_at(95, 120, 40, 10, 10, 100, 5)[1]


def test_one_allocation_zeroes_exactly_b0_minus_b_lambdas() -> None:
    tuned = dt.attach(tiny_llama(), "adalora", init_r=4, target_r=2, total_step=100, tinit=10, tfinal=10)
    tuned.policy.plan(100, 1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for form in tuned.forms().values():
            form.E.copy_(torch.rand(form.E.shape, generator=g) + 0.5)
    imp = tuned.policy.importance
    for name, form in tuned.forms().items():  # fabricated, distinct scores (avg · unc)
        for t in ("A", "E", "B"):
            imp.avg[f"{name}.{t}"] = torch.rand(getattr(form, t).shape, generator=g)
            imp.unc[f"{name}.{t}"] = torch.ones(getattr(form, t).shape)
    b0 = tuned.policy.init_bgt
    budget, _ = tuned.policy.budget(40)
    assert b0 == 4 * 21 and budget < b0
    tuned.policy.mask_to_budget(budget)
    zeros = sum(int((f.E == 0).sum()) for f in tuned.forms().values())
    assert zeros == b0 - budget
    scores = torch.cat(list(tuned.policy.triplet_scores().values()))
    kept = torch.cat([f.E.reshape(-1) != 0 for f in tuned.forms().values()])
    assert scores[~kept].max() < scores[kept].min(), "the lowest-scoring triplets go"


def test_importance_is_the_smoothed_sensitivity_of_a_toy_run() -> None:
    tuned = dt.attach(tiny_llama(), "adalora", init_r=2, target_r=1, targets=["q_proj"], layers=[0], total_step=50)
    tuned.policy.plan(50, 1)
    form = next(iter(tuned.forms().values()))
    x = batch()
    avg = unc = torch.zeros_like(form.E)
    for step in range(2):
        tuned.zero_grad()
        tuned(**x).logits.pow(2).mean().backward()
        with torch.no_grad():  # the step, then the score on the updated value and this step's gradient (PEFT)
            form.E -= 0.1 * form.E.grad
        ipt = (form.E * form.E.grad).abs()
        avg = 0.85 * avg + 0.15 * ipt
        unc = 0.85 * unc + 0.15 * (ipt - avg).abs()
        tuned.policy.after_optimizer_step(step, tuned, None)
    name = next(iter(tuned.forms()))
    assert torch.allclose(tuned.policy.importance.score(f"{name}.E"), avg * unc, rtol=1e-6, atol=0)
    assert (avg * unc).abs().sum() > 0


def test_smoothing_state_round_trips() -> None:
    a = SmoothedImportance(0.85, 0.85)
    a.update("k", torch.tensor([1.0, 2.0]))
    b = SmoothedImportance(0.85, 0.85)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.score("k"), b.score("k"))


def test_orthogonality_is_zero_for_orthonormal_factors() -> None:
    q, _ = torch.linalg.qr(torch.randn(8, 3))
    assert orthogonality([q.T.contiguous()], [q]).item() < 1e-6  # Q rows and P columns orthonormal
    assert orthogonality([2 * q.T.contiguous()], [q]).item() > 1


def test_pruned_artifact_knows_each_rank_and_reproduces_logits(tmp_path) -> None:
    torch.manual_seed(0)
    tuned = dt.attach(tiny_llama(), "adalora", init_r=4, target_r=2, total_step=8, tinit=1, tfinal=2, delta_t=1)
    tuned.policy.plan(8, 1)
    x = batch()
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
    for step in range(8):
        opt.zero_grad()
        (tuned(**x).logits.float().logsumexp(-1).mean() + tuned.policy.extra_loss(tuned)).backward()
        opt.step()
        tuned.policy.after_optimizer_step(step, tuned, opt)
    ranks = tuned.policy.ranks()
    assert sum(ranks.values()) == 2 * len(ranks) and len(set(ranks.values())) > 1, "ranks flowed between matrices"
    trained = output_of(tuned, x)
    tuned.save(tmp_path / "a")
    loaded = dt.load(tiny_llama(), tmp_path / "a")
    assert {n: f.r for n, f in loaded.forms().items()} == ranks
    assert (output_of(loaded, x) - trained).abs().max() <= 1e-6
    full = sum(p.numel() * p.element_size() for p in tuned.deltas.parameters())
    assert tuned.stored_bytes() == loaded.stored_bytes() < 0.6 * full, "the artifact holds the pruned shapes"
    plain = loaded.merge()
    assert (output_of(plain, x) - trained).abs().max() <= TOL


def test_bad_schedules_name_the_fix() -> None:
    tuned = dt.attach(tiny_llama(), "adalora", tinit=5, tfinal=5)
    with pytest.raises(dt.DeltatuneError, match="no budgeting phase"):
        tuned.policy.plan(10, 1)
    with pytest.raises(dt.DeltatuneError, match="target_r"):
        dt.attach(tiny_llama(), "adalora", init_r=2, target_r=3)
    tuned = dt.attach(tiny_llama(), "adalora")
    tuned.policy.plan(1, 1)  # a one-step run: shares of the run leave one budgeting step
    assert tuned.policy.schedule == (1, 0, 0)


def test_resume_ends_bit_identical_to_an_uninterrupted_run(word_run, tmp_path) -> None:
    out = tmp_path / "run"
    method = {"name": "adalora", "init_r": 3, "target_r": 1, "tinit": 1, "tfinal": 2, "delta_t": 1}
    cfg = word_run_config(word_run, method, out, save_every=3, keep_last=3)
    _, resumed = train_then_resume(cfg, keep=1)  # died after step 3: mid-pruning, smoothed scores checkpointed
    assert resumed["resumed_from"] == 3
    folder = word_run[0]
    loaded = dt.load(dt.models.load(folder), out)
    assert sum(f.r for f in loaded.forms().values()) == len(loaded.forms()), "target_r = 1 per matrix"
