"""tuned.merge(quantize=...) and quantize_base: bitsandbytes layers (LLM.int8(); QLoRA's nf4) after a merge,
or under an unmerged delta.

Stated tolerance: on the tiny models the int8 model's logits stay within 1% of the largest fp32 logit of
the fp32 merge (measured with bitsandbytes 0.50.2: 0.73% on Llama, 0.43% on GPT-2; the hand-written
per-channel int8 layer it replaced gave 0.63% and 0.45%). LLM.int8() quantizes the activations too
(row-wise, through fp16 on a CPU), so an int8 layer is not exactly a fp layer holding its dequantized
weights; an nf4 layer is (it dequantizes and multiplies in its compute dtype), which the unmerged-delta
test checks to float precision."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
import torch.nn as nn
from conftest import batch, output_of, random_lora, tiny_gpt2, tiny_llama

import deltatune as dt
from deltatune.core import quantized
from deltatune.ops.quantize import quantize_base, quantize_model

REL_TOL = 0.01


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add waits


def _lora(make, targets, seed: int = 1) -> dt.Tuned:
    """ΔW entries of about the size of the tiny models' weights (std 0.02): the error of the int8 merge grows
    with each output channel's largest |W0 + ΔW|, so a delta that dwarfs W0 costs more."""
    return random_lora(make, seed, scale=0.1, targets=targets)


def _dequantized_copy(make, model: nn.Module) -> nn.Module:
    """A fp model whose quantized layers hold their dequantized weights as ordinary weights (Conv1D:
    transposed back)."""
    plain = make()
    q = dict(model.named_modules())
    with torch.no_grad():
        for name, m in quantized.quantizable(plain):
            w = quantized.dequantize(q[name], torch.float32)
            m.weight.copy_(w if isinstance(m, nn.Linear) else w.T)
    return plain


def test_int8_weights_are_rows_scaled_to_127() -> None:
    """LLM.int8()'s weight scheme: each row scaled so its largest |value| is 127 (bitsandbytes casts the
    weight to fp16 first), so dequantizing is off by at most half a step plus that cast's rounding."""
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    w[2] = 0.0
    layer = quantized.quantize_linear(w, None, "int8")
    assert isinstance(layer, bnb.nn.Linear8bitLt) and layer.weight.dtype == torch.int8
    assert layer.weight.data.abs().amax(dim=1).tolist() == [127, 127, 0, 127, 127, 127]
    step = w.abs().amax(dim=1, keepdim=True) / 127
    err = (quantized.dequantize(layer, torch.float32) - w).abs()
    assert bool((err <= step / 2 + w.abs() * 2**-10 + 1e-7).all()), "rounding to the nearest step"


@pytest.mark.parametrize(("make", "targets"), [(tiny_llama, ["q_proj", "v_proj"]),
                                               (tiny_gpt2, ["c_attn", "c_fc"])])
def test_merge_int8_stays_close_to_the_fp32_merge(make, targets) -> None:
    x = batch()
    tuned = _lora(make, targets)
    fp32 = output_of(tuned.merge(), x)
    tuned.unmerge()
    plain = tuned.merge(quantize="int8")
    assert plain is tuned.model
    layers = [m for m in plain.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    linears = [m for m in plain.modules() if type(m) is nn.Linear or type(m).__name__ == "Conv1D"]
    assert len(layers) == 7 * 3 if make is tiny_llama else 4 * 3
    assert linears == [plain.get_output_embeddings()], "every Linear / Conv1D but the (tied) head is int8"
    int8 = output_of(plain, x)
    err = (int8 - fp32).abs().max().item()
    print(f"{make.__name__}: int8 merge vs fp32 merge max |Δlogits| {err:.3g} "
          f"(max |logit| {fp32.abs().max():.3g})")
    assert 0 < err <= REL_TOL * fp32.abs().max().item()
    with pytest.raises(dt.DeltatuneError, match="cannot be undone"):
        tuned.unmerge()


def test_quantize_none_is_the_plain_merge() -> None:
    x = batch()
    a, b = _lora(tiny_llama, ["q_proj"]), _lora(tiny_llama, ["q_proj"])
    plain_a, plain_b = a.merge(), b.merge(quantize=None)
    assert not quantized.is_quantized_model(plain_b)
    assert all(torch.equal(plain_a.state_dict()[k], v) for k, v in plain_b.state_dict().items())
    assert torch.equal(output_of(plain_a, x), output_of(plain_b, x))
    b.unmerge()  # still undoable
    with pytest.raises(dt.DeltatuneError, match="not supported"):
        b.merge(quantize="int4")
    assert not b.merged, "a bad scheme is refused before anything is merged"


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
@pytest.mark.parametrize(("make", "targets"), [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"])])
def test_quantised_base_with_the_delta_unmerged(make, targets, scheme) -> None:
    x = batch()
    tuned = _lora(make, targets)
    fp = output_of(tuned, x)
    delta = tuned.delta_state_dict()
    assert quantize_base(tuned, scheme) is tuned and tuned.attached
    out = output_of(tuned, x)
    # the reference: fp layers holding the dequantized base weights, the same LoRA on top
    reference = dt.attach(_dequantized_copy(make, tuned.model), "lora", r=4, alpha=8, targets=targets)
    reference.load_delta_state_dict(delta)
    expected = output_of(reference, x)
    # a 4-bit layer computes x·dequant(W)ᵀ in its compute dtype: exact up to the summation order
    if scheme == "nf4":
        assert torch.allclose(out, expected, atol=1e-5, rtol=0)
    else:  # LLM.int8() also quantizes each input row
        assert (out - fp).abs().max().item() <= REL_TOL * fp.abs().max().item()
        assert (out - expected).abs().max().item() <= REL_TOL * expected.abs().max().item()
    with pytest.raises(dt.DeltatuneError, match="quantised"):
        tuned.merge()


def test_deltas_that_need_the_fp_weight_are_refused() -> None:
    full = dt.attach(tiny_llama(), "full", targets=["model.layers.0.self_attn.q_proj.weight"])
    with pytest.raises(dt.DeltatuneError, match="full-precision weight"):
        quantize_base(full)
    busy = _lora(tiny_llama, ["q_proj"])
    with pytest.raises(dt.DeltatuneError, match="plain model"):
        quantize_model(busy)
    with pytest.raises(dt.DeltatuneError, match="delta attached"):
        quantize_model(busy.model)
