"""KaSA against the paper's invariants and against PEFT's KaSA variant."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import (
    batch,
    loss_of,
    output_of,
    save_word_llama,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    write_sentiment_jsonl,
)
from safetensors.torch import load_file

import deltatune as dt
from deltatune.core import artifact
from deltatune.methods.kasa import KasaDelta, KasaPolicy, dropped_count


class Net(nn.Module):
    def __init__(self, d_in: int = 48, d_out: int = 32, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def world_of(w: torch.Tensor, dropped: int) -> torch.Tensor:
    """The reference truncation, built independently: the top k − d components, in float64."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    keep = s.numel() - dropped
    return ((u[:, :keep] * s[:keep]) @ vh[:keep]).float()


def effective(form: KasaDelta) -> torch.Tensor:
    """The (out, in) weight the layer computes with: W0 + ΔW."""
    w = form.base if form.layout == "linear" else form.base.T
    dw = form.delta_weight() if form.layout == "linear" else form.delta_weight().T
    return w + dw


def test_truncation_drops_the_r_smallest_singular_components() -> None:
    w = torch.randn(32, 48, generator=torch.Generator().manual_seed(0))
    layer = nn.Linear(48, 32)
    with torch.no_grad():
        layer.weight.copy_(w)
    form = KasaDelta(layer, r=4, alpha=8)
    world = effective(form)  # B = 0: the truncated base itself
    s = torch.linalg.svdvals(w.double())
    assert torch.linalg.matrix_rank(world.double(), atol=1e-4).item() == 28
    assert (w - world).double().pow(2).sum().item() == pytest.approx(s[-4:].pow(2).sum().item(), rel=1e-5)
    assert torch.allclose(torch.linalg.svdvals(world.double())[:28], s[:28], atol=1e-5)
    assert torch.allclose(world, world_of(w, 4), atol=1e-5)


def test_init_output_is_the_truncated_base_and_the_base_tensor_is_untouched() -> None:
    net = Net()
    w0 = net.proj.weight.detach().clone()
    x = torch.randn(5, 48)
    base_out = net(x)
    tuned = dt.attach(net, "kasa", r=4, alpha=8, targets=["proj"], dropout=0.5)
    tuned.train()  # dropout acts on the adapter branch only, never on the truncation
    out = tuned(x)
    world = world_of(w0, 4)
    assert torch.allclose(out, F.linear(x, world, net.proj.bias), atol=1e-5)
    u, s, vh = torch.linalg.svd(w0.double(), full_matrices=False)
    dropped_part = (x.double() @ vh[-4:].T * s[-4:]) @ u[:, -4:].T
    assert torch.allclose((base_out - out).double(), dropped_part, atol=1e-5)
    assert (base_out - out).abs().max() > 1e-3, "the truncation must change the output"
    assert torch.equal(net.proj.weight, w0), "the base tensor is never written"
    tuned.detach()
    assert torch.equal(net(x), base_out), "detaching gives back the original model exactly"


def test_only_b_gets_a_gradient_at_step_zero() -> None:
    tuned = dt.attach(tiny_llama(), "kasa", r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    loss_of(tuned, batch()).backward()  # the task loss alone
    for form in tuned.forms().values():
        assert form.B.grad.abs().sum() > 0
        assert bool((form.A.grad == 0).all()) and bool((form.diag.grad == 0).all())


def test_merge_equals_the_truncated_base_plus_the_update_and_unmerge_restores_the_original() -> None:
    net = Net()
    w0 = net.proj.weight.detach().clone()
    tuned = dt.attach(net, "kasa", r=4, alpha=8, targets=["proj"])
    form = tuned.forms()["proj.weight"]
    with torch.no_grad():
        form.B.normal_()
        form.diag.normal_()
    x = torch.randn(5, 48)
    attached = tuned(x)
    plain = tuned.merge()
    expected = world_of(w0, 4) + form.scale * (form.B * form.diag) @ form.A
    assert torch.allclose(plain.proj.weight, expected, atol=1e-5)
    assert torch.allclose(plain(x), attached, atol=1e-5)
    tuned.unmerge()
    assert torch.allclose(net.proj.weight, w0, atol=1e-6), "unmerge restores the original W0, not W_world"
    assert torch.allclose(tuned(x), attached, atol=1e-5)


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=torch.Generator().manual_seed(seed)))
    return q if rows >= cols else q.T


@pytest.mark.parametrize(("gram", "reduction"), [("rank", "sum"), ("full", "sum"), ("rank", "mean")])
def test_regularisers(gram: str, reduction: str) -> None:
    r, d_in, d_out = 4, 48, 32
    tuned = dt.attach(Net(d_in, d_out), "kasa", r=r, targets=["proj"], gram=gram, reduction=reduction)
    form = tuned.forms()["proj.weight"]
    with torch.no_grad():
        form.A.copy_(_orthonormal(r, d_in, 1))  # orthonormal rows
        form.B.copy_(_orthonormal(d_out, r, 2))  # orthonormal columns
        form.diag.fill_(1.0)
    policy = tuned.policy
    assert isinstance(policy, KasaPolicy)
    policy.beta, policy.gamma = 1.0, 0.0
    assert policy.extra_loss(tuned).item() == pytest.approx(r)  # L2 = ‖Δσ‖² = r
    policy.beta, policy.gamma = 0.0, 1.0
    l3 = policy.extra_loss(tuned).item()
    if gram == "rank":
        assert l3 == pytest.approx(0.0, abs=1e-5)
    else:  # the official code's in×in and out×out Gram matrices never reach the identity
        assert l3 == pytest.approx(math.sqrt(d_in - r) + math.sqrt(d_out - r), rel=1e-5)


def test_reduction_mean_divides_by_the_layer_count_and_the_gradient_reaches_every_factor() -> None:
    kw = {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"], "init": False, "beta": 0.5, "gamma": 0.1}
    torch.manual_seed(0)
    summed = dt.attach(tiny_llama(), "kasa", **kw)
    torch.manual_seed(0)
    meaned = dt.attach(tiny_llama(), "kasa", reduction="mean", **kw)
    total = summed.policy.extra_loss(summed)
    assert total.item() == pytest.approx(meaned.policy.extra_loss(meaned).item() * 6, rel=1e-6)  # 3 blocks × q, v
    summed.policy.gamma = 0.0
    summed.policy.extra_loss(summed).backward()
    for form in summed.forms().values():
        assert torch.allclose(form.diag.grad, 2 * 0.5 * form.diag)  # d(β‖Δσ‖²)/dΔσ
    no_reg = dt.attach(tiny_llama(), "kasa", r=4, targets=["q_proj"], beta=0.0, gamma=0.0)
    assert no_reg.policy.extra_loss(no_reg) is None


def test_reload_recomputes_the_truncation_and_fingerprints_the_original_base(tmp_path) -> None:
    model = tiny_llama()
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = batch()
    tuned = dt.attach(model, "kasa", r=4, alpha=8, targets=["q_proj", "v_proj", "up_proj", "down_proj"])
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        (loss_of(tuned, x) + tuned.policy.extra_loss(tuned)).backward()
        opt.step()
    trained = output_of(tuned, x)
    tuned.save(tmp_path / "a")

    stored = load_file(tmp_path / "a" / "delta.safetensors")
    assert {k.rsplit(".", 1)[1] for k in stored} == {"A", "B", "diag"}, "the truncation is not stored"
    assert tuned.stored_bytes() == sum(t.numel() * 4 for t in stored.values())
    meta = artifact.read_meta(tmp_path / "a")
    hashes = meta["fingerprint"]["tensors"]
    name = "model.layers.0.self_attn.q_proj.weight"
    assert hashes[name] == artifact.tensor_hash(originals[name]), "the fingerprint is of the original base"

    loaded = dt.load(tiny_llama(), tmp_path / "a")
    assert torch.equal(output_of(loaded, x), trained), "a rebuilt truncation reproduces the logits bit for bit"
    for n, form in loaded.forms().items():
        assert torch.equal(form.dropped_us, tuned.forms()[n].dropped_us)
    with pytest.raises(dt.DeltatuneError, match="another base model"):
        dt.load(tiny_llama(seed=1), tmp_path / "a")


def test_wide_layer_conventions() -> None:
    assert dropped_count(16, 64, 4, "min") == 4
    assert dropped_count(16, 64, 4, "in_features") == 0  # official: keeps in − r = 60 >= 16 components
    assert dropped_count(16, 18, 4, "in_features") == 2  # in − out = 2 < r: only r − (in − out) dropped
    assert dropped_count(64, 16, 4, "in_features") == dropped_count(64, 16, 4, "min") == 4  # tall: the same
    assert dropped_count(64, 16, 4, "none") == 0
    for truncation, n in (("min", 4), ("in_features", 0)):
        net = Net(64, 16)
        tuned = dt.attach(net, "kasa", r=4, targets=["proj"], truncation=truncation)
        form = tuned.forms()["proj.weight"]
        assert form.dropped == n and form.dropped_us.shape == (16, n)
        s = torch.linalg.svdvals(effective(form).double())
        assert int((s > 1e-4).sum()) == 16 - n


def test_no_truncation_starts_exactly_at_the_base_model() -> None:
    model = tiny_llama()
    x = batch()
    before = output_of(model, x)
    tuned = dt.attach(model, "kasa", r=4, alpha=8, truncation="none", dropout=0.1)
    tuned.train()
    assert torch.equal(output_of(tuned, x), before)


def test_gpt2_conv1d_truncates_the_transposed_matrix() -> None:
    model = tiny_gpt2()
    c_attn = model.transformer.h[0].attn.c_attn
    w0 = c_attn.weight.detach().clone()  # (in, out)
    x = torch.randn(3, 32)
    tuned = dt.attach(model, "kasa", r=4, alpha=8, targets=["c_attn"])
    assert torch.allclose(c_attn(x), x @ world_of(w0.T, 4).T + c_attn.bias, atol=1e-5)
    plain = tuned.merge()
    assert torch.allclose(plain.transformer.h[0].attn.c_attn.weight, world_of(w0.T, 4).T, atol=1e-5)
    tuned.unmerge()
    assert torch.allclose(c_attn.weight, w0, atol=1e-6)


def test_bad_configs_name_the_problem() -> None:
    with pytest.raises(dt.DeltatuneError, match=r"k_proj.*r must be below min\(in, out\) = 16"):
        dt.attach(tiny_llama(), "kasa", r=16, targets=["k_proj"])  # k_proj is 32 -> 16
    with pytest.raises(dt.DeltatuneError, match="not embeddings"):
        dt.attach(tiny_llama(), "kasa", r=4, targets=["embed_tokens"])
    with pytest.raises(dt.DeltatuneError, match="beta"):
        dt.attach(tiny_llama(), "kasa", beta=-1.0)
    with pytest.raises(dt.DeltatuneError, match="truncation"):
        dt.attach(tiny_llama(), "kasa", truncation="smallest")


def test_head_trains_fully_next_to_the_kasa_layers() -> None:
    tuned = dt.attach(tiny_bert(), "kasa", r=2, alpha=4, modules_to_save=["classifier"])
    kinds = {n: f.kind for n, f in tuned.forms().items()}
    assert kinds["classifier.weight"] == "dense" and kinds["bert.encoder.layer.0.attention.self.query.weight"] == "kasa"
    assert tuned.num_trainable() == 3 * 2 * (2 * (32 + 32) + 2) + 3 * 32 + 3


# -- PEFT parity -------------------------------------------------------------------------------
@pytest.mark.parametrize("init", [True, False])
def test_peft_parity(init: bool) -> None:
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "v_proj", "up_proj", "down_proj"]  # square, tall (32 -> 16 kv), tall, wide layers
    base = tiny_llama(tied=False)
    ours_model, peft_model = copy.deepcopy(base), copy.deepcopy(base)
    x = batch()
    torch.manual_seed(3)
    ours = dt.attach(ours_model, "kasa", r=4, alpha=8, targets=targets, init=init)
    torch.manual_seed(3)
    pm = peft.get_peft_model(peft_model, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init,
        kasa_config=peft.KasaConfig(beta=1e-4, gamma=1e-3),
    ))
    forms = ours.forms()
    assert len(forms) == 12
    for name, form in forms.items():
        layer = pm.base_model.model.get_submodule(name.removesuffix(".weight"))
        # same seed, same draws: the same initial factors, bit for bit
        assert torch.equal(form.A, layer.lora_A["default"].weight), name
        assert torch.equal(form.B, layer.lora_B["default"].weight), name
        assert torch.equal(form.diag, layer.lora_diag["default"]), name
        # PEFT overwrote its base with W_world; ours keeps W0 and subtracts the same component
        world = form.base - form.truncation_weight()
        assert (world - layer.base_layer.weight).abs().max() <= 1e-6, name
    assert (output_of(ours, x) - output_of(pm, x)).abs().max() <= 1e-5
    assert ours.policy.extra_loss(ours).item() == pytest.approx(pm.base_model._get_kasa_loss().item(), rel=1e-6)
    ours_plain, peft_plain = ours.merge(), pm.merge_and_unload()
    for name in forms:
        assert (ours_plain.get_parameter(name) - peft_plain.get_parameter(name)).abs().max() <= 1e-5, name


# -- training from a YAML-equivalent config ------------------------------------------------------
def test_train_adds_the_regulariser(tmp_path) -> None:
    folder = save_word_llama(tmp_path / "llama")
    write_sentiment_jsonl(tmp_path / "data.jsonl")

    def run(out: str, beta: float) -> torch.Tensor:
        dt.train({
            "model": str(folder), "output": str(tmp_path / out),
            "data": {"path": str(tmp_path / "data.jsonl"), "task": "classification",
                     "labels": ["negative", "positive"], "max_length": 16, "eval_fraction": 0.25},
            "method": {"name": "kasa", "r": 2, "alpha": 4, "beta": beta},
            "train": {"steps": 8, "batch_size": 4, "lr": 3e-2, "schedule": "constant", "progress": False,
                      "eval_every": 0, "save_every": 0},
        })
        tensors = load_file(tmp_path / out / "delta.safetensors")
        return torch.cat([t for k, t in sorted(tensors.items()) if k.endswith(".diag")])

    free, pulled = run("free", 0.0), run("pulled", 1.0)
    # same seed, same start: the L2 penalty on Δσ (paper Eq. 10) must have pulled the singular values to 0
    assert pulled.norm() < free.norm() - 0.2
    loaded = dt.load(dt.models.load(str(folder)), tmp_path / "pulled")
    assert loaded.method.name == "kasa" and loaded.forms()["model.layers.0.self_attn.q_proj.weight"].dropped == 2
