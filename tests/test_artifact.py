"""Artifacts: what is on disk, atomic saves, corrupted files, the wrong base model, no pickle."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import batch, loss_of, output_of, tiny_llama

import deltatune as dt
from deltatune.core import artifact


def trained_lora(seed: int = 0):
    tuned = dt.attach(tiny_llama(), "lora", r=4, alpha=8)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in tuned.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return tuned


def test_artifact_layout(tmp_path) -> None:
    tuned = trained_lora()
    tuned.save(tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == ["delta.safetensors", "deltatune.json"]
    meta = json.loads((tmp_path / "a" / "deltatune.json").read_text())
    assert meta["method"] == "lora" and meta["config"]["r"] == 4 and meta["deltatune_version"] == dt.__version__
    fp = meta["fingerprint"]
    assert fp["architecture"] == "LlamaForCausalLM" and len(fp["tensors"]) == 6
    assert meta["sizes"]["trainable"] == tuned.num_trainable()
    info = dt.inspect(tmp_path / "a")
    assert info["stored_values"] == tuned.num_trainable() and info["stored_bytes"] == 4 * tuned.num_trainable()


def test_full_stores_only_changed_tensors(tmp_path) -> None:
    tuned = dt.attach(tiny_llama(), "full")
    x = batch()
    # a gradient reaches every tensor, but only one of them is then changed
    loss_of(tuned, x).backward()
    with torch.no_grad():
        tuned.forms()["model.layers.1.mlp.up_proj.weight"].weight.add_(0.5)
    tuned.save(tmp_path / "f")
    info = dt.inspect(tmp_path / "f")
    assert info["stored_tensors"] == 1 and info["stored_values"] == 64 * 32
    loaded = dt.load(tiny_llama(), tmp_path / "f")
    assert torch.equal(output_of(loaded, x), output_of(tuned, x))


def test_interrupted_save_keeps_previous_artifact(tmp_path, monkeypatch) -> None:
    first = trained_lora(seed=0)
    first.save(tmp_path / "a")
    before = (tmp_path / "a" / "delta.safetensors").read_bytes()
    real_rename = os.rename

    def crash(src, dst):
        if ".tmp-" in str(src):
            raise KeyboardInterrupt("killed mid-save")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(KeyboardInterrupt):
        trained_lora(seed=1).save(tmp_path / "a")
    monkeypatch.setattr(os, "rename", real_rename)
    assert (tmp_path / "a" / "delta.safetensors").read_bytes() == before
    assert os.listdir(tmp_path) == ["a"], "no temporary folder is left behind"
    dt.load(tiny_llama(), tmp_path / "a")


def test_truncated_and_corrupted_files_raise_clear_errors(tmp_path) -> None:
    trained_lora().save(tmp_path / "a")
    f = tmp_path / "a" / "delta.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(dt.DeltatuneError, match="truncated or corrupted"):
        dt.load(tiny_llama(), tmp_path / "a")
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(dt.DeltatuneError, match="corrupted"):
        dt.load(tiny_llama(), tmp_path / "a")
    (tmp_path / "a" / "deltatune.json").write_text("{not json")
    with pytest.raises(dt.DeltatuneError, match="not valid JSON"):
        dt.load(tiny_llama(), tmp_path / "a")
    with pytest.raises(dt.DeltatuneError, match="not a deltatune artifact"):
        dt.load(tiny_llama(), tmp_path / "missing")


def test_another_base_model_is_refused_naming_the_tensors(tmp_path) -> None:
    trained_lora().save(tmp_path / "a")
    other = tiny_llama(seed=7)
    with pytest.raises(dt.DeltatuneError) as err:
        dt.load(other, tmp_path / "a")
    assert "model.layers.0.self_attn.q_proj.weight" in str(err.value) and "another base model" in str(err.value)
    bigger = tiny_llama()
    bigger.resize_token_embeddings(200)
    with pytest.raises(dt.DeltatuneError, match="names or shapes differ"):
        dt.load(bigger, tmp_path / "a")


@pytest.mark.parametrize("carried", ["lora", "lt-sft"])  # a forward hook, and a parametrisation that renames W
def test_a_refused_artifact_leaves_the_delta_the_model_carries_attached(tmp_path, carried) -> None:
    trained_lora().save(tmp_path / "a")
    model = tiny_llama(seed=7)
    tuned = dt.attach(model, carried)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in tuned.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = batch()
    before = output_of(tuned, x)
    trainable = [n for n, p in tuned.named_parameters() if p.requires_grad]
    with pytest.raises(dt.DeltatuneError, match="another base model"):
        dt.load(model, tmp_path / "a")
    assert tuned.attached and torch.equal(output_of(tuned, x), before), "the carried delta still acts"
    assert [n for n, p in tuned.named_parameters() if p.requires_grad] == trainable, "and still trains"
    dt.attach(tiny_llama(seed=7), "lora").save(tmp_path / "b")
    with pytest.warns(UserWarning, match="detaching it first"):
        other = dt.load(model, tmp_path / "b")  # an artifact of this base replaces it, as before
    assert other.attached and not tuned.attached
    other.detach()
    assert torch.equal(output_of(model, x), output_of(tiny_llama(seed=7), x)), "nothing is left on the base"


def test_nothing_is_read_with_pickle(tmp_path, monkeypatch) -> None:
    import pickle

    trained_lora().save(tmp_path / "a")

    def no_pickle(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    dt.load(tiny_llama(), tmp_path / "a")


def test_fingerprint_is_stable_and_content_sensitive() -> None:
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert artifact.tensor_hash(t) == artifact.tensor_hash(t.clone())
    assert artifact.tensor_hash(t) != artifact.tensor_hash(t + 1e-6 * (t == 5))
    assert artifact.tensor_hash(t) != artifact.tensor_hash(t.reshape(3, 2))


def test_save_killed_between_renames_is_recovered(tmp_path) -> None:
    trained_lora().save(tmp_path / "a")
    before = (tmp_path / "a" / "delta.safetensors").read_bytes()
    os.rename(tmp_path / "a", tmp_path / ".a.previous")  # what a SIGKILL between the two renames leaves
    loaded = dt.load(tiny_llama(), tmp_path / "a")
    assert (tmp_path / "a" / "delta.safetensors").read_bytes() == before and loaded.num_trainable() > 0


def test_saving_over_an_artifact_keeps_its_sub_folders(tmp_path) -> None:
    """A training run's output folder holds the artifact and checkpoints/: re-saving keeps them."""
    trained_lora(seed=0).save(tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "step-1").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-1" / "x").write_text("kept")
    trained_lora(seed=1).save(tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "step-1" / "x").read_text() == "kept"
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoints", "delta.safetensors", "deltatune.json"]


def test_killed_while_carrying_sub_folders_is_recovered(tmp_path) -> None:
    trained_lora().save(tmp_path / "run")
    # what a SIGKILL after moving checkpoints/ into the temporary folder leaves behind
    tmp = tmp_path / ".run.tmp-dead"
    (tmp / "checkpoints").mkdir(parents=True)
    (tmp / ".carried").write_text("checkpoints")
    dt.load(tiny_llama(), tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints").is_dir() and not tmp.exists()
