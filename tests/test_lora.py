"""LoRA against the paper's invariants and PEFT."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import batch, output_of, tiny_gpt2, tiny_llama
from transformers import AutoModelForCausalLM

import deltatune as dt
from deltatune.core.forms.lowrank import LowRank


def test_zero_init_is_the_base_model_even_with_dropout_in_train_mode() -> None:
    model = tiny_llama()
    x = batch()
    base = output_of(model, x)
    tuned = dt.attach(model, "lora", r=4, alpha=8, dropout=0.5)
    tuned.train()
    assert torch.equal(output_of(tuned, x), base)


def test_a_loaded_lora_takes_the_models_mode_no_dropout_in_eval(tmp_path) -> None:
    """dt.load onto a model in eval mode (as from_pretrained gives it): the same output twice, the delta's dropout
    off; onto a model in train mode the forms train too."""
    tuned = dt.attach(tiny_llama(), "lora", r=4, alpha=8, dropout=0.5, init=False)
    tuned.save(tmp_path / "a")
    x = batch()
    for training in (False, True):
        model = tiny_llama()
        model.train(training)
        loaded = dt.load(model, tmp_path / "a")
        assert all(f.training == training for f in loaded.forms().values()) and model.training == training
    loaded.eval()
    assert torch.equal(output_of(loaded, x), output_of(loaded, x))
    model = tiny_llama().eval()
    again = dt.load(model, tmp_path / "a")
    assert torch.equal(output_of(again, x), output_of(again, x))


def test_scale_is_alpha_over_r_or_alpha_over_sqrt_r() -> None:
    for rslora, expected in ((False, 16 / 8), (True, 16 / math.sqrt(8))):
        tuned = dt.attach(tiny_llama(), "lora", r=8, alpha=16, use_rslora=rslora, init=False)
        form = tuned.forms()["model.layers.0.self_attn.q_proj.weight"]
        assert form.scale == pytest.approx(expected)
        assert torch.allclose(form.delta_weight(), expected * form.B @ form.A)


def test_init_follows_peft() -> None:
    tuned = dt.attach(tiny_llama(tied=False), "lora", r=4, targets=["q_proj", "embed_tokens"])
    q = tuned.forms()["model.layers.0.self_attn.q_proj.weight"]
    assert q.A.abs().max() <= 1 / math.sqrt(32) and bool((q.B == 0).all())
    emb = tuned.forms()["model.embed_tokens.weight"]
    assert bool((emb.A == 0).all()) and emb.B.std() > 0.5
    torch.manual_seed(0)
    g = LowRank(torch.nn.Linear(512, 512), r=16, alpha=16, init="gaussian")
    assert g.A.std().item() == pytest.approx(1 / 16, rel=0.05) and bool((g.B == 0).all())


def test_trainable_count_is_sum_of_r_times_in_plus_out() -> None:
    tuned = dt.attach(tiny_llama(), "lora", r=4, targets=["q_proj", "k_proj", "v_proj"])
    # hidden 32; q: 32->32, k/v: 32->16 (2 kv heads of 8)
    assert tuned.num_trainable() == 3 * 4 * ((32 + 32) + (32 + 16) + (32 + 16))


def test_rank_and_alpha_patterns() -> None:
    tuned = dt.attach(tiny_llama(), "lora", r=4, alpha=8, targets=["q_proj", "v_proj"],
                      rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.0\.self_attn\.q_proj": 32})
    forms = tuned.forms()
    assert forms["model.layers.1.self_attn.v_proj.weight"].r == 2
    assert forms["model.layers.0.self_attn.q_proj.weight"].scale == 8.0
    assert forms["model.layers.1.self_attn.q_proj.weight"].scale == 2.0


def test_conv1d_delta_is_transposed() -> None:
    model = tiny_gpt2()
    tuned = dt.attach(model, "lora", r=2, targets=["c_attn"], init=False)
    form = tuned.forms()["transformer.h.0.attn.c_attn.weight"]
    assert form.layout == "conv1d" and form.delta_weight().shape == form.base.shape == (32, 96)


def test_bias_options() -> None:
    model = tiny_llama(bias=True)
    only = dt.attach(model, "lora", r=2, bias="lora_only")
    assert sorted(n for n in only.forms() if n.endswith(".bias")) == [
        f"model.layers.{i}.self_attn.{p}.bias" for i in range(3) for p in ("q_proj", "v_proj")
    ]
    every = dt.attach(tiny_llama(bias=True), "lora", r=2, bias="all")
    assert len([n for n in every.forms() if n.endswith(".bias")]) == 3 * 7


def test_merge_twice_and_unmerge_unmerged_are_errors() -> None:
    tuned = dt.attach(tiny_llama(), "lora", r=2)
    with pytest.raises(dt.DeltatuneError, match="not merged"):
        tuned.unmerge()
    tuned.merge()
    with pytest.raises(dt.DeltatuneError, match="already merged"):
        tuned.merge()


def test_tied_embedding_lora_merges_into_its_own_copy(tmp_path) -> None:
    """LoRA on a tied input embedding changes the lookup only (as in PEFT); merging must keep the
    output head on W0, so the merged model unties the two and says so in its config."""
    model = tiny_llama(tied=True)
    x = batch()
    tuned = dt.attach(model, "lora", r=2, targets=["embed_tokens"])
    with torch.no_grad():
        tuned.forms()["model.embed_tokens.weight"].A.normal_()
    want = output_of(tuned, x)
    plain = tuned.merge()
    assert plain.lm_head.weight is not plain.model.embed_tokens.weight
    assert torch.allclose(output_of(plain, x), want, atol=1e-5, rtol=0)
    plain.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert torch.allclose(output_of(reloaded, x), want, atol=1e-5, rtol=0)
    tuned.unmerge()
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings


def test_attach_by_config_object_and_bad_options() -> None:
    from deltatune.methods.lora import LoraConfig

    tuned = dt.attach(tiny_llama(), LoraConfig(r=2, alpha=4))
    assert tuned.method.name == "lora" and tuned.method_config.r == 2 and tuned.config.model_type == "llama"
    with pytest.raises(dt.DeltatuneError, match="did you mean 'alpha'"):
        dt.attach(tiny_llama(), "lora", alpah=16)
    with pytest.raises(dt.DeltatuneError, match="r=0"):
        dt.attach(tiny_llama(), "lora", r=0)
    with pytest.raises(dt.DeltatuneError, match="Did you mean 'lora'"):
        dt.attach(tiny_llama(), "lor")
    with pytest.raises(dt.DeltatuneError, match="already has a delta"):
        dt.attach(dt.attach(tiny_llama(), "lora"), "lora")


def test_generate_through_the_wrapper() -> None:
    tuned = dt.attach(tiny_llama(), "lora", r=2, init=False)
    out = tuned.generate(batch(n=1, length=4)["input_ids"], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_attaching_again_replaces_the_previous_delta() -> None:
    model = tiny_llama()
    x = batch()
    base = output_of(model, x)
    first = dt.attach(model, "lora", r=2, init=False)
    with pytest.warns(UserWarning, match="detaching it first"):
        second = dt.attach(model, "lora", r=2)
    assert not first.attached and second.attached
    assert torch.equal(output_of(second, x), base), "the first delta no longer applies"
    assert second.detach() is model and torch.equal(output_of(model, x), base)


def test_attaching_again_detaches_a_delta_nobody_references() -> None:
    model = tiny_llama()
    x = batch()
    base = output_of(model, x)
    dt.attach(model, "lora", r=2, init=False)  # the Tuned is dropped at once; its hooks are not
    assert not torch.equal(output_of(model, x), base)
    with pytest.warns(UserWarning, match="detaching it first"):
        second = dt.attach(model, "lora", r=2)
    assert torch.equal(output_of(second, x), base)
