"""Trainable tokens against Hugging Face PEFT 0.21.2's TrainableTokens (the reference): logits and gradients with PEFT's
(randomised) rows copied in, on a tied and an untied Llama; only the listed rows change when it trains; save / load
bit for bit; merge folds the rows into the embedding (and the tied head), unmerge restores W0 exactly; PEFT adapters
round-tripped through import and export; ``dt.attach(model, TrainableTokensConfig(...))``."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import batch, close, eval_logits, loss_of, peft_round_trip, randomised_peft, tiny_llama

import deltatune as dt
from deltatune.core import registry
from deltatune.methods.trainable_tokens import TokenRows
from deltatune.train import load_config

peft = pytest.importorskip("peft")
from peft import TrainableTokensConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add waits

TOKENS = [5, 3, 77, 120]


def with_tokens(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch with every listed token in it, so the rows act on the input side too."""
    ids = x["input_ids"].clone()
    ids[0, : len(TOKENS)] = torch.tensor(TOKENS)
    return {"input_ids": ids}


def peft_rows(model: torch.nn.Module) -> torch.nn.Parameter:
    (rows,) = [p for n, p in model.named_parameters() if p.requires_grad]
    return rows


def attached_like(base: torch.nn.Module, reference: torch.nn.Module, folder: Path):
    """``dt.attach`` with PEFT's config, PEFT's trained rows copied in (through deltatune's import of its adapter)."""
    reference.save_pretrained(folder)
    tuned = dt.attach(copy.deepcopy(base), TrainableTokensConfig(token_indices=TOKENS))
    imported = dt.import_peft(copy.deepcopy(base), folder)
    assert set(imported.forms()) == set(tuned.forms()) == {"model.embed_tokens.weight"}
    for name, form in tuned.forms().items():
        form.load_stored(imported.forms()[name].stored_tensors())
    return tuned


@pytest.mark.parametrize("tied", [True, False])
def test_logits_and_gradients_equal_peft(tied: bool, tmp_path: Path) -> None:
    base = tiny_llama(tied=tied)
    reference = randomised_peft(base, TrainableTokensConfig(token_indices=TOKENS))
    tuned = attached_like(base, reference, tmp_path / "peft")
    (form,) = tuned.forms().values()
    assert isinstance(form, TokenRows) and len(form.sites) == (2 if tied else 1)  # the tied head shares the rows
    assert tuned.num_trainable() == reference.get_nb_trainable_parameters()[0] == len(TOKENS) * 32

    x = with_tokens(batch())
    expected = eval_logits(reference, x)
    assert not close(expected, eval_logits(base, x), rtol=1e-3), "the rows must move the logits"
    assert close(eval_logits(tuned, x), expected)
    if tied:  # the head's columns of the listed tokens moved too, as PEFT's tied adapter moves them
        with torch.no_grad():
            last = tuned.model.model(**x).last_hidden_state  # the body with the moved input rows
        assert close(eval_logits(tuned, x)[..., TOKENS], last @ form.rows().T)

    loss_of(tuned, x).backward()
    loss_of(reference, x).backward()
    theirs = peft_rows(reference).grad
    assert theirs.abs().max() > 0
    assert close(form.values.grad.view(len(TOKENS), -1), theirs)


def test_a_fresh_delta_starts_at_the_base_and_init_false_is_random_rows() -> None:
    base = tiny_llama()
    x = with_tokens(batch())
    tuned = dt.attach(copy.deepcopy(base), "trainable_tokens", token_indices=TOKENS)
    assert torch.equal(eval_logits(tuned, x), eval_logits(base, x))
    torch.manual_seed(0)
    random_rows = dt.attach(copy.deepcopy(base), "trainable_tokens", token_indices=TOKENS, init=False)
    (form,) = random_rows.forms().values()
    assert 0.5 < float(form.rows().std()) < 2.0  # N(0, 1) rows, as PEFT's init_weights=False


@pytest.mark.parametrize("tied", [True, False])
def test_only_the_listed_rows_change_when_it_trains(tied: bool) -> None:
    base = tiny_llama(tied=tied)
    w0 = base.model.embed_tokens.weight.detach().clone()
    head0 = base.lm_head.weight.detach().clone()
    tuned = dt.attach(copy.deepcopy(base), "trainable_tokens", token_indices=TOKENS)
    tuned.train()
    optimizer = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        loss_of(tuned, with_tokens(batch(seed=step))).backward()
        optimizer.step()
        optimizer.zero_grad()
    model = tuned.model
    seen = model.model.embed_tokens.weight.detach()  # W0 with the rows, as the forward pass sees it
    others = [i for i in range(w0.shape[0]) if i not in TOKENS]
    assert torch.equal(seen[others], w0[others]), "every other row stays bit for bit"
    assert all(not torch.equal(seen[t], w0[t]) for t in TOKENS), "every listed row trained"
    if tied:
        assert torch.equal(model.lm_head.weight.detach(), seen)
    else:
        assert torch.equal(model.lm_head.weight.detach(), head0), "an untied head is not touched"
    assert sum(p.numel() for p in tuned.parameters() if p.requires_grad) == len(TOKENS) * w0.shape[1]


def trained(tied: bool = True) -> tuple[torch.nn.Module, object]:
    base = tiny_llama(tied=tied)
    tuned = dt.attach(copy.deepcopy(base), "trainable_tokens", token_indices=TOKENS)
    (form,) = tuned.forms().values()
    with torch.no_grad():
        form.values.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
    return base, tuned


def test_save_and_load_are_exact(tmp_path: Path) -> None:
    base, tuned = trained()
    x = with_tokens(batch())
    tuned.save(tmp_path / "art")
    loaded = dt.load(copy.deepcopy(base), tmp_path / "art")
    assert loaded.method.name == "trainable_tokens" and loaded.method_config.token_indices == TOKENS
    assert torch.equal(eval_logits(loaded, x), eval_logits(tuned, x))
    loaded.save(tmp_path / "again")
    assert (tmp_path / "again" / "delta.safetensors").read_bytes() == (tmp_path / "art" / "delta.safetensors").read_bytes()


@pytest.mark.parametrize("tied", [True, False])
def test_merge_folds_the_rows_into_the_embedding_and_unmerge_restores_it(tied: bool) -> None:
    base, tuned = trained(tied)
    x = with_tokens(batch())
    w0 = base.model.embed_tokens.weight.detach().clone()
    head0 = base.lm_head.weight.detach().clone()
    attached = eval_logits(tuned, x)
    (form,) = tuned.forms().values()
    rows = form.rows()
    plain = tuned.merge()
    assert not any("parametrizations" in k for k in plain.state_dict())
    embedding = plain.model.embed_tokens.weight.detach()
    assert torch.equal(embedding[TOKENS], rows)
    if tied:
        assert plain.lm_head.weight is plain.model.embed_tokens.weight, "the tie is kept: the head has the rows too"
    else:
        assert torch.equal(plain.lm_head.weight.detach(), head0)
    assert close(eval_logits(plain, x), attached)
    tuned.unmerge()
    assert torch.equal(tuned.model.model.embed_tokens.parametrizations.weight.original.detach(), w0)
    assert torch.equal(eval_logits(tuned, x), attached)
    tuned.detach()
    assert torch.equal(base.model.embed_tokens.weight.detach(), w0)
    assert torch.equal(tuned.model.model.embed_tokens.weight.detach(), w0), "detached: W0 bit for bit"


@pytest.mark.parametrize("tied", [True, False])
def test_a_peft_adapter_round_trips_through_import_and_export(tied: bool, tmp_path: Path) -> None:
    base = tiny_llama(tied=tied)
    reference = randomised_peft(base, TrainableTokensConfig(token_indices=TOKENS))
    x = with_tokens(batch())
    config = peft_round_trip(base, reference, TrainableTokensConfig, "trainable_tokens", x, tmp_path)
    assert config["token_indices"] == TOKENS and config["target_modules"] == ["model.embed_tokens"]


def test_a_trained_delta_exports_to_peft(tmp_path: Path) -> None:
    base, tuned = trained()
    x = with_tokens(batch())
    dt.export_peft(tuned, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    assert close(eval_logits(theirs, x), eval_logits(tuned, x))


def test_attach_takes_peft_config_with_its_fields() -> None:
    tuned = dt.attach(tiny_llama(), TrainableTokensConfig(token_indices=[9, 2], target_modules=["embed_tokens"],
                                                          init_weights=False))
    cfg = tuned.method_config
    assert tuned.method.name == "trainable_tokens"
    assert (cfg.token_indices, cfg.targets, cfg.init) == ([9, 2], ["embed_tokens"], False)


@pytest.mark.parametrize(("options", "said"), [
    ({}, "token_indices is empty"),
    ({"token_indices": [1, 500]}, "token id 500 is outside the embedding's 128 rows"),
    ({"token_indices": [4, 4]}, "names token 4 twice"),
    ({"token_indices": [1], "targets": ["lm_head"]}, "lm_head shares its weight with model.embed_tokens"),
    ({"token_indices": [1], "targets": ["q_proj"]}, "trainable tokens take the rows of an nn.Embedding"),
])
def test_bad_options_are_refused_in_one_line(options: dict, said: str) -> None:
    with pytest.raises(dt.DeltatuneError) as err:
        dt.attach(tiny_llama(), "trainable_tokens", **options)
    assert said in str(err.value) and "\n" not in str(err.value)


def test_the_preset_trains_the_label_words_rows() -> None:
    preset = load_config("trainable_tokens")
    method = registry.get(preset.method["name"])
    config = registry.make_config(method, {k: v for k, v in preset.method.items() if k != "name"})
    assert config.token_indices == [3524, 2731]  # " negative", " positive" in SmolLM2's tokenizer
    assert method.peft is not None and method.peft.peft_type == "TRAINABLE_TOKENS"


def test_an_untied_head_targeted_next_to_the_embedding_trains_rows_of_its_own(tmp_path: Path) -> None:
    base = tiny_llama(tied=False)
    config = TrainableTokensConfig(token_indices=TOKENS, target_modules=["embed_tokens", "lm_head"])
    reference = randomised_peft(base, copy.deepcopy(config))
    tuned = dt.attach(copy.deepcopy(base), copy.deepcopy(config))
    assert set(tuned.forms()) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert tuned.num_trainable() == reference.get_nb_trainable_parameters()[0] == 2 * len(TOKENS) * 32
    x = with_tokens(batch())
    peft_round_trip(base, reference, TrainableTokensConfig, "trainable_tokens", x, tmp_path)
