"""LoRA's ``trainable_token_indices`` (PEFT's LoraConfig field: chosen embedding rows train next to LoRA, a tied LM
head's with them) against Hugging Face PEFT 0.21.2: logits and gradients with PEFT's randomised adapter copied in, on
a tied and an untied Llama; PEFT adapter -> deltatune -> PEFT round trips; a mapping of modules to ids (an untied
head's own rows); save / load; refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import batch, close, eval_logits, loss_of, peft_round_trip, randomised_peft, tiny_llama

import deltatune as dt
from deltatune.methods._token_rows import TokenRows

peft = pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENS = [5, 3, 77, 120]


def with_tokens(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = x["input_ids"].clone()
    ids[0, : len(TOKENS)] = torch.tensor(TOKENS)
    return {"input_ids": ids}


def config(**extra) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], trainable_token_indices=TOKENS, **extra)


@pytest.mark.parametrize("tied", [True, False])
def test_logits_and_gradients_equal_peft(tied: bool, tmp_path: Path) -> None:
    base = tiny_llama(tied=tied)
    reference = randomised_peft(base, config())
    reference.save_pretrained(tmp_path / "peft")
    tuned = dt.attach(copy.deepcopy(base), config())  # PEFT's config object, converted
    assert tuned.num_trainable() == reference.get_nb_trainable_parameters()[0]
    imported = dt.import_peft(copy.deepcopy(base), tmp_path / "peft")
    assert set(imported.forms()) == set(tuned.forms())
    for name, form in tuned.forms().items():
        form.load_stored(imported.forms()[name].stored_tensors())
    rows = tuned.forms()["model.embed_tokens.weight"]
    assert isinstance(rows, TokenRows) and len(rows.sites) == (2 if tied else 1)

    x = with_tokens(batch())
    expected = eval_logits(reference, x)
    assert close(eval_logits(tuned, x), expected)
    loss_of(tuned, x).backward()
    loss_of(reference, x).backward()
    (theirs,) = [p.grad for n, p in reference.named_parameters() if "trainable_tokens_delta" in n]
    assert theirs.abs().max() > 0
    assert close(rows.values.grad.view(len(TOKENS), -1), theirs)
    a_grad = tuned.forms()["model.layers.0.self_attn.q_proj.weight"].A.grad
    (peft_a,) = [p.grad for n, p in reference.named_parameters() if "layers.0.self_attn.q_proj.lora_A" in n]
    assert close(a_grad, peft_a)


@pytest.mark.parametrize("tied", [True, False])
def test_a_peft_adapter_round_trips_through_import_and_export(tied: bool, tmp_path: Path) -> None:
    base = tiny_llama(tied=tied)
    reference = randomised_peft(base, config())
    cfg = peft_round_trip(base, reference, LoraConfig, "lora", with_tokens(batch()), tmp_path)
    assert cfg["trainable_token_indices"] == TOKENS


def test_a_mapping_trains_an_untied_heads_own_rows(tmp_path: Path) -> None:
    base = tiny_llama(tied=False)
    mapping = {"embed_tokens": TOKENS, "lm_head": [7, 9]}
    reference = randomised_peft(base, LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=mapping))
    tuned = dt.attach(copy.deepcopy(base), "lora", r=4, targets=["q_proj"], trainable_token_indices=mapping)
    assert tuned.num_trainable() == reference.get_nb_trainable_parameters()[0]
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(tuned.forms())
    cfg = peft_round_trip(base, reference, LoraConfig, "lora", with_tokens(batch()), tmp_path)
    assert cfg["trainable_token_indices"] == {"model.embed_tokens": TOKENS, "lm_head": [7, 9]}


def test_save_load_and_export_of_a_trained_delta(tmp_path: Path) -> None:
    base = tiny_llama()
    tuned = dt.attach(copy.deepcopy(base), "lora", r=4, trainable_token_indices=TOKENS)
    x = with_tokens(batch())
    assert torch.equal(eval_logits(tuned, x), eval_logits(base, x)), "a fresh delta starts at the base"
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    tuned.save(tmp_path / "art")
    loaded = dt.load(copy.deepcopy(base), tmp_path / "art")
    assert loaded.method_config.trainable_token_indices == TOKENS
    assert torch.equal(eval_logits(loaded, x), eval_logits(tuned, x))
    dt.export_peft(tuned, tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert saved["trainable_token_indices"] == TOKENS
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    assert close(eval_logits(theirs, x), eval_logits(tuned, x))


@pytest.mark.parametrize(("options", "said"), [
    ({"trainable_token_indices": [4, 4]}, "names token 4 twice"),
    ({"trainable_token_indices": [500]}, "token id 500 is outside the embedding's 128 rows"),
    ({"trainable_token_indices": [1], "targets": ["embed_tokens"]}, "is both a LoRA target"),
    ({"trainable_token_indices": {"embed_tokens": [1], "lm_head": [2]}}, "shares its weight with model.embed_tokens"),
])
def test_bad_options_are_refused_in_one_line(options: dict, said: str) -> None:
    with pytest.raises((dt.DeltatuneError, ValueError)) as err:
        dt.attach(tiny_llama(), "lora", r=4, **options)
    assert said in str(err.value) and "\n" not in str(err.value)


def test_dora_refuses_the_option() -> None:
    with pytest.raises((dt.DeltatuneError, ValueError), match="option of the lora method"):
        dt.attach(tiny_llama(), "dora", r=4, trainable_token_indices=[1])
