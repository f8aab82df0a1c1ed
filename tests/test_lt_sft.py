"""LT-SFT: the spec's CPU tests (mask selection, sparse phase, stale-moment regression, head, encoding, L1,
iterations), the artifact in either phase, and exact resume through dt.train."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import batch, loss_of, output_of, tiny_bert, tiny_llama

import deltatune as dt
from deltatune.core.forms.sparse import Sparse
from deltatune.methods._sparse_selection import DenseAsSparse, top_k_entries
from deltatune.train.loop import sync_optimizer


class Toy(nn.Module):
    """A small MLP: two body layers (maskable) and a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh())
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


MASKABLE = ["body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias"]
HEAD = ["head.weight", "head.bias"]
N_MASKABLE = 6 * 12 + 12 + 12 * 12 + 12


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def _toy(**options) -> dt.Tuned:
    return dt.attach(Toy(), "lt-sft", head=["head"], **options)


def _train(tuned: dt.Tuned, steps: int, *, lr: float = 1e-2, weight_decay: float = 0.0, on_step=None) -> None:
    """The native loop's order of calls: loss (+ the policy's L1), step, policy, optimizer sync."""
    x, y = _data()
    policy = tuned.policy
    policy.plan(steps, 1)
    opt = torch.optim.AdamW(list(tuned.deltas.parameters()), lr=lr, weight_decay=weight_decay)
    trainable = {id(p) for p in tuned.deltas.parameters() if p.requires_grad}
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(tuned(x), y)
        extra = policy.extra_loss(tuned)
        (loss if extra is None else loss + extra).backward()
        policy.before_optimizer_step(step, tuned, opt)
        opt.step()
        if on_step is not None:
            on_step(step, tuned, "before")
        policy.after_optimizer_step(step, tuned, opt)
        trainable = sync_optimizer(opt, tuned, trainable)
        if on_step is not None:
            on_step(step, tuned, "after")


def _mask(tuned: dt.Tuned) -> dict[str, set[int]]:
    return {n: set(tuned.forms()[n].indices.tolist()) for n in MASKABLE}


# -- 1. selection ------------------------------------------------------------------------------
def test_mask_is_the_global_top_k_of_the_change_over_maskable_entries_only() -> None:
    tuned = _toy(k=20)
    forms = tuned.forms()
    torch.manual_seed(1)
    with torch.no_grad():  # fake phase 1: θ1 = θ0 + random deltas; the head moves far more than anything
        for n in MASKABLE:
            forms[n].delta.normal_()
        for n in HEAD:
            forms[n].delta.fill_(100.0)
    moved = {n: forms[n].delta.detach().clone() for n in MASKABLE}
    tuned.policy.plan(4, 1)
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=0.0)
    tuned(_data()[0]).sum().backward()
    opt.step()  # moments exist now (lr 0: the deltas stay as set)
    tuned.policy.after_optimizer_step(1, tuned, opt)
    assert not opt.state, "the sparse phase starts with a fresh optimizer state, head included"

    flat = torch.cat([moved[n].reshape(-1).abs() for n in MASKABLE])
    ref = set(torch.topk(flat, 20).indices.tolist())
    offsets = torch.tensor([0] + [moved[n].numel() for n in MASKABLE]).cumsum(0).tolist()
    got = {offsets[i] + j for i, n in enumerate(MASKABLE) for j in _mask(tuned)[n]}
    assert got == ref and len(got) == 20
    forms = tuned.forms()
    assert all(isinstance(forms[n], Sparse) and not forms[n].values.detach().any() for n in MASKABLE)
    assert all(not forms[n].delta.detach().any() for n in HEAD), "the reset includes the head"


def test_top_k_is_exact_chunked_and_skips_excluded_entries() -> None:
    torch.manual_seed(0)
    scores = {"a": torch.randn(5, 7), "b": torch.randn(30), "c": torch.zeros(0)}
    whole = top_k_entries(scores, 13)
    chunked = top_k_entries(scores, 13, chunk=4)
    assert all(torch.equal(chunked[n], whole[n]) for n in scores)
    flat = torch.cat([scores["a"].reshape(-1), scores["b"]]).abs()
    assert sum(v.numel() for v in whole.values()) == 13
    threshold = torch.topk(flat, 13).values.min()
    for n in ("a", "b"):
        assert bool((scores[n].reshape(-1)[whole[n].long()].abs() >= threshold).all())
    ties = top_k_entries({"t": torch.ones(50)}, 7, chunk=8)
    assert ties["t"].numel() == 7, "ties never select more than k"
    ex = {"b": whole["b"]}
    again = top_k_entries(scores, 13, ex, chunk=4)
    assert not set(again["b"].tolist()) & set(whole["b"].tolist())
    assert sum(v.numel() for v in again.values()) == 13
    with pytest.raises(dt.DeltatuneError, match="only"):
        top_k_entries({"a": torch.ones(3)}, 3, {"a": torch.tensor([0])})


# -- 2. sparse phase ----------------------------------------------------------------------------
def test_sparse_phase_trains_only_the_mask(tmp_path) -> None:
    tuned = _toy(k=25)
    w0 = Toy().state_dict()  # the same seed: θ0
    masks: dict[str, set[int]] = {}

    def grab(step, t, when) -> None:
        if step == 3 and when == "after":
            masks.update(_mask(t))

    _train(tuned, 8, on_step=grab)  # full phase: steps 1-4, sparse: 5-8
    forms = tuned.forms()
    assert masks == _mask(tuned) and sum(map(len, masks.values())) == 25
    nonzero = 0
    for n in MASKABLE:
        form = forms[n]
        effective = form.effective_weight(torch.float32).reshape(-1)
        base = w0[n].reshape(-1)
        changed = set(torch.nonzero(effective != base).reshape(-1).tolist())
        assert changed <= masks[n], "entries outside the mask stay bitwise at θ0"
        nonzero += len(changed)
    assert 0 < nonzero <= 25
    tuned.save(tmp_path / "a")
    stored = dt.load(Toy(), tmp_path / "a")
    assert sum(f.k for n, f in stored.forms().items() if n in MASKABLE) == 25
    assert torch.equal(output_of_toy(stored), output_of_toy(tuned))


def output_of_toy(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_data()[0])


# -- 3. regression: stale moments -----------------------------------------------------------------
def test_masked_out_entries_never_move_unlike_dense_with_a_gradient_mask() -> None:
    x, y = _data()
    # the naive way: one dense delta, phase-1 AdamW kept, gradients masked in phase 2
    naive = _toy(k=20)
    deltas = [naive.forms()[n].delta for n in MASKABLE]
    opt = torch.optim.AdamW(naive.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(naive(x), y).backward()
        opt.step()
    chosen = top_k_entries({n: d for n, d in zip(MASKABLE, deltas, strict=True)}, 20)
    keep = [torch.zeros(d.numel(), dtype=torch.bool).index_fill_(0, chosen[n].long(), True).view_as(d)
            for n, d in zip(MASKABLE, deltas, strict=True)]
    with torch.no_grad():
        for d in deltas:
            d.zero_()
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(naive(x), y).backward()
        for d, m in zip(deltas, keep, strict=True):
            d.grad *= m
        opt.step()
    leaked = sum(int((d.detach()[~m] != 0).sum()) for d, m in zip(deltas, keep, strict=True))
    assert leaked > 0, "stale Adam moments move masked-out entries (the pitfall the spec names)"

    # ours: a fresh optimizer state on sparse forms, even with weight decay
    ours = _toy(k=20)
    w0 = Toy().state_dict()
    _train(ours, 5, weight_decay=0.1)  # 3 full steps, 2 sparse
    for n in MASKABLE:
        form = ours.forms()[n]
        effective = form.effective_weight(torch.float32).reshape(-1)
        off = torch.ones(effective.numel(), dtype=torch.bool)
        off[form.indices.long()] = False
        assert torch.equal(effective[off], w0[n].reshape(-1)[off])


# -- 4. head ------------------------------------------------------------------------------------
def test_head_is_stored_dense_and_maskable_tensors_sparse_in_both_phases(tmp_path) -> None:
    tuned = _toy(k=20)
    for steps in (1, 4):
        t = _toy(k=20)
        _train(t, steps)  # 1 step: still phase 1; 4 steps: phase 2
        keys = set(t.delta_state_dict())
        for n in HEAD:
            assert f"{n}.delta" in keys and f"{n}.indices" not in keys and f"{n}.values" not in keys
        for n in MASKABLE:
            assert {f"{n}.indices", f"{n}.values"} <= keys and f"{n}.delta" not in keys
    assert tuned.policy.head == HEAD and sorted(tuned.policy.maskable) == sorted(MASKABLE)
    bert = dt.attach(tiny_bert(), "lt-sft")
    assert bert.policy.head == ["classifier.weight", "classifier.bias"], "default head: the classifier"
    llama = dt.attach(tiny_llama(), "lt-sft")
    assert llama.policy.head == [] and "model.embed_tokens.weight" in llama.policy.maskable
    no_norms = dt.attach(tiny_llama(), "lt-sft", freeze_layer_norm=True)
    assert not any("norm" in n for n in no_norms.policy.maskable)


# -- 6. encoding --------------------------------------------------------------------------------
def test_sparse_encoding_round_trips_including_empty_tensors(tmp_path) -> None:
    tuned = _toy(k=20)
    forms = tuned.forms()
    with torch.no_grad():
        forms["body.0.weight"].delta.view(-1)[[0, 5, 71]] = torch.tensor([0.5, -2e-7, 3.0])
        forms["body.0.weight"].delta.view(-1)[9] = 5e-8  # below the export threshold: dropped
        forms["body.2.bias"].delta.view(-1)[11] = -1.25
    stored = forms["body.0.weight"].stored_tensors()
    assert stored["indices"].tolist() == [0, 5, 71] and stored["indices"].dtype == torch.int32
    assert stored["values"].tolist() == [0.5, pytest.approx(-2e-7), 3.0]
    empty = forms["body.2.weight"].stored_tensors()
    assert empty["indices"].numel() == 0 and empty["values"].numel() == 0
    again = DenseAsSparse(forms["body.0.weight"].sites, "body.0.weight")
    again.load_stored(stored)
    expect = forms["body.0.weight"].delta.detach().clone()
    expect.view(-1)[9] = 0
    assert torch.equal(again.delta.detach(), expect)

    tuned.save(tmp_path / "a")
    loaded = dt.load(Toy(), tmp_path / "a")
    for n in MASKABLE:
        form = loaded.forms()[n]
        assert isinstance(form, Sparse)
        assert torch.equal(form.indices, tuned.forms()[n].stored_tensors()["indices"])
        assert torch.equal(form.values.detach(), tuned.forms()[n].stored_tensors()["values"])
    assert loaded.forms()["body.2.weight"].k == 0


# -- 7. L1 --------------------------------------------------------------------------------------
def test_l1_gradient_is_lambda_sign_over_all_parameters() -> None:
    tuned = _toy(k=20, l1_full=0.5, l1_sparse=0.25)
    n_all = sum(p.numel() for p in Toy().parameters())
    forms = tuned.forms()
    torch.manual_seed(2)
    with torch.no_grad():
        for f in forms.values():
            f.delta.normal_()
    tuned.policy.extra_loss(tuned).backward()
    for f in forms.values():
        assert torch.allclose(f.delta.grad, 0.5 * torch.sign(f.delta.detach()) / n_all, rtol=1e-6, atol=0)
    tuned.policy.to_sparse(tuned)
    sparse = tuned.forms()["body.2.weight"]
    with torch.no_grad():
        sparse.values.normal_()
    tuned.policy.extra_loss(tuned).backward()
    assert torch.allclose(sparse.values.grad, 0.25 * torch.sign(sparse.values.detach()) / n_all, rtol=1e-6, atol=0)
    only = _toy(k=20, l1_full=1.0, l1_maskable_only=True)
    with torch.no_grad():
        only.forms()["head.weight"].delta.fill_(1.0)
    assert only.policy.extra_loss(only).item() == 0.0, "the head is not penalised with l1_maskable_only"
    assert _toy(k=20).policy.extra_loss(tuned) is None


# -- 8. iterations ------------------------------------------------------------------------------
def test_two_iterations_add_half_each_and_keep_the_first_sparse_values() -> None:
    tuned = _toy(k=20, n_iterations=2)
    seen: dict = {}

    def watch(step, t, when) -> None:
        forms = t.forms()
        if step == 1 and when == "after":  # switch of iteration 1
            seen["m1"] = _mask(t)
        if step == 3 and when == "before":  # end of iteration 1: its sparse result
            seen["v1"] = {n: forms[n].delta_weight().detach().clone() for n in MASKABLE}
            seen["h1"] = {n: forms[n].delta.detach().clone() for n in HEAD}
        if step == 3 and when == "after":  # iteration 2 starts from it, densely
            assert all(isinstance(forms[n], DenseAsSparse) for n in MASKABLE)
            assert all(torch.equal(forms[n].delta.detach(), seen["v1"][n]) for n in MASKABLE)
        if step == 5 and when == "after":  # switch of iteration 2: reset to the iteration's start
            seen["m2"] = _mask(t)
            for n in MASKABLE:
                assert seen["m1"][n] <= seen["m2"][n]
                old = torch.tensor(sorted(seen["m1"][n]), dtype=torch.long)
                assert torch.equal(forms[n].delta_weight().detach().reshape(-1)[old], seen["v1"][n].reshape(-1)[old])
                new = torch.tensor(sorted(seen["m2"][n] - seen["m1"][n]), dtype=torch.long)
                assert not forms[n].delta_weight().detach().reshape(-1)[new].any()
            assert all(torch.equal(forms[n].delta.detach(), seen["h1"][n]) for n in HEAD), "head reset to its start"

    assert tuned.policy.lr_restarts(8) == [2, 4, 6]
    _train(tuned, 8, on_step=watch)
    assert sum(map(len, seen["m1"].values())) == 10
    assert sum(map(len, seen["m2"].values())) == 20
    assert sum(f.k for n, f in tuned.forms().items() if n in MASKABLE) == 20
    with pytest.raises(dt.DeltatuneError, match="too few"):
        _toy(k=20, n_iterations=2).policy.plan(3, 1)


# -- artifacts, config, short runs ----------------------------------------------------------------
def test_a_run_shorter_than_the_full_phase_saves_a_loadable_artifact(tmp_path) -> None:
    x = batch()
    tuned = dt.attach(tiny_llama(), "lt-sft", density=0.02)
    tuned.policy.plan(1, 1)
    assert tuned.policy.lr_restarts(1) == []
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
    loss_of(tuned, x).backward()
    opt.step()
    tuned.policy.after_optimizer_step(0, tuned, opt)
    assert tuned.policy.phase == "full"
    trained = output_of(tuned, x)
    tuned.save(tmp_path / "a")
    assert torch.equal(output_of(dt.load(tiny_llama(), tmp_path / "a"), x), trained)


def test_config_errors_name_the_fix() -> None:
    with pytest.raises(dt.DeltatuneError, match="density or k"):
        dt.attach(Toy(), "lt-sft", density=0.1, k=3, head=["head"])
    with pytest.raises(dt.DeltatuneError, match="head pattern 'haed'"):
        dt.attach(Toy(), "lt-sft", head=["haed"])
    with pytest.raises(dt.DeltatuneError, match="exceeds"):
        dt.attach(Toy(), "lt-sft", k=10_000, head=["head"])
    with pytest.raises(dt.DeltatuneError, match="plan"):
        t = _toy(k=3, full_steps=1)
        t.policy.after_optimizer_step(0, t, torch.optim.SGD(t.trainable_parameters(), lr=0.1))


# -- resume ---------------------------------------------------------------------------------------
def test_resume_in_the_sparse_phase_ends_like_an_uninterrupted_run(tiny_folder, sentiment_file, tmp_path) -> None:
    """A run stopped after its step-4 checkpoint (sparse phase since step 2) and resumed from it writes the
    same artifact, byte for byte, as the uninterrupted run."""
    import shutil

    from deltatune.train.state import checkpoints, load_checkpoint

    out = tmp_path / "run"
    cfg = {
        "model": str(tiny_folder),
        "data": {"path": str(sentiment_file), "task": "classification", "max_length": 32, "eval_fraction": 0.25,
                 "labels": ["negative", "positive"]},
        "method": {"name": "lt-sft", "density": 0.02, "full_steps": 2},
        "train": {"steps": 6, "batch_size": 4, "lr": 1e-2, "warmup": 1, "weight_decay": 0.01, "save_every": 2,
                  "eval_every": 0, "progress": False},
        "output": str(out),
    }
    straight = dt.train(cfg)
    uninterrupted = (out / "delta.safetensors").read_bytes()
    step4, step6 = checkpoints(out / "checkpoints")
    assert load_checkpoint(step4)["policy"]["phase"] == "sparse"
    shutil.rmtree(step6)  # as if the run had died after writing step 4
    resumed = dt.train(cfg, resume=True)
    assert resumed["resumed_from"] == 4
    assert (out / "delta.safetensors").read_bytes() == uninterrupted, "a resumed run must end bit-identical"
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    assert [h["lr"] for h in straight["history"]][1:3] == [0.01, 0.01], "the sparse phase restarts the schedule"
    loaded = dt.load(dt.models.load(str(tiny_folder)), out)
    assert sum(f.k for f in loaded.forms().values()) == straight["trainable"], "the artifact is K-sparse"
