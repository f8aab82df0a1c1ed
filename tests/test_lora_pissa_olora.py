"""LoRA's PiSSA / OLoRA inits (``init: pissa | pissa_niter_K | olora``) against PEFT 0.21.2, which rewrites the base
weight into W − s·B₀A₀; deltatune keeps B₀A₀ as a frozen residual inside the delta and never writes W."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batch, output_of, tiny_gpt2, tiny_llama, word_run_config

import deltatune as dt
from deltatune.core import artifact
from deltatune.core.forms.lowrank import LowRank
from deltatune.methods._lowrank import ResidualLowRank

pytestmark = pytest.mark.usefixtures("one_thread")

INITS = ["pissa", "pissa_niter_2", "olora"]
MODELS = {"llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]), "gpt2": (tiny_gpt2, ["c_attn", "mlp.c_proj"])}


def close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal within ``rel`` of the values' scale (logits of a few units; weights of a few tenths)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def train_a_bit(tuned: dt.Tuned, seed: int = 5, size: float = 0.05) -> None:
    """Move A and B away from A₀, B₀ as training would (random, seeded)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for form in tuned.forms().values():
            form.A.add_(torch.randn(form.A.shape, generator=g) * size)
            form.B.add_(torch.randn(form.B.shape, generator=g) * size)


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("model", list(MODELS))
def test_a_fresh_delta_is_the_base_and_the_base_is_never_written(model: str, init: str) -> None:
    make, targets = MODELS[model]
    base_model, x = make(), batch()
    base, w0 = output_of(base_model, x), {k: v.clone() for k, v in base_model.state_dict().items()}
    tuned = dt.attach(base_model, "lora", r=4, alpha=8, targets=targets, init=init)
    close(output_of(tuned, x), base, rel=1e-6)
    assert all(torch.equal(v, w0[k]) for k, v in base_model.state_dict().items()), "W0 is never written"
    forms = tuned.forms()
    assert all(isinstance(f, ResidualLowRank) for f in forms.values())
    for f in forms.values():  # A, B start at the principal part: not zero, and equal to the frozen copy
        assert f.B.abs().max() > 0 and torch.equal(f.A, f.A0) and torch.equal(f.B, f.B0)
        assert not f.A0.requires_grad and "A0" in dict(f.named_buffers())
    assert tuned.num_trainable() == sum(f.A.numel() + f.B.numel() for f in forms.values()), "A₀, B₀ do not train"
    # the fingerprint is the original base's, the same as a plain LoRA's on the same weights
    plain = dt.attach(make(), "lora", r=4, alpha=8, targets=targets)
    assert tuned.fingerprint() == plain.fingerprint()
    for name, h in tuned.fingerprint()["tensors"].items():
        assert h == artifact.tensor_hash(w0[name])


def _peft_twin(make, targets: list[str], init: str, **options):
    from peft import LoraConfig, get_peft_model

    model = make()
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=4, lora_alpha=options.get("alpha", 8), target_modules=targets, init_lora_weights=init,
        use_rslora=options.get("use_rslora", False), fan_in_fan_out=make is tiny_gpt2))
    tuned = dt.attach(model, "lora", r=4, targets=targets, init=init, **{"alpha": 8, **options})
    layers = dict(peft_model.named_modules())
    pairs = [(f, layers[f"base_model.model.{name.removesuffix('.weight')}"]) for name, f in tuned.forms().items()]
    return peft_model, tuned, pairs


# PEFT's OLoRA on a GPT-2 Conv1D takes the QR of the stored (in, out) matrix and assigns factors of the wrong
# shapes (peft 0.21.2 ``olora_init`` ignores fan_in_fan_out): it does not start at the base there, so OLoRA is
# compared on Linear layers; deltatune decomposes the (out, in) matrix for both.
PEFT_CASES = [("llama", "pissa", {}), ("llama", "pissa_niter_2", {}), ("llama", "olora", {}),
              ("gpt2", "pissa", {}), ("gpt2", "pissa_niter_2", {}), ("llama", "pissa", {"alpha": 16, "use_rslora": True})]


@pytest.mark.parametrize(("model", "init", "options"), PEFT_CASES)
def test_trained_factors_give_peft_s_rewritten_model(model: str, init: str, options: dict) -> None:
    pytest.importorskip("peft")
    make, targets = MODELS[model]
    peft_model, tuned, pairs = _peft_twin(make, targets, init, **options)
    x = batch()
    close(output_of(tuned, x), output_of(peft_model, x))  # both start at the base
    for ours, layer in pairs:
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        if init.startswith("pissa_niter"):  # a randomised SVD: take PEFT's draw
            with torch.no_grad():
                ours.A0.copy_(a)
                ours.B0.copy_(b)
        else:  # the same SVD / QR of the same matrix: PEFT's factors bit for bit
            assert torch.equal(ours.A0, a) and torch.equal(ours.B0, b)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # "train" PEFT's factors and copy them: PEFT's model keeps its rewritten W0
        for ours, layer in pairs:
            for theirs, mine in ((layer.lora_A["default"].weight, ours.A), (layer.lora_B["default"].weight, ours.B)):
                theirs.add_(torch.randn(theirs.shape, generator=g) * 0.05)
                mine.copy_(theirs)
    trained = output_of(peft_model, x)
    assert (trained - output_of(make(), x)).abs().max() > 1e-2, "the factors moved the model"
    close(output_of(tuned, x), trained)


@pytest.mark.parametrize("init", INITS)
def test_merge_unmerge_detach_restore_the_original_base(init: str) -> None:
    model, x = tiny_llama(), batch()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    base = output_of(model, x)
    tuned = dt.attach(model, "lora", r=4, alpha=8, init=init)
    train_a_bit(tuned)
    served = output_of(tuned, x)
    merged = tuned.merge()
    close(output_of(merged, x), served)
    q = "model.layers.0.self_attn.q_proj.weight"
    form = tuned.forms()[q]
    close(merged.state_dict()[q], w0[q] + form.delta_weight().detach())
    tuned.unmerge()
    for k, v in model.state_dict().items():
        close(v, w0[k], rel=1e-6)
    close(output_of(tuned, x), served)
    # without a merge W0 is never written: detaching a trained delta gives back the base bit for bit
    other = tiny_llama()
    again = dt.attach(other, "lora", r=4, alpha=8, init=init)
    train_a_bit(again)
    again.detach()
    assert all(torch.equal(v, w0[k]) for k, v in other.state_dict().items())
    assert torch.equal(output_of(other, x), base)


@pytest.mark.parametrize("init", INITS)
def test_save_load_gives_the_trained_outputs_without_decomposing_again(init: str, tmp_path, monkeypatch) -> None:
    tuned = dt.attach(tiny_gpt2(), "lora", r=4, alpha=8, init=init)
    train_a_bit(tuned)
    x = batch()
    served = output_of(tuned, x)
    tuned.save(tmp_path / "a")
    stored = artifact.read_artifact(tmp_path / "a")[1]
    assert {k.rsplit(".", 1)[1] for k in stored} == {"A", "B", "A0", "B0"}, "the residual factors are stored"

    def refuse(*args, **kwargs):
        raise AssertionError("loading must read A₀, B₀, not decompose W again")

    for fn in ("svd", "qr"):
        monkeypatch.setattr(torch.linalg, fn, refuse)
    monkeypatch.setattr(torch, "svd_lowrank", refuse)
    loaded = dt.load(tiny_gpt2(), tmp_path / "a")
    assert torch.equal(output_of(loaded, x), served)


def test_an_embedding_target_keeps_loras_default_init_as_in_peft() -> None:
    tuned = dt.attach(tiny_llama(), "lora", r=2, targets=["embed_tokens", "q_proj"], init="pissa")
    kinds = {name.split(".")[-2]: type(f) for name, f in tuned.forms().items()}
    assert kinds["embed_tokens"] is LowRank and kinds["q_proj"] is ResidualLowRank


def test_bad_inits_and_ranks_are_refused_with_the_fix() -> None:
    with pytest.raises(dt.DeltatuneError, match=r"init='bogus' is not a LoRA init.*'pissa_niter_K'"):
        dt.attach(tiny_llama(), "lora", init="bogus")
    with pytest.raises(dt.DeltatuneError, match="method corda"):
        dt.attach(tiny_llama(), "lora", init="corda")
    with pytest.raises(dt.DeltatuneError, match=r"init='pissa' is an option of the lora method"):
        dt.attach(tiny_llama(), "dora", init="pissa")
    # v_proj is 16 x 32 (two key-value heads of 8): PiSSA has 16 components there
    with pytest.raises(dt.DeltatuneError, match=r"r=20 exceeds the rank of .*v_proj \(16x32\).*lower r"):
        dt.attach(tiny_llama(), "lora", r=20, init="olora")


def test_a_run_trains_resumes_bit_exactly_and_loads(word_run, tmp_path) -> None:
    from conftest import train_then_resume

    cfg = word_run_config(word_run, {"name": "lora", "r": 2, "alpha": 4, "init": "pissa_niter_1"}, tmp_path / "run",
                          steps=4, loraplus_ratio=4)
    train_then_resume(cfg, keep=1)
    from deltatune.data import models

    loaded = dt.load(models.load(word_run[0]), tmp_path / "run")
    form = next(iter(loaded.forms().values()))
    assert isinstance(form, ResidualLowRank) and form.A0.abs().max() > 0 and not torch.equal(form.A, form.A0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_on_a_quantized_base_the_factors_are_those_of_its_dequantized_weights(init: str, tmp_path) -> None:
    """PEFT refuses PiSSA on a bitsandbytes base (it would rewrite packed storage); with W never written, the
    decomposition is of the weights the layer computes with, and nothing is re-quantized."""
    pytest.importorskip("bitsandbytes")
    from deltatune.core import quantized
    from deltatune.data import models

    tiny_llama().save_pretrained(tmp_path / "m")
    nf4 = models.load(tmp_path / "m", quantize="nf4")
    plain = models.load(tmp_path / "m")
    with torch.no_grad():  # the full-precision model the nf4 one computes
        for name, m in quantized.quantized_layers(nf4):
            plain.get_submodule(name).weight.copy_(quantized.dequantize(m, torch.float32))
    x = batch()
    base = output_of(nf4, x)
    tuned = dt.attach(nf4, "lora", r=4, alpha=8, init=init)
    close(output_of(tuned, x), base, rel=1e-6)
    twin = dt.attach(plain, "lora", r=4, alpha=8, init=init)
    for name, form in tuned.forms().items():
        assert torch.equal(form.A0, twin.forms()[name].A0) and torch.equal(form.B0, twin.forms()[name].B0)
    train_a_bit(tuned)
    train_a_bit(twin)
    close(output_of(tuned, x), output_of(twin, x))
