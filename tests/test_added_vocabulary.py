"""Tokens added to the vocabulary before training (``resize_token_embeddings``): the artifact records the resized
vocabulary and every added row; loading onto the un-resized base resizes it (one warning naming the sizes) and the
logits are the trained model's; a base resized to another size is refused in one line."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, eval_logits, tiny_llama
from transformers import AutoModelForCausalLM

import deltatune as dt
from deltatune.core import vocabulary
from deltatune.errors import DeltatuneError

pytestmark = pytest.mark.usefixtures("one_thread")
ADDED = 8
NEW = [VOCAB, VOCAB + 3, VOCAB + ADDED - 1]  # rows of added tokens that train


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB + ADDED, (2, 12), generator=g)
    ids[:, ::3] = torch.tensor(NEW[:1] * 4)  # the added tokens are read
    return {"input_ids": ids}


def move_rows(tuned: dt.Tuned) -> None:
    """A trained delta: every form's tensors moved off their init."""
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in tuned.delta_parameters() if hasattr(tuned, "delta_parameters") else tuned.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("method", ["trainable_tokens", "lora"])
def test_added_rows_load_onto_the_unresized_base(tmp_path: Path, tied: bool, method: str) -> None:
    model = tiny_llama(tied=tied)
    vocabulary.resize(model, VOCAB + ADDED)  # mean_resizing: the added rows are drawn at random
    options = ({"token_indices": NEW} if method == "trainable_tokens" else
               {"r": 2, "trainable_token_indices": NEW if tied else {"embed_tokens": NEW, "lm_head": NEW}})
    tuned = dt.attach(model, method, **options)
    move_rows(tuned)
    x = inputs()
    expected = eval_logits(tuned, x)
    tuned.save(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "deltatune.json").read_text())
    assert meta["vocabulary"] == {"base": VOCAB, "size": VOCAB + ADDED, "tied": tied}

    fresh = tiny_llama(tied=tied)
    with pytest.warns(UserWarning, match=f"resized from {VOCAB} to {VOCAB + ADDED} tokens") as caught:
        loaded = dt.load(fresh, tmp_path / "a")
    assert all("\n" not in str(w.message) for w in caught)
    assert fresh.get_input_embeddings().weight.shape[0] == VOCAB + ADDED
    assert fresh.get_output_embeddings().out_features == VOCAB + ADDED
    assert torch.equal(eval_logits(loaded, x), expected)

    loaded.save(tmp_path / "again")  # a loaded delta records the vocabulary again
    assert json.loads((tmp_path / "again" / "deltatune.json").read_text())["vocabulary"] == meta["vocabulary"]


def test_resize_of_a_model_loaded_from_its_folder_is_found(tmp_path: Path) -> None:
    """The plain ``resize_token_embeddings`` of a model loaded from a folder: its config.json gives the size before."""
    tiny_llama(tied=False).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    model.resize_token_embeddings(VOCAB + ADDED)
    tuned = dt.attach(model, "trainable_tokens", token_indices=NEW)
    move_rows(tuned)
    x = inputs()
    expected = eval_logits(tuned, x)
    tuned.save(tmp_path / "a")
    fresh = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    with pytest.warns(UserWarning, match="resizing"):
        loaded = dt.load(fresh, tmp_path / "a")
    assert torch.equal(eval_logits(loaded, x), expected)


def test_a_base_resized_to_another_size_is_refused(tmp_path: Path) -> None:
    model = tiny_llama()
    vocabulary.resize(model, VOCAB + ADDED)
    tuned = dt.attach(model, "trainable_tokens", token_indices=NEW)
    tuned.save(tmp_path / "a")
    other = tiny_llama()
    other.resize_token_embeddings(VOCAB + 2)
    with pytest.raises(DeltatuneError) as e:
        dt.load(other, tmp_path / "a")
    assert "\n" not in str(e.value)
    assert f"from {VOCAB} to {VOCAB + ADDED} tokens" in str(e.value) and f"{VOCAB + 2} rows" in str(e.value)


def test_an_unresized_model_records_no_vocabulary(tmp_path: Path) -> None:
    tuned = dt.attach(tiny_llama(), "trainable_tokens", token_indices=[1, 2])
    tuned.save(tmp_path / "a")
    assert "vocabulary" not in json.loads((tmp_path / "a" / "deltatune.json").read_text())
    base = tiny_llama()
    assert torch.equal(eval_logits(dt.load(copy.deepcopy(base), tmp_path / "a"), {"input_ids": torch.tensor([[1, 2]])}),
                       eval_logits(tuned, {"input_ids": torch.tensor([[1, 2]])}))
