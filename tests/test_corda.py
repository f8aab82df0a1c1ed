"""CorDA against the paper's invariants and against PEFT's CorDA init."""

from __future__ import annotations

import dataclasses
import math
import sys
import types

import pytest
import torch
from conftest import (
    batch,
    output_of,
    save_word_llama,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    write_sentiment_jsonl,
)

import deltatune as dt
from deltatune.core import artifact
from deltatune.methods import corda
from deltatune.methods._calibration import padded_batches

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add waits


def _peft():
    """PEFT's CorDA (peft 0.21.2). Its corda.py imports ``dataclass`` from the ``attrs`` package, which PEFT does
    not declare as a dependency; the standard dataclass is what it means (plain fields, no attrs features)."""
    pytest.importorskip("peft")
    try:
        import attr  # noqa: F401
    except ImportError:
        shim = types.ModuleType("attr")
        shim.dataclass = dataclasses.dataclass  # type: ignore[attr-defined]
        sys.modules["attr"] = shim
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    return LoraConfig, CordaConfig, get_peft_model, preprocess_corda


def _sequences(n: int = 6, length: int = 12, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n, length), generator=g).tolist()


# -- the decomposition -----------------------------------------------------------------------------------


def test_decomposition_reconstructs_w_and_full_rank_leaves_no_residual() -> None:
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(16, 24, generator=g), torch.randn(200, 24, generator=g)
    x = x / x.max().abs()
    u, s, v, damp = corda.decompose(w, x.T @ x)
    assert damp == corda.DAMP and bool((s[:-1] >= s[1:]).all()), "descending singular values"
    assert (u @ torch.diag(s) @ v.T - w).abs().max() < 1e-4
    # all 16 components trainable: the residual W - s·B₀A₀ is zero (α = 2r: s = 2)
    a0, b0 = corda.init_factors(*corda.select(u, s, v, 16, "ipa"), scale=2.0)
    assert (w - 2.0 * b0 @ a0).abs().max() < 1e-4
    assert (w - 2.0 * b0 @ a0).abs().max() < 1e-3 * w.abs().max()


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
def test_modes_pick_the_largest_or_smallest_components_and_the_scale_cancels(mode: str) -> None:
    model, seqs = tiny_llama(), _sequences()
    tuned = dt.attach(model, "corda", r=3, alpha=6, mode=mode, data=seqs, targets=["down_proj"], device="cpu")
    name = "model.layers.1.mlp.down_proj"
    module = model.get_submodule(name)
    covs, _ = corda.covariances(model, [(name, module)], [{"input_ids": torch.tensor([s])} for s in seqs])
    u, s, v, _ = corda.decompose(module.weight, covs[name])
    u_r, s_r, v_r = corda.select(u, s, v, 3, mode)
    assert torch.equal(s_r, s[:3] if mode == "ipa" else s[-3:])
    form = tuned.forms()[f"{name}.weight"]
    assert form.scale == 2.0 and form.A.shape == (3, 64) and form.B.shape == (32, 3)
    # s·B₀A₀ = U_r Σ_r V̂_rᵀ whatever the scale (PEFT's σ' = σ/s split as √σ' on both sides)
    assert torch.allclose(form.scale * form.B0 @ form.A0, u_r @ torch.diag(s_r) @ v_r.T, atol=1e-5, rtol=0)
    assert torch.equal(form.A, form.A0) and torch.equal(form.B, form.B0)
    assert torch.allclose(form.A0.norm(dim=1) ** 2, (s_r / 2.0) * v_r.norm(dim=0) ** 2, rtol=1e-4)


def test_covariance_is_the_hook_formula_and_padding_stays_out() -> None:
    model = tiny_llama()
    name = "model.layers.0.self_attn.q_proj"
    module = model.get_submodule(name)
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, args, _o: seen.append(args[0].detach().clone()))
    seqs = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    batches = padded_batches(seqs, 2, always_mask=False)  # one padded batch of 2, one of 1
    assert "attention_mask" in batches[0] and "attention_mask" not in batches[1]
    covs, tokens = corda.covariances(model, [(name, module)], batches)
    handle.remove()
    by_hand = torch.zeros(32, 32)
    for x, b in zip(seen, batches, strict=True):
        rows = x[b["attention_mask"].bool()] if "attention_mask" in b else x.reshape(-1, 32)
        rows = rows / rows.max().abs()  # the signed max, as the official code
        by_hand += rows.T @ rows
    assert tokens[name] == 9
    assert torch.allclose(covs[name], by_hand / 2, atol=1e-6, rtol=1e-5)


def test_damping_terminates_on_a_rank_deficient_covariance_and_doubles_until_accurate() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 24, generator=g)
    cov = x.T @ x  # rank 5 of 24: not invertible without damping
    fixed, inv, damp = corda.damped_inverse(cov)
    assert torch.dist(fixed @ inv, torch.eye(24)) < corda.INV_TOL
    assert torch.allclose(fixed - cov, torch.eye(24) * torch.diag(cov).mean() * damp)
    # a strict tolerance forces doublings: λ = 0.01·2^k, the first λ that meets it
    target = 1e-6
    fixed, inv, damp = corda.damped_inverse(cov, tol=target)
    k = round(math.log2(damp / corda.DAMP))
    assert k >= 1 and damp == corda.DAMP * 2**k and torch.dist(fixed @ inv, torch.eye(24)) < target
    half = cov + torch.eye(24) * torch.diag(cov).mean() * (damp / 2)
    assert torch.dist(half @ torch.linalg.inv(half), torch.eye(24)) >= target


# -- the delta --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_bert], ids=["llama", "gpt2", "bert"])
def test_starts_exactly_at_the_base_without_writing_it(make, mode: str) -> None:
    model, x = make(), batch()
    base, w0 = output_of(model, x), {k: v.clone() for k, v in model.state_dict().items()}
    tuned = dt.attach(model, "corda", r=4, mode=mode, data="random", samples=4)
    assert torch.equal(output_of(tuned, x), base)
    assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items()), "the base weights are never written"
    form = next(iter(tuned.forms().values()))
    assert form.A0.abs().max() > 0 and bool((form.delta_weight() == 0).all())
    assert tuned.num_trainable() == sum(f.A.numel() + f.B.numel() for f in tuned.forms().values())
    # the original base's fingerprint: the hash of each untouched weight
    for name, h in tuned.fingerprint()["tensors"].items():
        assert h == artifact.tensor_hash(w0[name])


CASES = [  # (model, targets, mode, use_rslora, fan_in_fan_out)
    ("llama", ["q_proj", "v_proj", "down_proj"], "ipa", False),
    ("llama", ["q_proj", "v_proj", "down_proj"], "kpa", False),
    ("llama", ["k_proj", "up_proj"], "ipm", True),
    ("gpt2", ["c_attn", "mlp.c_proj"], "kpm", False),
]


@pytest.mark.parametrize(("arch", "targets", "mode", "rslora"), CASES, ids=[f"{c[0]}-{c[2]}-{c[3]}" for c in CASES])
def test_peft_parity_factors_and_logits(arch: str, targets: list[str], mode: str, rslora: bool) -> None:
    LoraConfig, CordaConfig, get_peft_model, preprocess_corda = _peft()
    make = {"llama": tiny_llama, "gpt2": tiny_gpt2}[arch]
    ours, theirs, seqs, x = make(), make(), _sequences(), batch()
    # on the CPU, as PEFT here: another device's SVD may differ in rounding and in the signs of vector pairs
    tuned = dt.attach(ours, "corda", r=4, alpha=8, mode=mode, data=seqs, targets=targets, use_rslora=rslora,
                      device="cpu")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="corda", use_rslora=rslora,
                     fan_in_fan_out=arch == "gpt2", corda_config=CordaConfig(corda_method=corda._MODES[mode][:2] + "m"))
    preprocess_corda(theirs, cfg, run_model=lambda: [theirs(input_ids=torch.tensor([s])) for s in seqs])
    peft_model = get_peft_model(theirs, cfg)
    layers = {n: m for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_A")}
    forms = tuned.forms()
    assert sorted(f"{n}.weight" for n in layers) == sorted(forms)
    for name, layer in layers.items():
        form = forms[f"{name}.weight"]
        assert (form.A - layer.lora_A["default"].weight).abs().max() <= TOL
        assert (form.B - layer.lora_B["default"].weight).abs().max() <= TOL
        assert form.scale == layer.scaling["default"]
    assert (output_of(tuned, x) - output_of(peft_model, x)).abs().max() <= TOL
    # after the same update of the factors (a mis-scaled or dropped branch would show)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, layer in layers.items():
            form = forms[f"{name}.weight"]
            da, db = 0.3 * torch.randn(form.A.shape, generator=g), 0.3 * torch.randn(form.B.shape, generator=g)
            form.A += da
            form.B += db
            layer.lora_A["default"].weight += da
            layer.lora_B["default"].weight += db
    moved = output_of(tuned, x)
    assert (moved - output_of(make(), x)).abs().max() > 100 * TOL
    assert (moved - output_of(peft_model, x)).abs().max() <= TOL


def _trained(model, steps: int = 3, **options):
    tuned = dt.attach(model, "corda", data="random", samples=4, **options)
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
    x = batch()
    for _ in range(steps):
        opt.zero_grad()
        tuned(**x).logits.float().logsumexp(-1).mean().backward()
        opt.step()
    return tuned


@pytest.mark.parametrize("rslora", [False, True])
def test_option_c_a_plain_lora_on_the_untouched_base_gives_the_trained_logits(rslora: bool, tmp_path) -> None:
    from peft import PeftModel

    tuned = _trained(tiny_llama(), r=3, alpha=5, use_rslora=rslora, targets=["q_proj", "v_proj", "gate_proj"],
                     rank_pattern={"gate_proj": 2})
    x = batch()
    trained = output_of(tuned, x)
    tuned.save(tmp_path / "corda")
    corda.to_lora(tuned, tmp_path / "from-tuned")
    corda.to_lora(tmp_path / "corda", tmp_path / "lora")
    assert (tmp_path / "lora" / "delta.safetensors").read_bytes() == (tmp_path / "from-tuned" / "delta.safetensors").read_bytes()
    meta = dt.inspect(tmp_path / "lora")
    assert meta["method"] == "lora" and meta["config"]["r"] == 6
    lora = dt.load(tiny_llama(), tmp_path / "lora")  # the original base: the fingerprint matches
    assert lora.num_trainable() == 2 * tuned.num_trainable()
    assert lora.forms()["model.layers.0.mlp.gate_proj.weight"].r == 4
    assert (output_of(lora, x) - trained).abs().max() <= TOL
    assert (lora.merge().model.layers[1].mlp.gate_proj.weight - tuned.merge().model.layers[1].mlp.gate_proj.weight
            ).abs().max() <= 1e-6
    lora.unmerge()
    # and PEFT serves it as a plain LoRA on the untouched base
    from deltatune.interop.peft import export_peft

    export_peft(lora, tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    assert (output_of(peft_model, x) - trained).abs().max() <= TOL


def test_option_c_keeps_fully_trained_modules(tmp_path) -> None:
    tuned = _trained(tiny_bert(), r=2, alpha=4, targets=["query", "value"], modules_to_save=["classifier"], batch_size=2)
    x = batch()
    trained = output_of(tuned, x)
    meta = dt.inspect(corda.to_lora(tuned, tmp_path / "lora"))
    assert meta["config"]["modules_to_save"] == ["classifier"]
    lora = dt.load(tiny_bert(), tmp_path / "lora")
    assert {n for n in lora.forms() if "classifier" in n} == {"classifier.weight", "classifier.bias"}
    assert (output_of(lora, x) - trained).abs().max() <= TOL


def test_loading_needs_no_calibration_and_detach_restores_w0(tmp_path, monkeypatch) -> None:
    tuned = _trained(tiny_gpt2(), r=2, mode="kpa", targets=["c_attn", "c_fc"])
    x = batch()
    trained = output_of(tuned, x)
    tuned.save(tmp_path / "a")

    def no_data(*_a, **_k):
        raise AssertionError("loading must not calibrate")

    monkeypatch.setattr(corda, "calibration_batches", no_data)
    fresh = tiny_gpt2()
    w0 = {k: v.clone() for k, v in fresh.state_dict().items()}
    loaded = dt.load(fresh, tmp_path / "a")
    assert torch.equal(output_of(loaded, x), trained)
    assert loaded.method_config.calibration == tuned.method_config.calibration
    loaded.merge()
    loaded.unmerge()
    loaded.detach()
    assert all(torch.allclose(v, w0[k], atol=1e-6, rtol=0) for k, v in fresh.state_dict().items())
    with pytest.raises(dt.DeltatuneError, match="another base model"):
        dt.load(tiny_gpt2(seed=1), tmp_path / "a")


# -- runs from YAML on a shipped-format data section ---------------------------------------------------


@pytest.fixture(scope="module")
def word_folder(tmp_path_factory):
    folder = save_word_llama(tmp_path_factory.mktemp("corda-llama"), extra_words=(":",))
    write_sentiment_jsonl(folder / "sentiment.jsonl")
    return folder


def test_yaml_run_calibrates_on_its_data_and_resumes(word_folder, tmp_path) -> None:
    from deltatune.methods._calibration import task_batches
    from deltatune.train import load_config

    (tmp_path / "run.yaml").write_text(f"""
model: {word_folder}
data: &data {{path: {word_folder / 'sentiment.jsonl'}, task: classification, labels: [negative, positive],
              max_length: 16, eval_fraction: 0.25}}
method: {{name: corda, data: *data, r: 2, samples: 6, mode: kpa, device: cpu}}
train: {{steps: 4, batch_size: 4, lr: 1.0e-2, schedule: constant, progress: false}}
output: {tmp_path / 'run'}
""")
    cfg = load_config(tmp_path / "run.yaml", ["data.max_train=12"])
    dt.train(cfg)
    meta, tensors = artifact.read_artifact(tmp_path / "run")
    assert meta["config"]["calibration"]["batches"] == 6

    # the initial factors by hand: the task's first 6 examples of a seeded shuffle, one per call
    model = dt.models.load(str(word_folder))
    batches, loss_fn = task_batches(model, cfg.method["data"], batches=6, batch_size=1)
    name = "model.layers.1.self_attn.o_proj"
    module = model.get_submodule(name)
    covs, _ = corda.covariances(model, [(name, module)], batches, loss_fn)
    u, s, v, _ = corda.decompose(module.weight, covs[name])
    a0, b0 = corda.init_factors(*corda.select(u, s, v, 2, "kpa"), 1.0)
    assert torch.allclose(tensors[f"{name}.weight.A0"], a0, atol=1e-6)
    assert torch.allclose(tensors[f"{name}.weight.B0"], b0, atol=1e-6)

    # stopped after 2 steps and resumed to 4: bit-identical to the straight run
    half = ["data.max_train=12", f"output={tmp_path / 'resumed'}"]
    dt.train(load_config(tmp_path / "run.yaml", [*half, "train.steps=2"]))
    resumed = dt.train(load_config(tmp_path / "run.yaml", half), resume=True)
    assert resumed["resumed_from"] == 2
    assert (tmp_path / "run" / "delta.safetensors").read_bytes() == (tmp_path / "resumed" / "delta.safetensors").read_bytes()


def test_errors_name_the_fix(tmp_path) -> None:
    with pytest.raises(dt.DeltatuneError, match="needs it"):
        dt.attach(tiny_llama(), "corda", r=2)
    with pytest.raises(dt.DeltatuneError, match="exceeds the rank"):
        dt.attach(tiny_llama(), "corda", r=20, data="random", targets=["k_proj"])
    with pytest.raises(dt.DeltatuneError, match="'random'"):
        dt.attach(tiny_llama(), "corda", data="randm")
    with pytest.raises(dt.DeltatuneError, match="token ids"):
        dt.attach(tiny_llama(), "corda", data=[[1, 2], []])
    with pytest.raises(dt.DeltatuneError, match="method data"):
        dt.attach(tiny_llama(), "corda", data={"nme": "tweets"})
    with pytest.raises(dt.DeltatuneError, match="saw no calibration input"):  # a module the forward never reaches
        corda.covariances(tiny_llama(), [("x", torch.nn.Linear(2, 2))], [{"input_ids": torch.tensor([[1]])}])
    lora = dt.attach(tiny_llama(), "lora", r=2)
    with pytest.raises(dt.DeltatuneError, match="converts a corda delta"):
        corda.to_lora(lora, tmp_path / "x")
