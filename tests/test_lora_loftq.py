"""lora's ``init: loftq`` (LoftQ, 4-bit NF4) against PEFT 0.21.2's ``utils/loftq_utils.loftq_init``.

PEFT's ``loftq_init`` runs on CUDA only (it moves the weight to "cuda" / "xpu"), so the reference here is its algorithm
restated in plain torch with bitsandbytes' own CPU NF4 *quantizer* (``quantize_4bit``, compress_statistics off as
PEFT's ``Params4bit``) decoded by table lookup (this CPU's bitsandbytes ``dequantize_4bit`` is off the NF4 grid for a
few values: tests/test_quantized_base.py) and PEFT's own ``_low_rank_decomposition``; the model at init is then PEFT's
LoRA model with its base weight replaced by that Q and lora_A / lora_B by those factors (what ``loftq_init`` does)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import batch, close, eval_logits, tiny_llama

import deltatune as dt
from deltatune.methods._loftq import BLOCK, NF4, LoftQLowRank, nf4_dequantize, nf4_quantize

peft = pytest.importorskip("peft")
bnbf = pytest.importorskip("bitsandbytes.functional")
from peft import LoftQConfig, LoraConfig, get_peft_model  # noqa: E402
from peft.utils.loftq_utils import _low_rank_decomposition  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
R = 4
TARGETS = ["q_proj", "v_proj", "down_proj"]


def bnb_nf4(w: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' NF4 quantization of ``w`` (blocks of 64, fp32 absmax), decoded in plain torch."""
    packed, state = bnbf.quantize_4bit(w.float().contiguous(), blocksize=BLOCK, compress_statistics=False,
                                       quant_type="nf4")
    codes = torch.stack([(packed.reshape(-1) >> 4) & 15, packed.reshape(-1) & 15], 1).reshape(-1).long()
    table = bnbf.get_4bit_type("nf4", device="cpu")
    return (table[codes][: w.numel()].reshape(-1, BLOCK) * state.absmax.float().reshape(-1, 1)).reshape(w.shape)


def peft_loftq(w: torch.Tensor, r: int, num_iter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PEFT's ``loftq_init`` (4 bits) in plain torch: (Q, lora_A, lora_B)."""
    weight = w.float()
    res = weight.clone()
    for i in range(num_iter):
        q = bnb_nf4(res)
        res = weight - q
        out = _low_rank_decomposition(res, reduced_rank=r)
        if i + 1 == num_iter:
            break
        res = weight - out["L"] @ out["R"]
    return q, out["R"], out["L"]


def test_the_nf4_table_and_quantizer_are_bitsandbytes() -> None:
    assert torch.equal(torch.tensor(NF4), bnbf.get_4bit_type("nf4", device="cpu").float())
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(0))
    packed, absmax = nf4_quantize(w)
    ours = nf4_dequantize(packed, absmax, tuple(w.shape))
    theirs = bnb_nf4(w)
    assert (ours != theirs).float().mean() < 1e-3  # nearest-code ties aside, the same codes
    assert close(ours, theirs, rtol=1e-6) or (ours - theirs).abs().max() < 0.3 * w.abs().max()


@pytest.mark.parametrize("num_iter", [1, 2])
def test_the_model_at_init_is_peft_loftq_and_reduces_the_quantization_error(num_iter: int) -> None:
    base = tiny_llama(tied=False)
    tuned = dt.attach(copy.deepcopy(base), "lora", r=R, alpha=R, targets=TARGETS, init="loftq", loftq_iter=num_iter)
    reference = get_peft_model(copy.deepcopy(base), LoraConfig(r=R, lora_alpha=R, target_modules=TARGETS))
    forms = tuned.forms()
    assert forms and all(isinstance(f, LoftQLowRank) for f in forms.values())
    for name, form in forms.items():
        module = name.rsplit(".", 1)[0]
        w = base.get_submodule(module).weight.detach()
        q, a, b = peft_loftq(w, R, num_iter)
        plain_q = bnb_nf4(w)
        # the LoftQ invariant: Q + B·A is closer to W than the plain NF4 quantization of W
        ours = form.q_matrix() + form.B.detach() @ form.A.detach()
        assert torch.linalg.norm(w - ours) < 0.9 * torch.linalg.norm(w - plain_q), name
        assert close(ours, q + b @ a, rtol=1e-4), name
        layer = reference.base_model.model.get_submodule(module)
        with torch.no_grad():
            layer.base_layer.weight.copy_(q)
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    x = batch()
    expected = eval_logits(reference, x)
    assert not close(expected, eval_logits(base, x), rtol=1e-4), "NF4 moves the logits"
    assert close(eval_logits(tuned, x), expected, rtol=1e-4)


def test_the_base_is_never_written_and_the_delta_round_trips(tmp_path: Path) -> None:
    base = tiny_llama()
    w0 = {k: v.clone() for k, v in base.state_dict().items()}
    tuned = dt.attach(copy.deepcopy(base), "lora", r=R, targets=TARGETS, init="loftq")
    x = batch()
    at_init = eval_logits(tuned, x)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    trained = eval_logits(tuned, x)
    assert not torch.equal(trained, at_init)
    tuned.save(tmp_path / "art")
    loaded = dt.load(copy.deepcopy(base), tmp_path / "art")
    assert torch.equal(eval_logits(loaded, x), trained)
    plain = loaded.merge()
    assert close(eval_logits(plain, x), trained, rtol=1e-4)
    loaded.unmerge()
    assert all(close(loaded.model.state_dict()[k], v, rtol=1e-6) for k, v in w0.items() if "proj" in k)
    assert close(eval_logits(loaded, x), trained, rtol=1e-4)
    model = tuned.detach()  # never merged: W0 was never written
    assert all(torch.equal(model.state_dict()[k], v) for k, v in w0.items()), "detach gives the original base back"
    assert torch.equal(eval_logits(model, x), eval_logits(base, x))


def test_attach_takes_peft_loftq_config() -> None:
    config = LoraConfig(r=R, target_modules=["q_proj"], init_lora_weights="loftq",
                        loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=2))
    tuned = dt.attach(tiny_llama(), config)
    assert (tuned.method_config.init, tuned.method_config.loftq_iter) == ("loftq", 2)
    with pytest.raises(dt.DeltatuneError, match="loftq_bits=4"):
        dt.attach(tiny_llama(), LoraConfig(r=R, target_modules=["q_proj"], init_lora_weights="loftq",
                                           loftq_config=LoftQConfig(loftq_bits=8)))


def test_embeddings_and_other_methods_are_refused() -> None:
    with pytest.raises(dt.DeltatuneError, match="is an embedding"):
        dt.attach(tiny_llama(), "lora", r=R, targets=["embed_tokens"], init="loftq")
    with pytest.raises((dt.DeltatuneError, ValueError), match="option of the lora method"):
        dt.attach(tiny_llama(), "dora", r=R, init="loftq")


def test_over_an_nf4_base_the_factors_absorb_its_quantization_error(tmp_path: Path) -> None:
    """PEFT's replace_lora_weights_loftq (``_loftq_init_new``): A, B from the SVD of W − Q, W read from the model's
    safetensors, Q the base's own NF4 weight (decoded here from its stored codes by table lookup)."""
    from deltatune.core import quantized
    from deltatune.data import models

    tiny_llama().save_pretrained(tmp_path / "base")
    plain = models.load(tmp_path / "base")
    model = models.load(tmp_path / "base", quantize="nf4")
    tuned = dt.attach(model, "lora", r=R, alpha=R, targets=["q_proj"], init="loftq")
    for name, form in tuned.forms().items():
        assert not isinstance(form, LoftQLowRank)  # the base is Q: a plain LoRA, nothing frozen to keep
        layer = model.get_submodule(name.rsplit(".", 1)[0])
        w = plain.get_submodule(name.rsplit(".", 1)[0]).weight.detach().float()
        q = quantized.dequantize(layer, torch.float32)
        out = _low_rank_decomposition(w - q, reduced_rank=R)
        assert close(form.A.detach(), out["R"]) and close(form.B.detach(), out["L"])
        assert torch.linalg.norm(w - q - form.B.detach() @ form.A.detach()) < 0.9 * torch.linalg.norm(w - q)


@pytest.mark.parametrize("num_iter", [1, 2])
def test_an_unconverted_peft_loftq_adapter_imports_on_the_original_base(num_iter: int, tmp_path: Path) -> None:
    """PEFT's LoftQ rewrites the base into Q and saves only the factors (init_lora_weights 'loftq' in the config):
    imported onto the original base, deltatune rebuilds Q from W0 and gives the logits of PEFT's model on its
    rewritten base. (PEFT's LoftQ needs CUDA: its model is built here as loftq_init leaves it, from the restated
    algorithm, then its factors are moved as training would.)"""
    rewritten = tiny_llama()
    factors = {}
    with torch.no_grad():
        for name, module in rewritten.named_modules():
            if name.endswith(tuple(TARGETS)):
                q, a, b = peft_loftq(module.weight, R, num_iter)
                module.weight.copy_(q)
                factors[name] = (a, b)
    peft_model = get_peft_model(rewritten, LoraConfig(r=R, lora_alpha=2 * R, target_modules=TARGETS))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if name in factors:
                a, b = factors[name]
                module.lora_A["default"].weight.copy_(a + torch.randn(a.shape, generator=g) * 0.05)
                module.lora_B["default"].weight.copy_(b + torch.randn(b.shape, generator=g) * 0.05)
    x = batch()
    expected = eval_logits(peft_model, x)
    peft_model.save_pretrained(tmp_path / "a")
    config_file = tmp_path / "a" / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**saved, "init_lora_weights": "loftq",
                                       "loftq_config": {"loftq_bits": 4, "loftq_iter": num_iter}}))
    base = tiny_llama()
    w0 = {k: v.clone() for k, v in base.state_dict().items()}
    imported = dt.import_peft(base, tmp_path / "a")
    forms = imported.forms()
    assert set(forms) == {f"{name}.weight" for name in factors}
    assert all(isinstance(f, LoftQLowRank) and f.loftq_iter == num_iter for f in forms.values())
    assert close(eval_logits(imported, x), expected, rtol=1e-5)
    imported.detach()
    assert all(torch.equal(v, w0[k]) for k, v in base.state_dict().items()), "the original base is never written"

    config_file.write_text(json.dumps({**saved, "init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 2}}))
    with pytest.raises(dt.DeltatuneError, match="LoftQ at 2 bits.*convert it to a plain LoRA"):
        dt.import_peft(tiny_llama(), tmp_path / "a")
