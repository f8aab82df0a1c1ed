"""The shipped real models: the numbers a user sees in the README hold on them."""

from __future__ import annotations

import copy

import torch

import deltatune as dt


def test_smollm2_lora_counts_merge_and_unmerge(smollm2, tmp_path) -> None:
    model = copy.deepcopy(smollm2)
    x = {"input_ids": torch.tensor([[1, 4093, 314, 253, 1345, 30, 2]])}
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuned = dt.attach(model, "lora", r=8, alpha=16, targets=["q_proj", "v_proj"])
    assert tuned.num_trainable() == 460800
    torch.manual_seed(0)
    with torch.no_grad():
        for f in tuned.forms().values():
            f.B.normal_(std=0.02)
        unmerged = tuned(**x).logits
    tuned.save(tmp_path / "lora")
    assert dt.inspect(tmp_path / "lora")["stored_bytes"] == 4 * 460800
    with torch.no_grad():
        merged = tuned.merge()(**x).logits
    assert (merged - unmerged).abs().max() <= 1e-4  # 30 layers of fp32 reassociation
    tuned.unmerge()
    for f in tuned.forms().values():
        f.detach()
    assert max((p - w0[n]).abs().max().item() for n, p in model.named_parameters()) <= 1e-6


def test_minilm_lora_on_query_value() -> None:
    model = dt.models.load("minilm-l6")
    tuned = dt.attach(model, "lora", r=8, alpha=16)  # BERT default targets: query, value
    assert tuned.num_trainable() == 6 * 2 * 8 * (384 + 384)
    x = {"input_ids": torch.tensor([[101, 7592, 2088, 102]])}
    with torch.no_grad():
        assert tuned(**x).last_hidden_state.shape == (1, 4, 384)
