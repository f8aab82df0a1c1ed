"""A practitioner's first day: a resume that names what changed in the config (and ``--force``), PEFT's habits on
a Tuned (save_pretrained, from_pretrained, print_trainable_parameters, no base model saved in the delta's place),
and artifacts that find their base model from any working directory."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import batch, output_of, save_word_llama, tiny_llama, word_run_config
from typer.testing import CliRunner

import deltatune as dt
from deltatune.cli.main import app
from deltatune.core import artifact
from deltatune.core.tuned import Tuned
from deltatune.errors import DeltatuneError

LORA = {"name": "lora", "r": 2, "alpha": 4}


def run_cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


# -- resume under a changed config ----------------------------------------------------------------------------------
@pytest.fixture
def finished_run(word_run, tmp_path) -> dict:
    """A 4-step LoRA run with checkpoints at steps 2 and 4; returns its config."""
    cfg = word_run_config(word_run, LORA, tmp_path / "run", steps=4)
    dt.train(cfg)
    return cfg


def changed(cfg: dict, **train: object) -> dict:
    return {**cfg, "method": {**LORA, "alpha": 8}, "train": {**cfg["train"], "steps": 6, **train}}


def test_resume_refusal_names_the_keys_that_differ(finished_run) -> None:
    with pytest.raises(DeltatuneError) as refused:
        dt.train(changed(finished_run, lr=0.02), resume=True)
    message = str(refused.value)
    assert "method.alpha: 4 -> 8" in message
    assert "train.lr: 0.01 -> 0.02" in message
    assert "--force" in message and "\n" not in message


def test_resume_with_only_more_steps_is_not_a_difference(finished_run) -> None:
    summary = dt.train({**finished_run, "train": {**finished_run["train"], "steps": 6}}, resume=True)
    assert summary["resumed_from"] == 4


def test_force_resumes_a_changed_config_with_a_warning(finished_run) -> None:
    with pytest.warns(UserWarning, match=re.escape("train.lr: 0.01 -> 0.02")):
        summary = dt.train(changed(finished_run, lr=0.02), resume=True, force=True)
    assert summary["resumed_from"] == 4
    assert len(summary["history"]) == 6


def test_force_without_resume_is_refused(finished_run) -> None:
    with pytest.raises(DeltatuneError, match="only accepts a changed config on resume"):
        dt.train(finished_run, force=True)


def test_force_cannot_fit_a_delta_of_another_shape(finished_run) -> None:
    other_rank = {**finished_run, "method": {**LORA, "r": 4}}
    with pytest.warns(UserWarning, match="method.r: 2 -> 4"), pytest.raises(DeltatuneError, match="does not fit"):
        dt.train(other_rank, resume=True, force=True)


def test_cli_train_force_resumes(finished_run, tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(changed(finished_run, lr=0.02)))
    refused = run_cli("train", config, "--resume")
    assert refused.exit_code == 2 and "train.lr: 0.01 -> 0.02" in refused.stderr
    forced = run_cli("train", config, "--resume", "--force")
    assert forced.exit_code == 0, forced.output
    state = json.loads((Path(finished_run["output"]) / "deltatune.json").read_text())
    assert state["method"] == "lora"


# -- PEFT's habits on a Tuned -----------------------------------------------------------------------------------------
def lora_on_tiny_llama() -> Tuned:
    return dt.attach(tiny_llama(), "lora", r=4, init=False)


def test_save_pretrained_writes_the_delta_and_from_pretrained_reads_it(tmp_path) -> None:
    tuned = lora_on_tiny_llama()
    tuned.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["delta.safetensors", "deltatune.json"]
    again = Tuned.from_pretrained(tiny_llama(), tmp_path / "adapter")
    inputs = batch()
    assert torch.equal(output_of(again, inputs), output_of(tuned, inputs))


def test_save_pretrained_takes_peft_keywords_and_refuses_others(tmp_path) -> None:
    tuned = lora_on_tiny_llama()
    tuned.save_pretrained(tmp_path / "a", safe_serialization=True, selected_adapters=["default"],
                          save_embedding_layers="auto")
    assert (tmp_path / "a" / "delta.safetensors").is_file()
    tuned.save_pretrained(tmp_path / "other_rank", is_main_process=False)
    assert not (tmp_path / "other_rank").exists()
    with pytest.raises(DeltatuneError, match="unknown option.*max_shard_size"):
        tuned.save_pretrained(tmp_path / "b", max_shard_size="1GB")
    with pytest.raises(DeltatuneError, match="safetensors only"):
        tuned.save_pretrained(tmp_path / "b", safe_serialization=False)
    with pytest.raises(DeltatuneError, match="tuned.use"):
        tuned.save_pretrained(tmp_path / "b", selected_adapters=["other"])


@pytest.mark.parametrize("name", ["push_to_hub", "save_checkpoint"])
def test_the_base_models_writers_do_not_fall_through(name: str) -> None:
    tuned = lora_on_tiny_llama()
    with pytest.raises(DeltatuneError, match=r"without the delta.*merge\(\)"):
        getattr(tuned, name)
    assert not hasattr(tuned, name)


def test_reading_attributes_still_falls_through() -> None:
    tuned = lora_on_tiny_llama()
    assert tuned.config is tuned.model.config
    assert callable(tuned.generate) and callable(tuned.get_input_embeddings)


def test_print_trainable_parameters_matches_peft(capsys) -> None:
    from peft import LoraConfig, get_peft_model

    tuned = dt.attach(tiny_llama(), "lora", r=4, targets=["q_proj", "v_proj"])
    tuned.print_trainable_parameters()
    ours = capsys.readouterr().out
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.print_trainable_parameters()
    assert ours == capsys.readouterr().out
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}\n", ours)


# -- the base model's path ------------------------------------------------------------------------------------------
def test_an_artifact_from_a_relative_folder_finds_its_base_from_elsewhere(tmp_path, monkeypatch) -> None:
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    save_word_llama(project / "models" / "word")
    elsewhere.mkdir()
    monkeypatch.chdir(project)
    dt.attach(dt.models.load("models/word"), "lora", r=2).save("adapter")
    recorded = artifact.read_meta("adapter")["fingerprint"]["name_or_path"]
    assert recorded == str(project / "models" / "word")
    monkeypatch.chdir(elsewhere)
    exported = run_cli("export", project / "adapter", "--out", "peft")
    assert exported.exit_code == 0, exported.output
    assert (elsewhere / "peft" / "adapter_config.json").is_file()


def test_shipped_names_are_recorded_as_they_are() -> None:
    model = tiny_llama()
    model.config._name_or_path = "smollm2-135m"
    assert dt.attach(model, "lora", r=2).fingerprint()["name_or_path"] == "smollm2-135m"
