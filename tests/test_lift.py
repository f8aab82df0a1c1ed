"""LIFT: budget, Principal-Weight masks, sparse Adam, refresh, artifact of the union, decay, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import batch, loss_of, output_of, tiny_gpt2, tiny_llama

import deltatune as dt
from deltatune.methods import lift
from deltatune.methods.lift import LiftPolicy, LiftSparse, budget, principal_indices

# k = (m+n) of m·n entries: a real selection on tiny matrices; the SVD on the CPU wherever the tests run
SMALL = {"lora_rank": 1, "approx_rank": 1, "svd_device": "cpu"}
FEW = {**SMALL, "targets": ["q_proj", "up_proj"]}  # 6 matrices of tiny_llama: fewer SVDs per refresh


def forms(tuned: dt.Tuned) -> dict[str, LiftSparse]:
    return tuned.forms()  # type: ignore[return-value]


def train(tuned: dt.Tuned, steps: int, lr: float = 1e-2, wd: float = 0.0, on_step=None, start: int = 0,
          optimizer: torch.optim.Optimizer | None = None) -> torch.optim.Optimizer:
    """The native loop's calls: optimizer from the policy, after_optimizer_step after every step."""
    policy: LiftPolicy = tuned.policy
    opt = optimizer or policy.make_optimizer(list(tuned.deltas.parameters()), lr, wd)
    x = batch()
    for step in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        loss_of(tuned, x).backward()
        opt.step()
        if on_step:
            on_step(step, opt)
        policy.after_optimizer_step(step, tuned, opt)
    return opt


def weights(tuned: dt.Tuned) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {n: f.effective_weight(torch.float32) for n, f in forms(tuned).items()}


# 1 -------------------------------------------------------------------------------------------------
def test_budget_is_a_lora_count_and_a_large_rank_selects_everything() -> None:
    tuned = dt.attach(tiny_llama(), "lift", lora_rank=2, approx_rank=2)
    assert len(forms(tuned)) == 3 * 7  # q,k,v,o,gate,up,down of 3 blocks; no embeddings, head or norms
    for form in forms(tuned).values():
        m, n = form.shape
        assert form.k == min((m + n) * 2, m * n) == budget(form.shape, 2)
    assert all(f.k < f.numel_base for f in forms(tuned).values()), "r_b = 2 selects on 32..64-wide matrices"
    assert tuned.num_trainable() == sum(f.k for f in forms(tuned).values())
    full = dt.attach(tiny_llama(), "lift")  # r_b = 128 on 32..64-wide matrices: every entry
    for form in forms(full).values():
        assert form.k == form.numel_base
        assert torch.equal(form.indices.long(), torch.arange(form.numel_base))


# 2 -------------------------------------------------------------------------------------------------
def test_mask_is_top_k_of_the_low_rank_approximation_not_the_residual() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g)
    k, r = 100, 3
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    approx = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
    expected = torch.topk(approx.abs().flatten(), k).indices.sort().values
    mask = principal_indices(w, k, r, device="cpu")
    assert torch.equal(mask, expected)
    residual = torch.topk((w - approx).abs().flatten(), k).indices.sort().values
    magnitude = torch.topk(w.abs().flatten(), k).indices.sort().values
    assert not torch.equal(mask, residual) and not torch.equal(mask, magnitude)
    # r̃ = min(m, n): the approximation is W itself, the mask the plain magnitude mask
    assert torch.equal(principal_indices(w, k, 24, device="cpu"), magnitude)
    # the builder's first mask is the same function of W0
    model = tiny_llama()
    w0 = model.model.layers[1].mlp.up_proj.weight.detach().clone()
    tuned = dt.attach(model, "lift", lora_rank=1, approx_rank=2, svd_device="cpu")
    form = forms(tuned)["model.layers.1.mlp.up_proj.weight"]
    assert torch.equal(form.indices.long(), principal_indices(w0, form.k, 2, device="cpu"))


def test_conv1d_mask_is_chosen_on_the_matrix_and_indexed_in_its_own_layout() -> None:
    model = tiny_gpt2()
    w = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # Conv1D: (in, out)
    tuned = dt.attach(model, "lift", **SMALL)
    form = forms(tuned)["transformer.h.0.attn.c_attn.weight"]
    n_in, n_out = w.shape
    # the mask of the (out, in) matrix, as the official code sees an nn.Linear, mapped to (in, out)
    on_t = principal_indices(w.T.contiguous(), form.k, 1, device="cpu")
    o, i = on_t // n_in, on_t % n_in
    assert torch.equal(form.indices.long(), (i * n_out + o).sort().values)
    x = batch()  # the forward and backward run through the Conv1D path
    train(tuned, 1)
    assert not torch.equal(output_of(tuned, x), output_of(tiny_gpt2(), x))


def test_randomized_svd_is_repeatable_and_leaves_the_run_rng_alone() -> None:
    model_a, model_b = tiny_llama(), tiny_llama()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = dt.attach(model_a, "lift", svd="randomized", **SMALL)
    assert torch.equal(torch.get_rng_state(), before), "mask selection must not consume the run's random draws"
    b = dt.attach(model_b, "lift", svd="randomized", **SMALL)
    for (n, fa), fb in zip(forms(a).items(), forms(b).values(), strict=True):
        assert torch.equal(fa.indices, fb.indices), n
    # rank-r̃ plus tiny noise: the randomized SVD finds the same mask as the full one
    g = torch.Generator().manual_seed(1)
    w = torch.randn(30, 2, generator=g) @ torch.randn(2, 50, generator=g) + 1e-4 * torch.randn(30, 50, generator=g)
    assert torch.equal(principal_indices(w, 200, 2, "randomized", device="cpu"), principal_indices(w, 200, 2, device="cpu"))


# 3 -------------------------------------------------------------------------------------------------
def test_a_step_changes_only_masked_entries_and_adam_state_has_length_k() -> None:
    model = tiny_llama()
    tuned = dt.attach(model, "lift", **FEW, update_interval=100)
    w0 = {n: f.base.detach().clone() for n, f in forms(tuned).items()}
    opt = train(tuned, 2)
    for name, w in weights(tuned).items():
        form = forms(tuned)[name]
        outside = torch.ones(form.numel_base, dtype=torch.bool)
        outside[form.indices.long()] = False
        assert torch.equal(w.view(-1)[outside], w0[name].view(-1)[outside]), name
        assert not torch.equal(w.view(-1)[~outside], w0[name].view(-1)[~outside]), name
        state = opt.state[form.values]
        assert {k: tuple(state[k].shape) for k in ("exp_avg", "exp_avg_sq", "age")} == dict.fromkeys(
            ("exp_avg", "exp_avg_sq", "age"), (form.k,))
        assert torch.equal(state["age"], torch.full((form.k,), 2.0))
    assert all(p.grad is None or p.grad.numel() == p.numel() for p in tuned.parameters())


# 4 -------------------------------------------------------------------------------------------------
def test_refresh_runs_when_completed_plus_one_is_a_multiple_of_the_interval() -> None:
    tuned = dt.attach(tiny_llama(), "lift", **FEW, update_interval=3)
    seen = []
    real = tuned.policy.refresh
    tuned.policy.refresh = lambda opt=None: (seen.append(tuned.policy.completed), real(opt))  # type: ignore[method-assign]
    train(tuned, 7)
    assert seen == [2, 5]  # (t + 1) mod 3 == 0 with t = completed steps, as the official optimizer
    assert tuned.policy.state_dict() == {"completed": 7, "refreshes": 2}


def test_refresh_recomputes_from_current_weights_and_carries_kept_moments() -> None:
    tuned = dt.attach(tiny_llama(), "lift", **FEW, update_interval=2)
    before: dict[str, dict[str, torch.Tensor]] = {}

    def capture(step: int, opt: torch.optim.Optimizer) -> None:
        if step == 0:  # the step after which (1 + 1) mod 2 == 0: a refresh follows
            for name, form in forms(tuned).items():
                s = opt.state[form.values]
                before[name] = {"idx": form.indices.long().clone(), "values": form.values.detach().clone(),
                                **{k: s[k].clone() for k in ("exp_avg", "exp_avg_sq", "age")}}
            before["_w"] = weights(tuned)  # type: ignore[assignment]

    opt = train(tuned, 1, lr=5e-2, on_step=capture)
    w_before = before.pop("_w")
    kept_total = new_total = 0
    for name, form in forms(tuned).items():
        old = before[name]
        expected = principal_indices(w_before[name], form.k, 1, device="cpu")
        assert torch.equal(form.indices.long(), expected), "the mask comes from the updated W, not W0"
        assert form.k == old["idx"].numel()
        state = opt.state[form.values]
        idx = form.indices.long()
        kept = torch.isin(idx, old["idx"])
        where_old = torch.searchsorted(old["idx"], idx[kept])
        for key in ("exp_avg", "exp_avg_sq", "age", "values"):
            now = form.values.detach() if key == "values" else state[key]
            assert torch.equal(now[kept], old[key][where_old]), key
            if key != "values":
                assert not now[~kept].any(), f"newcomers start with {key} = 0"
        assert not form.values.detach()[~kept].any()
        left = ~torch.isin(old["idx"], idx)
        assert torch.equal(form.past_indices.long(), old["idx"][left])
        assert torch.equal(form.past_values, old["values"][left])
        kept_total += int(kept.sum())
        new_total += int((~kept).sum())
    assert kept_total > 0 and new_total > 0, "the test needs masks that partly move"
    # moving the mask does not move the model
    for name, w in weights(tuned).items():
        assert torch.equal(w, w_before[name]), name
    # the next step trains the new mask with per-entry bias correction: newcomers at age 1
    train(tuned, 1, start=1, optimizer=opt)
    for form in forms(tuned).values():
        assert set(opt.state[form.values]["age"].unique().tolist()) <= {1.0, 2.0}


def test_an_entry_back_from_the_past_resumes_from_its_learnt_value() -> None:
    form = forms(dt.attach(tiny_llama(), "lift", **FEW))["model.layers.0.self_attn.q_proj.weight"]
    first = form.indices.clone()
    with torch.no_grad():
        form.values.copy_(torch.arange(1, form.k + 1, dtype=torch.float32))
    w = form.effective_weight(torch.float32)
    other = torch.tensor([i for i in range(form.numel_base) if i not in set(first.tolist())][: form.k])
    form.reselect(other)
    assert torch.equal(form.past_indices, first) and form.num_past == form.k
    form.reselect(first)
    assert torch.equal(form.values.detach(), torch.arange(1, form.k + 1, dtype=torch.float32))
    assert torch.equal(form.past_indices.long(), other) and not form.past_values.any()
    assert torch.equal(form.effective_weight(torch.float32), w)


# 5 -------------------------------------------------------------------------------------------------
def test_artifact_of_the_union_reproduces_the_weights_and_the_last_mask_alone_does_not(tmp_path: Path) -> None:
    model = tiny_llama()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = dt.attach(model, "lift", **FEW, update_interval=2)
    train(tuned, 4, lr=5e-2)
    assert sum(f.num_past for f in forms(tuned).values()) > 0
    x = batch()
    trained = output_of(tuned, x)
    tuned.save(tmp_path / "a")
    loaded = dt.load(tiny_llama(), tmp_path / "a")
    assert torch.equal(output_of(loaded, x), trained)
    for name, w in weights(loaded).items():
        assert torch.equal(w, weights(tuned)[name]), name
    # the regression: keep only the final mask (what saving the last mask alone would give)
    last = {k: v for k, v in tuned.delta_state_dict().items() if ".past_" not in k}
    alone = dt.load(tiny_llama(), tmp_path / "a")
    alone.load_delta_state_dict(last)
    assert not torch.allclose(output_of(alone, x), trained, atol=1e-4)
    # merge holds the past entries too; unmerge gives W0 back bit for bit
    merged = tuned.merge()
    assert torch.allclose(output_of(merged, x), trained, atol=1e-5, rtol=0)
    for name, form in forms(tuned).items():
        assert torch.allclose(form.base, weights(loaded)[name], atol=1e-7, rtol=0), name
    tuned.unmerge()
    assert torch.equal(output_of(tuned, x), trained)
    tuned.detach()
    assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items())


def test_loading_skips_the_svd_and_takes_any_k(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tuned = dt.attach(tiny_llama(), "lift", **FEW)
    train(tuned, 1)
    tuned.save(tmp_path / "a")
    assert not any(".past_" in k for k in tuned.delta_state_dict()), "no past: nothing stored for it"

    def no_svd(*a, **k):
        raise AssertionError("loading must not compute masks")

    monkeypatch.setattr(lift, "low_rank_approximation", no_svd)
    loaded = dt.load(tiny_llama(), tmp_path / "a")
    assert loaded.num_trainable() == tuned.num_trainable()
    form = forms(loaded)["model.layers.0.mlp.up_proj.weight"]
    form.load_stored({"indices": torch.tensor([3, 1]), "values": torch.tensor([0.5, -0.5]),
                      "past_indices": torch.tensor([7]), "past_values": torch.tensor([2.0])})
    assert form.k == 2 and form.num_past == 1
    assert torch.equal(form.delta_weight().view(-1)[[1, 3, 7]], torch.tensor([-0.5, 0.5, 2.0]))
    with pytest.raises(dt.DeltatuneError, match="both as trainable and as past"):
        form.load_stored({"indices": torch.tensor([3]), "values": torch.tensor([1.0]),
                          "past_indices": torch.tensor([3]), "past_values": torch.tensor([1.0])})
    with pytest.raises(dt.DeltatuneError, match="repeat"):
        form.load_stored({"indices": torch.tensor([2, 2]), "values": torch.tensor([1.0, 1.0])})
    with pytest.raises(dt.DeltatuneError, match="outside"):
        form.load_stored({"indices": torch.tensor([2, form.numel_base]), "values": torch.tensor([1.0, 1.0])})
    with pytest.raises(dt.DeltatuneError, match="past_indices"):
        form.load_stored({"indices": torch.tensor([3]), "values": torch.tensor([1.0]), "past_indices": torch.tensor([4])})


# 6 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decay", ["weight", "delta"])
def test_weight_decay_shrinks_masked_entries(decay: str) -> None:
    tuned = dt.attach(tiny_llama(), "lift", **FEW, decay=decay)
    train(tuned, 1)  # Δ ≠ 0 at the mask
    w1 = weights(tuned)
    lr, wd = 1e-2, 0.5
    opt = tuned.policy.make_optimizer(list(tuned.deltas.parameters()), lr, wd)
    for form in forms(tuned).values():
        form.values.grad = torch.zeros_like(form.values)  # no gradient: only the decay moves anything
    opt.step()
    for name, w in weights(tuned).items():
        form = forms(tuned)[name]
        idx = form.indices.long()
        base = form.base.detach().view(-1)[idx]
        was, now = w1[name].view(-1), w.view(-1)
        target = (1 - lr * wd) * was[idx] if decay == "weight" else base + (1 - lr * wd) * (was[idx] - base)
        assert torch.allclose(now[idx], target, atol=1e-7, rtol=1e-6), name
        outside = torch.ones_like(now, dtype=torch.bool)
        outside[idx] = False
        assert torch.equal(now[outside], was[outside])
        if decay == "weight":
            assert (now[idx].abs() < was[idx].abs()).all()


# 7 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_with_a_full_mask_one_step_equals_adamw(wd: float) -> None:
    lr, betas, eps = 1e-3, (0.9, 0.95), 1e-6
    x = batch()
    tuned = dt.attach(tiny_llama(), "lift")  # defaults: every entry of every block matrix
    assert all(f.k == f.numel_base for f in forms(tuned).values())
    opt = tuned.policy.make_optimizer(list(tuned.deltas.parameters()), lr, wd)
    loss_of(tuned, x).backward()
    opt.step()
    ref = tiny_llama()
    names = [n.removesuffix(".weight") for n in forms(tuned)]
    params = [ref.get_submodule(n).weight for n in names]
    for p in ref.parameters():
        p.requires_grad_(p in set(params))
    ref_opt = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    loss_of(ref, x).backward()
    ref_opt.step()
    for name, p in zip(forms(tuned), params, strict=True):
        assert torch.allclose(weights(tuned)[name], p.detach(), atol=1e-6, rtol=0), name


# resume ---------------------------------------------------------------------------------------------
def test_resume_from_a_checkpoint_is_bit_identical(tmp_path: Path) -> None:
    """The native loop's resume, step by step: attach, policy state, delta tensors (past entries of any
    length), optimizer from the policy with its saved state; through the loop's own checkpoint files."""
    from deltatune.train import state as ckpt

    def fresh() -> dt.Tuned:
        return dt.attach(tiny_llama(), "lift", **FEW, update_interval=2)

    straight = fresh()
    train(straight, 6, wd=0.1)  # refreshes after 1, 3 and 5 completed steps
    cut = fresh()
    opt = train(cut, 4, wd=0.1)
    assert sum(f.num_past for f in forms(cut).values()) > 0
    # the loop's other entries (config, data position, RNG, ...) are not exercised here, only present
    rest = {"step": 4, "config": {}, "trainable": {}, "scheduler": {}, "data": {}, "rng": {}, "history": []}
    ckpt.save_checkpoint(tmp_path, 4, {**rest, "delta": cut.deltas.state_dict(), "policy": cut.policy.state_dict(),
                                       "optimizer": opt.state_dict()}, keep_last=1)
    saved = ckpt.load_checkpoint(ckpt.checkpoints(tmp_path)[-1])
    resumed = fresh()
    resumed.policy.load_state_dict(saved["policy"])
    with torch.no_grad():
        resumed.deltas.load_state_dict(saved["delta"])
    opt = resumed.policy.make_optimizer(list(resumed.deltas.parameters()), 1e-2, 0.1)
    opt.load_state_dict(saved["optimizer"])
    train(resumed, 2, start=4, optimizer=opt)
    a, b = straight.delta_state_dict(), resumed.delta_state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.policy.state_dict() == straight.policy.state_dict() == {"completed": 6, "refreshes": 3}


def test_bad_options_name_the_fix() -> None:
    with pytest.raises(dt.DeltatuneError, match="lora_rank=0"):
        dt.attach(tiny_llama(), "lift", lora_rank=0)
    with pytest.raises(dt.DeltatuneError, match="svd_device"):
        dt.attach(tiny_llama(), "lift", svd_device="gpu9")
    with pytest.raises(dt.DeltatuneError, match="no weight matrices"):
        dt.attach(torch.nn.Sequential(torch.nn.Linear(4, 4)), "lift")  # no numbered blocks: name targets


def test_attach_time_svd_goes_to_the_gpu_when_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.zeros(2, 2)
    assert lift._svd_device(w) == torch.device("cpu") or torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert lift._svd_device(w) == torch.device("cuda")  # the first masks are chosen before the model moves
