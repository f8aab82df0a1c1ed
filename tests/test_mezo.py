"""MeZO and Sparse MeZO: seed replay, exact restore, the SPSA estimate by hand, unbiasedness, convergence,
memory, masks against a stored-mask reference, weight decay, the native loop (exact resume) and the Trainer."""

from __future__ import annotations

import gc
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import batch, loss_of, output_of, tiny_llama, train_then_resume, word_run_config
from torch.utils._python_dispatch import TorchDispatchMode

import deltatune as dt
from deltatune.errors import DeltatuneError
from deltatune.methods import _zeroth_order as zo
from deltatune.methods._offloaded_w0 import TensorFile
from deltatune.methods._zeroth_order import Entry, MezoPolicy, ZerothOrderOptimizer
from deltatune.methods.sparse_mezo import magnitude_threshold


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def z_of(policy: MezoPolicy, seed: int, e: Entry) -> torch.Tensor:
    """z of one tensor, rebuilt chunk by chunk from the seed (unmasked)."""
    parts = [policy.noise(seed, e.index, c, b - a, e.param.device) for c, a, b in zo.chunks(e.param.numel())]
    return torch.cat(parts).view(e.param.shape)


def names_of(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def step(tuned, x, lr: float = 1e-3, weight_decay: float = 0.0, loss=None) -> float:
    fn = loss or (lambda b: loss_of(tuned, b))
    return tuned.policy.train_step(0, tuned, x, fn, lr, weight_decay)


# -- 1. perturb -> restore ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturbation_leaves_the_weights_bit_identical(dtype) -> None:
    model = tiny_llama().to(dtype)
    tuned = dt.attach(model, "mezo")
    x = batch()
    with torch.no_grad():
        before, plain = weights(model), float(loss_of(tuned, x))
    policy, live = tuned.policy, tuned.policy.entries
    for scale in (1e-3, -1e-3, 1e-1):
        perturbed = policy.perturbed_loss(tuned, live, x, lambda b: loss_of(tuned, b), seed=5, scale=scale)
        assert perturbed != plain, "the perturbation must reach the forward"
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "restore must be exact"
    # the official in-place scheme (+εz, -2εz, +εz) does not come back exactly, in fp32 as in 16 bits
    w = before["model.layers.0.mlp.up_proj.weight"]
    z = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    naive = w.clone().add_(z, alpha=1e-3).add_(z, alpha=-2e-3).add_(z, alpha=1e-3)
    assert not torch.equal(naive, w)


def test_16_bit_weights_warn() -> None:
    tuned = dt.attach(tiny_llama().to(torch.bfloat16), "mezo")
    with pytest.warns(UserWarning, match="rounding step"):
        step(tuned, batch())


# -- 2. seed replay ----------------------------------------------------------------------------------------------
def test_the_same_seed_regenerates_the_same_direction() -> None:
    noise = zo.Noise()
    cpu = torch.device("cpu")
    a, b = noise(7, 3, 0, 1000, cpu), noise(7, 3, 0, 1000, cpu)
    assert torch.equal(a, b)
    for other in (noise(8, 3, 0, 1000, cpu), noise(7, 4, 0, 1000, cpu), noise(7, 3, 1, 1000, cpu)):
        assert not torch.allclose(a, other)
    tuned = dt.attach(tiny_llama(), "mezo")
    x, live = batch(), tuned.policy.entries
    losses = [tuned.policy.perturbed_loss(tuned, live, x, lambda b: loss_of(tuned, b), s, 1e-2) for s in (1, 1, 2)]
    assert losses[0] == losses[1] != losses[2]


# -- the estimate and the update, by hand ------------------------------------------------------------------------
@pytest.mark.parametrize("n_spsa", [1, 2])
def test_projected_gradient_and_update_by_hand(n_spsa: int) -> None:
    model = tiny_llama()
    tuned = dt.attach(model, "mezo", n_spsa=n_spsa)
    x, eps, lr, wd = batch(), 1e-3, 1e-2, 0.1
    before = weights(model)
    names = names_of(model)
    loss = step(tuned, x, lr=lr, weight_decay=wd)
    assert len(tuned.policy.last) == n_spsa and len({s for s, _ in tuned.policy.last}) == n_spsa

    def at(zs: dict[str, torch.Tensor], scale: float) -> float:
        shifted = {n: torch.add(w, zs[n], alpha=scale) for n, w in before.items()}
        with torch.no_grad():
            return float(loss_of(lambda **kw: torch.func.functional_call(model, shifted, (), kw), x))

    moves = {n: torch.zeros_like(w) for n, w in before.items()}
    losses = []
    for seed, g in tuned.policy.last:
        zs = {names[id(e.param)]: z_of(tuned.policy, seed, e) for e in tuned.policy.entries}
        plus, minus = at(zs, eps), at(zs, -eps)
        assert g == pytest.approx((plus - minus) / (2 * eps), rel=1e-6, abs=1e-9)  # the same z as the forwards
        losses += [plus, minus]
        for n in moves:
            moves[n] += g * zs[n] / n_spsa
    assert loss == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    for n, p in model.named_parameters():
        decay = wd if p.dim() >= 2 else 0.0
        expected = before[n] - lr * (moves[n] + decay * before[n])
        assert torch.allclose(p, expected, atol=1e-7, rtol=1e-6), n


@pytest.mark.parametrize("keep_w0", ["disk", "memory"])
def test_the_artifact_reproduces_the_trained_model(tmp_path, keep_w0) -> None:
    model = tiny_llama()
    w0 = weights(model)
    tuned = dt.attach(model, "mezo", keep_w0=keep_w0, w0_dir=str(tmp_path))
    x = batch()
    for _ in range(3):
        step(tuned, x, lr=0.5)  # large moves: W - W0 rounds, so the artifact needs W settled when it is written
    forms = list(tuned.forms().values())
    kept = [f.__dict__["_w0_kept"] for f in forms]
    if keep_w0 == "disk":  # one raw file per trained tensor, holding W0 exactly; nothing of it in memory
        assert all(isinstance(k, TensorFile) for k in kept)
        assert sorted(p.name for p in tmp_path.glob("deltatune-w0-*.bin")) == sorted(Path(k.path).name for k in kept)
    else:
        assert all(k.device.type == "cpu" for k in kept)
    assert all(torch.equal(f.w0, w0[n]) for n, f in tuned.forms().items())
    tuned.save(tmp_path / "a")
    assert set(dt.inspect(tmp_path / "a")["config"]) >= {"eps", "n_spsa", "base"}
    assert torch.equal(output_of(dt.load(tiny_llama(), tmp_path / "a"), x), output_of(tuned, x))
    tuned.detach()
    assert torch.equal(output_of(model, x), output_of(tiny_llama(), x)), "detaching restores W0"
    del tuned, forms, kept
    gc.collect()
    assert not list(tmp_path.glob("deltatune-w0-*.bin")), "W0's files go with the delta"


# -- 3. unbiasedness on a quadratic ------------------------------------------------------------------------------
class Quadratic(nn.Module):
    """L(θ) = ½‖Aθ − b‖² as a module whose forward is the loss."""

    def __init__(self, dim: int = 20) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("a", torch.randn(2 * dim, dim, generator=g) / math.sqrt(dim))
        self.register_buffer("b", torch.randn(2 * dim, generator=g))
        self.theta = nn.Parameter(torch.randn(dim, generator=g))

    def forward(self, _: object = None) -> torch.Tensor:
        return 0.5 * (self.a @ self.theta - self.b).pow(2).sum()


def test_the_estimate_is_unbiased_on_a_quadratic() -> None:
    tuned = dt.attach(Quadratic(), "mezo")
    policy, (entry,) = tuned.policy, tuned.policy.entries
    theta = entry.param.detach().clone().requires_grad_(True)
    q = tuned.model
    (0.5 * (q.a @ theta - q.b).pow(2).sum()).backward()
    total = torch.zeros(20)
    loss = lambda _: tuned()  # noqa: E731
    for seed in range(3000):
        plus = policy.perturbed_loss(tuned, [entry], None, loss, seed, 1e-3)
        minus = policy.perturbed_loss(tuned, [entry], None, loss, seed, -1e-3)
        total += (plus - minus) / 2e-3 * z_of(policy, seed, entry)
    cos = torch.nn.functional.cosine_similarity(total / 3000, theta.grad, dim=0)
    assert cos > 0.95, float(cos)


# -- 4. convergence ------------------------------------------------------------------------------------------------
def test_linear_regression_loss_decreases() -> None:
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(64, 8, generator=g)
    ys = xs @ torch.randn(8, 1, generator=g) + 0.01 * torch.randn(64, 1, generator=g)
    torch.manual_seed(0)
    model = nn.Linear(8, 1)
    tuned = dt.attach(model, "mezo", eps=1e-3)

    def mse(_: object) -> torch.Tensor:
        return (tuned(xs) - ys).pow(2).mean()

    with torch.no_grad():
        first = float(mse(None))
    for t in range(500):
        tuned.policy.train_step(t, tuned, None, mse, 0.02, 0.0)
    with torch.no_grad():
        assert float(mse(None)) < 0.05 * first


# -- 5. memory -------------------------------------------------------------------------------------------------------
class Draws(TorchDispatchMode):
    """The sizes of the random tensors drawn inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if "randn" in str(func) or "normal" in str(func):
            self.sizes.append(out.numel())
        return out


def live_tensor_elements() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch's deprecated module attributes warns
        warnings.simplefilter("ignore")
        return sum(o.numel() for o in gc.get_objects() if torch.is_tensor(o))


def test_no_parameter_sized_buffer_survives_a_step(monkeypatch) -> None:
    tuned = dt.attach(tiny_llama(), "mezo")
    x = batch()
    step(tuned, x)  # the first update writes W0 (the artifact's reference) to disk, once
    before = live_tensor_elements()
    with Draws() as draws:
        step(tuned, x)
    step(tuned, x)
    assert live_tensor_elements() == before
    sizes = [e.param.numel() for e in tuned.policy.entries]
    assert max(draws.sizes) == max(sizes) < sum(sizes)  # z of one tensor at a time, never the whole model's
    # two perturbed forwards and the update; the tied embedding is perturbed again (same z) at the LM head
    assert len(draws.sizes) == 3 * len(sizes) + 2
    monkeypatch.setattr(zo, "CHUNK", 100)  # z of a large tensor is drawn in chunks
    state = weights(tuned.model)
    with Draws() as draws:
        tuned.policy.perturbed_loss(tuned, tuned.policy.entries, x, lambda b: loss_of(tuned, b), 3, 1e-3)
    assert max(draws.sizes) == 100
    assert all(torch.equal(p, state[n]) for n, p in tuned.model.named_parameters())


# -- 6. sparse MeZO ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_threshold_of_a_large_tensor_is_the_exact_kth_magnitude(monkeypatch, dtype) -> None:
    """A tensor of several z chunks gets h by bisection, chunk by chunk (no tensor-sized temporary): the same h
    as kthvalue, with ties, zeros and negative values."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 29, generator=g).to(dtype)
    w[0, :5] = 0.0
    w[1, :9] = w[2, 3]  # ties at one magnitude
    w[3, :4] = -w[2, 3]
    monkeypatch.setattr(zo, "CHUNK", 100)  # 1,073 entries: 11 chunks
    for sparsity in (0.0, 0.5, 0.75, 0.99, 0.999):
        k = min(w.numel(), max(1, round((1.0 - sparsity) * w.numel())))
        assert magnitude_threshold(w, sparsity) == float(w.reshape(-1).abs().float().kthvalue(k).values), sparsity


def test_sparse_moves_only_small_entries_at_the_sparsity() -> None:
    model = tiny_llama(tied=False)
    tuned = dt.attach(model, "sparse_mezo", sparsity=0.75)
    x = batch()
    w0 = weights(model)
    h = {n: magnitude_threshold(w, 0.75) for n, w in w0.items()}
    for _ in range(4):
        step(tuned, x, lr=1.0)  # a large step: every masked entry moves
        for n, p in model.named_parameters():
            changed = p != w0[n]
            assert bool((w0[n][changed].abs() <= h[n]).all()), f"{n}: an entry above the threshold moved"
    q = "model.layers.1.self_attn.q_proj.weight"
    first = tiny_llama(tied=False)
    once = dt.attach(first, "sparse_mezo", sparsity=0.75)
    step(once, x, lr=1.0)
    for n, p in first.named_parameters():
        if p.dim() == 2:
            assert float((p != w0[n]).float().mean()) == pytest.approx(0.25, abs=1 / p.numel()), n
    assert once.policy.thresholds[once.policy.entries[[e.name for e in once.policy.entries].index(q)].index] == h[q]


@pytest.mark.parametrize("threshold", ["fixed", "dynamic"])
def test_sparse_matches_a_stored_mask_reference(threshold: str) -> None:
    """The masks taken on the fly from the unperturbed weights equal dense masks stored before the step; ε is
    large, so masks of the perturbed weights (|θ ± εz| ≤ h) would differ."""
    model = tiny_llama()
    tuned = dt.attach(model, "sparse_mezo", sparsity=0.6, eps=0.05, threshold=threshold)
    x, lr = batch(), 0.05
    names = names_of(model)
    policy = tuned.policy
    initial = weights(model)
    for _ in range(3):
        before = weights(model)
        source = before if threshold == "dynamic" else initial
        masks = {n: w.abs() <= magnitude_threshold(source[n], 0.6) for n, w in before.items()}
        step(tuned, x, lr=lr)
        (seed, g), = policy.last
        zs = {names[id(e.param)]: z_of(policy, seed, e) * masks[names[id(e.param)]] for e in policy.entries}

        def at(scale: float, before=before, zs=zs) -> float:
            shifted = {n: torch.add(w, zs[n], alpha=scale) for n, w in before.items()}
            with torch.no_grad():
                return float(loss_of(lambda **kw: torch.func.functional_call(model, shifted, (), kw), x))

        assert g == pytest.approx((at(0.05) - at(-0.05)) / 0.1, rel=1e-6)
        for n, p in model.named_parameters():
            assert torch.allclose(p, before[n] - lr * g * zs[n], atol=1e-7, rtol=1e-6), n


# -- 7. weight decay ---------------------------------------------------------------------------------------------------
def test_no_weight_decay_on_biases_and_norms() -> None:
    model = tiny_llama(bias=True)
    tuned = dt.attach(model, "mezo")
    before = weights(model)
    step(tuned, batch(), lr=0.1, weight_decay=0.5, loss=lambda b: 0.0 * loss_of(tuned, b))  # g = 0: decay alone
    one_d = [n for n, p in model.named_parameters() if p.dim() == 1]
    assert any(n.endswith("bias") for n in one_d) and any("norm" in n for n in one_d)
    for n, p in model.named_parameters():
        if p.dim() == 1:
            assert torch.equal(p, before[n]), n
        else:
            assert torch.allclose(p, before[n] * (1 - 0.1 * 0.5), atol=1e-7), n


# -- over another method's parameters -------------------------------------------------------------------------------
def test_base_lora_trains_only_the_lora_factors(tmp_path) -> None:
    model = tiny_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = dt.attach(model, "mezo", base="lora", base_options={"r": 4, "alpha": 8}, eps=1e-2)
    x = batch()
    start = output_of(tuned, x)
    lora = {k: v.clone() for k, v in tuned.delta_state_dict().items()}
    for _ in range(3):
        step(tuned, x, lr=1e-2)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items() if k in base)
    after = tuned.delta_state_dict()
    assert set(after) == set(lora) and all(k.endswith((".A", ".B")) for k in after)
    assert all(not torch.equal(after[k], lora[k]) for k in after), "every LoRA factor moves along z"
    trained = output_of(tuned, x)
    assert not torch.equal(trained, start)
    tuned.save(tmp_path / "a")
    assert torch.equal(output_of(dt.load(tiny_llama(), tmp_path / "a"), x), trained)


def test_bad_configurations_are_refused() -> None:
    with pytest.raises(DeltatuneError, match="static policy"):
        dt.attach(tiny_llama(), "mezo", base="adalora", base_options={"init_r": 2, "target_r": 1})
    with pytest.raises(DeltatuneError, match="base_options"):
        dt.attach(tiny_llama(), "mezo", base="lora", targets=["q_proj"])
    with pytest.raises(DeltatuneError, match="sparsity"):
        dt.attach(tiny_llama(), "sparse_mezo", sparsity=1.0)
    for zeroth_order in ("mezo", "sparse_mezo"):  # gradient-free methods: the base is what MeZO's steps train
        with pytest.raises(DeltatuneError, match="the base is the method whose parameters"):
            dt.attach(tiny_llama(), "sparse_mezo", base=zeroth_order)
    tuned = dt.attach(tiny_llama(), "mezo")
    with pytest.raises(DeltatuneError, match="grad_accum=1"):
        tuned.policy.plan(10, 2)
    # a loop that runs backward and steps an optimizer would not train MeZO: it says so
    opt = tuned.policy.make_optimizer(list(tuned.deltas.parameters()), 1e-3, 0.0)
    assert isinstance(opt, ZerothOrderOptimizer)
    loss_of(tuned, batch()).backward()
    with pytest.raises(DeltatuneError, match="forward passes"):
        tuned.policy.before_optimizer_step(0, tuned, opt)
    with pytest.raises(DeltatuneError, match="gradients"):
        opt.step()


# -- the native loop: schedule, checkpoints, exact resume --------------------------------------------------------------
@pytest.mark.parametrize("method", [{"name": "mezo"}, {"name": "sparse_mezo", "threshold": "fixed"}],
                         ids=["mezo", "sparse_mezo"])
def test_resume_through_dt_train_ends_bit_identical(word_run, method: dict, tmp_path) -> None:
    cfg = word_run_config(word_run, method, tmp_path / "run", steps=6, lr=1e-3, warmup=2)
    _, resumed = train_then_resume(cfg, keep=2)  # the per-step seeds come from the checkpointed generator
    assert resumed["resumed_from"] == 4


def test_the_loop_applies_the_scheduled_learning_rate(word_run, tmp_path, monkeypatch) -> None:
    folder, path = word_run
    seen: list[float] = []
    original = MezoPolicy.update

    def update(self, live, estimates, lr, weight_decay):
        seen.append(lr)
        return original(self, live, estimates, lr, weight_decay)

    monkeypatch.setattr(MezoPolicy, "update", update)
    cfg = {"model": folder, "data": {"path": path, "task": "classification", "max_length": 16, "eval_fraction": 0.25,
                                     "labels": ["negative", "positive"], "max_eval": 4},
           "method": {"name": "mezo"}, "output": str(tmp_path / "o"),
           "train": {"steps": 4, "batch_size": 4, "lr": 1e-3, "warmup": 0, "schedule": "linear", "eval_every": 0,
                     "save_every": 0, "progress": False}}
    summary = dt.train(cfg)
    assert seen == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])
    assert all(h["tokens_per_s"] > 0 and math.isfinite(h["loss"]) for h in summary["history"])


# -- transformers.Trainer --------------------------------------------------------------------------------------------------
def test_delta_tune_trainer_takes_zeroth_order_steps(tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    from deltatune.train.hf import DeltaTuneTrainer, trainer_kwargs

    model = tiny_llama()
    tuned = dt.attach(model, "mezo", base="lora", base_options={"r": 4, "alpha": 8}, eps=1e-2)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora = {k: v.clone() for k, v in tuned.delta_state_dict().items()}
    g = torch.Generator().manual_seed(3)
    rows = [{"input_ids": (ids := torch.randint(0, 128, (12,), generator=g)), "labels": ids.clone()} for _ in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", learning_rate=1e-2, disable_tqdm=True, seed=0,
                             logging_steps=1)
    trainer = DeltaTuneTrainer(model=tuned, args=args, train_dataset=rows)
    trainer.train()
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      ZerothOrderOptimizer)
    assert all(p.grad is None for p in tuned.parameters()), "no backward ran"
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items() if k in base)
    assert all(not torch.equal(v, lora[k]) for k, v in tuned.delta_state_dict().items())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    tuned.eval()
    loaded = dt.load(tiny_llama(), tmp_path / "deltatune")
    x = batch()
    assert torch.equal(output_of(loaded, x), output_of(tuned, x))
    # a plain Trainer runs backward and AdamW: the policy refuses the gradients rather than train something else
    plain = dt.attach(tiny_llama(), "mezo")
    args = TrainingArguments(output_dir=str(tmp_path / "plain"), max_steps=1, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                             remove_unused_columns=False, label_names=["labels"])
    with pytest.raises(DeltatuneError, match="forward passes"):
        Trainer(**trainer_kwargs(plain), args=args, train_dataset=rows).train()
