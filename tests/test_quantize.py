"""tuned.merge(quantize="int8") and quantize_base: int8 weights with per-output-channel scales (torch only).

Stated tolerance: on the tiny models the int8 model's logits stay within 1% of the largest fp32 logit of the
fp32 merge (measured: 0.6% on Llama, 0.45% on GPT-2), and its layers compute exactly what fp layers with the dequantised weights compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import batch, output_of, random_lora, tiny_gpt2, tiny_llama

import deltatune as dt
from deltatune.core.int8 import Int8Linear, quantizable, quantize_model, quantize_weight
from deltatune.ops.quantize import quantize_base

REL_TOL = 0.01


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add waits


def _lora(make, targets, seed: int = 1) -> dt.Tuned:
    """ΔW entries of about the size of the tiny models' weights (std 0.02): the error of the int8 merge grows with
    each output channel's largest |W0 + ΔW|, so a delta that dwarfs W0 costs more."""
    return random_lora(make, seed, scale=0.1, targets=targets)


def _dequantized_copy(make, quantized: nn.Module) -> nn.Module:
    """A fp model whose quantised layers hold Q ⊙ s as ordinary weights (Conv1D: transposed back)."""
    model = make()
    q = dict(quantized.named_modules())
    with torch.no_grad():
        for name, m in quantizable(model):
            w = q[name].dequantized()
            m.weight.copy_(w if isinstance(m, nn.Linear) else w.T)
    return model


def test_quantize_weight_per_output_channel() -> None:
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    w[2] = 0.0
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.shape == (6,)
    assert q.abs().amax(dim=1).tolist() == [127, 127, 0, 127, 127, 127], "each row's largest entry maps to ±127"
    err = (q.float() * s[:, None] - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-7).all()), "rounding to the nearest step"


@pytest.mark.parametrize(("make", "targets"), [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn", "c_fc"])])
def test_merge_int8_stays_close_to_the_fp32_merge(make, targets) -> None:
    x = batch()
    tuned = _lora(make, targets)
    fp32 = output_of(tuned.merge(), x)
    tuned.unmerge()
    plain = tuned.merge(quantize="int8")
    assert plain is tuned.model
    layers = [m for m in plain.modules() if isinstance(m, Int8Linear)]
    linears = [m for m in plain.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    assert len(layers) == 7 * 3 if make is tiny_llama else 4 * 3
    assert linears == [plain.get_output_embeddings()], "every Linear / Conv1D but the (tied) head is int8"
    assert all(m.qweight.dtype == torch.int8 and m.scale.shape == (m.out_features,) for m in layers)
    int8 = output_of(plain, x)
    err = (int8 - fp32).abs().max().item()
    print(f"{make.__name__}: int8 merge vs fp32 merge max |Δlogits| {err:.3g} (max |logit| {fp32.abs().max():.3g})")
    assert 0 < err <= REL_TOL * fp32.abs().max().item()
    assert torch.allclose(int8, output_of(_dequantized_copy(make, plain), x), atol=1e-5, rtol=0), \
        "int8 layers compute x (Q ⊙ s)ᵀ + b"
    with pytest.raises(dt.DeltatuneError, match="cannot be undone"):
        tuned.unmerge()


def test_quantize_none_is_the_plain_merge() -> None:
    x = batch()
    a, b = _lora(tiny_llama, ["q_proj"]), _lora(tiny_llama, ["q_proj"])
    plain_a, plain_b = a.merge(), b.merge(quantize=None)
    assert not any(isinstance(m, Int8Linear) for m in plain_b.modules())
    assert all(torch.equal(plain_a.state_dict()[k], v) for k, v in plain_b.state_dict().items())
    assert torch.equal(output_of(plain_a, x), output_of(plain_b, x))
    b.unmerge()  # still undoable
    with pytest.raises(dt.DeltatuneError, match="not supported"):
        b.merge(quantize="int4")
    assert not b.merged, "a bad scheme is refused before anything is merged"


@pytest.mark.parametrize(("make", "targets"), [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"])])
def test_quantised_base_with_the_delta_unmerged(make, targets) -> None:
    x = batch()
    tuned = _lora(make, targets)
    fp = output_of(tuned, x)
    delta = tuned.delta_state_dict()
    assert quantize_base(tuned) is tuned and tuned.attached
    out = output_of(tuned, x)
    assert (out - fp).abs().max().item() <= REL_TOL * fp.abs().max().item()
    # the reference: fp layers holding the dequantised base weights, the same LoRA on top
    reference = dt.attach(_dequantized_copy(make, tuned.model), "lora", r=4, alpha=8, targets=targets)
    reference.load_delta_state_dict(delta)
    assert torch.allclose(out, output_of(reference, x), atol=1e-5, rtol=0)
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
