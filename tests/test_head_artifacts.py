"""Artifacts trained with a fresh classification head (the quick demo's: an encoder loaded bare, a head added for
the data) record the head, and every verb that loads the base for them loads it with that head: export (PEFT, with
``modules_to_save`` as PEFT does it for classifiers), merge (base taken from the artifact), eval and generate.
Also: deltatune loads models quietly (no transformers progress bar or load report) and puts the caller's
transformers settings back."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertModel
from transformers.utils import logging as hf_logging

import deltatune as dt
from deltatune import api
from deltatune.core import artifact
from deltatune.data import models

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = {"name": "lora", "r": 4, "alpha": 8, "targets": ["query", "value"], "modules_to_save": ["classifier"]}
LABELS = ["negative", "positive"]


def save_tiny_encoder(folder: Path, data: Path) -> Path:
    """A tiny bare BERT encoder (``BertModel``, as the shipped MiniLM loads) with a word-level tokenizer of the
    sentiment data's words, saved as a from_pretrained folder; the data is written to ``data``."""
    from conftest import write_sentiment_jsonl
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    write_sentiment_jsonl(data)
    words = sorted({w for line in data.read_text().splitlines() for w in json.loads(line)["text"].split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(folder)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=0, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(folder)
    return folder


def run_config(model: Path, data: Path, method: dict, out: Path, steps: int = 4) -> dict:
    return {"model": str(model),
            "data": {"path": str(data), "task": "classification", "max_length": 16, "eval_fraction": 0.25,
                     "labels": LABELS},
            "method": method,
            "train": {"steps": steps, "batch_size": 8, "lr": 2e-2, "warmup": 0, "eval_every": 0, "save_every": 0,
                      "progress": False},
            "output": str(out)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny encoder, its data, and a LoRA (+ the head as modules_to_save) and a full fine-tune trained on it
    through ``dt.train`` with task classification, as the quick demo trains MiniLM."""
    root = tmp_path_factory.mktemp("head-artifacts")
    model = save_tiny_encoder(root / "model", root / "data.jsonl")
    runs = {}
    for name, method in (("lora", LORA), ("full", {"name": "full"})):
        cfg = run_config(model, root / "data.jsonl", method, root / name)
        runs[name] = {"config": cfg, "summary": dt.train(cfg), "path": root / name}
    return {"root": root, "model": model, "data": root / "data.jsonl", "runs": runs}


def ids_of(folder: Path) -> dict[str, torch.Tensor]:
    tok = models.load_tokenizer(str(folder))
    return dict(tok(["what a great day number 3", "what a sad day number 7", "a terrible day"], padding=True,
                    return_tensors="pt"))


def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal up to float32 rounding, with a tolerance that scales with the logits."""
    return bool((a - b).abs().max() <= rel * max(1.0, float(b.abs().max())))


def tuned_of(trained: dict, name: str) -> dt.Tuned:
    """The artifact loaded onto its base as the verbs load it (the head it records)."""
    path = trained["runs"][name]["path"]
    return dt.load(models.load_base(str(trained["model"]), dt.inspect(path)["base"]["head"]), path)


def test_the_artifact_records_the_head_it_was_trained_with(trained: dict) -> None:
    head = dt.inspect(trained["runs"]["lora"]["path"])["base"]["head"]
    assert head["class"] == "BertForSequenceClassification" and head["task"] == "classification"
    assert head["num_labels"] == len(LABELS) and len(head["id2label"]) == len(LABELS)
    # the base by its name alone is the bare encoder: the head is what the record adds
    assert type(models.load(str(trained["model"]))).__name__ == "BertModel"
    assert type(tuned_of(trained, "lora").model).__name__ == "BertForSequenceClassification"


def test_export_loads_in_peft_with_the_classifier_as_a_module_to_save(trained: dict, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    run = trained["runs"]["lora"]
    out = api.export(run["path"], tmp_path / "peft")  # the base from the artifact, with its head
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    inputs = ids_of(trained["model"])
    ours = logits(tuned_of(trained, "lora"), inputs)
    base = AutoModelForSequenceClassification.from_pretrained(trained["model"], num_labels=len(LABELS)).eval()
    before = logits(base, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        theirs = logits(peft.PeftModel.from_pretrained(base, str(out)).eval(), inputs)
    assert not close(ours, before, 1e-3), "the trained delta must move the logits for the comparison to mean anything"
    assert close(ours, theirs), (ours - theirs).abs().max()


@pytest.mark.parametrize("name", ["lora", "full"])
def test_merge_takes_base_and_head_from_the_artifact(trained: dict, tmp_path: Path, name: str) -> None:
    out = api.merge(trained["runs"][name]["path"], out=tmp_path / "merged")  # no base=: the artifact's
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    inputs = ids_of(trained["model"])
    assert close(logits(merged, inputs), logits(tuned_of(trained, name), inputs))
    # the merged folder is a classifier on its own: loaded by deltatune with its head and its tokenizer
    again = models.load(str(out))
    assert type(again).__name__ == "BertForSequenceClassification" and again.config.num_labels == len(LABELS)
    assert close(logits(again, inputs), logits(merged, inputs), 0.0)


@pytest.mark.parametrize("name", ["lora", "full"])
def test_eval_gives_the_training_runs_final_metrics(trained: dict, name: str) -> None:
    run = trained["runs"][name]
    metrics = api.eval(run["path"], run["config"]["data"])
    final = run["summary"]["final"]
    assert metrics["accuracy"] == final["eval_accuracy"]
    assert metrics["loss"] == pytest.approx(final["eval_loss"], rel=1e-5)


def test_eval_refuses_data_that_does_not_fit_the_head(trained: dict, tmp_path: Path) -> None:
    three = tmp_path / "three.jsonl"
    three.write_text("".join(json.dumps({"text": f"what a {w} day, number {i}", "label": w}) + "\n"
                             for i in range(8) for w in ("great", "sad", "happy")))
    with pytest.raises(dt.DeltatuneError, match="2-label classification head.*3 labels"):
        api.eval(trained["runs"]["lora"]["path"], {"path": str(three), "task": "classification"})


def test_generate_on_a_classifier_returns_the_predicted_label(trained: dict) -> None:
    tuned = tuned_of(trained, "lora")
    text = "what a great day number 3"
    tok = models.load_tokenizer(str(trained["model"]))
    expected = tuned.config.id2label[int(logits(tuned, dict(tok(text, return_tensors="pt"))).argmax())]
    assert api.generate(trained["runs"]["lora"]["path"], text, stream=False) == expected


def test_the_head_record_names_the_labels(trained: dict) -> None:
    head = dt.inspect(trained["runs"]["lora"]["path"])["base"]["head"]
    assert head["id2label"] == {"0": "negative", "1": "positive"}


def test_generate_refuses_an_encoder_without_a_head(trained: dict) -> None:
    with pytest.raises(dt.DeltatuneError, match="BertModel.*no language-model head"):
        api.generate(None, "what a day", base=str(trained["model"]), stream=False)


def test_an_artifact_without_the_record_loads_as_before(tmp_path: Path) -> None:
    """Artifacts saved before the record: the base loads with its natural class (here a causal LM), as before."""
    from conftest import random_lora, tiny_llama

    folder = tmp_path / "llama"
    tiny_llama().save_pretrained(folder)
    model = models.load(str(folder))
    tuned = random_lora(lambda: model)
    tuned.save(tmp_path / "art")
    meta_path = tmp_path / "art" / artifact.META_FILE
    meta = json.loads(meta_path.read_text())
    assert meta["fingerprint"].pop("head")["task"] == "causal_lm"
    meta_path.write_text(json.dumps(meta))
    assert dt.inspect(tmp_path / "art")["base"]["head"] is None
    out = api.merge(tmp_path / "art", out=tmp_path / "merged")
    inputs = {"input_ids": torch.tensor([[1, 5, 9, 2]])}
    expected = logits(tuned, inputs)
    assert close(logits(models.load(str(out)), inputs), expected)


def test_head_request_reads_the_record() -> None:
    assert models.head_request(None) == {}
    assert models.head_request({"class": "BertForMaskedLM", "task": None}) == {}  # not a head deltatune loads
    assert models.head_request({"class": "LlamaForCausalLM", "task": "causal_lm"}) == {"task": "causal_lm"}
    record = {"class": "BertForSequenceClassification", "task": "classification", "num_labels": 2,
              "id2label": {"0": "negative", "1": "positive"}}
    assert models.head_request(record) == {"task": "classification", "id2label": {0: "negative", 1: "positive"},
                                           "label2id": {"negative": 0, "positive": 1}}
    assert models.head_request({**record, "id2label": {}}) == {"task": "classification", "num_labels": 2}


# -- quiet loading ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bar", [True, False])
def test_loading_is_quiet_and_restores_the_callers_transformers_settings(
        trained: dict, capfd: pytest.CaptureFixture[str], bar: bool) -> None:
    verbosity, enabled = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    try:
        hf_logging.set_verbosity_info()
        (hf_logging.enable_progress_bar if bar else hf_logging.disable_progress_bar)()
        models.load(str(trained["model"]), task="classification", num_labels=2)  # a fresh head: a load report
        models.load_tokenizer(str(trained["model"]))
        err = capfd.readouterr().err
        assert "Loading weights" not in err and "LOAD REPORT" not in err and "newly initialized" not in err, err
        assert hf_logging.get_verbosity() == hf_logging.INFO and hf_logging.is_progress_bar_enabled() is bar
    finally:
        hf_logging.set_verbosity(verbosity)
        (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()


def test_weights_missing_from_a_folder_are_still_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Quiet is not silent: a base weight the folder lacks (a damaged folder) is a warning of deltatune's own."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32)
    BertModel(cfg).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    gone = next(k for k in weights if "query.weight" in k)
    save_file({k: v for k, v in weights.items() if k != gone}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="deltatune.data.models"):
        models.load(str(tmp_path), task="classification", num_labels=2)
    assert "1 weight(s) of BertForSequenceClassification are not in" in caplog.text and "query.weight" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deltatune.data.models"):
        models.load(str(trained_folder_ok(tmp_path)), task="classification", num_labels=2)
    assert caplog.text == ""  # only the fresh head is missing: nothing to say


def trained_folder_ok(tmp_path: Path) -> Path:
    folder = tmp_path / "ok"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(folder)
    return folder


def test_eval_without_data_takes_the_data_section_of_the_run_that_trained_it(trained: dict, tmp_path: Path) -> None:
    """`deltatune eval runs/x` (and `compress --calibrate`) after `deltatune train`: the run's own data section,
    read from its newest checkpoint, so the held-out split is the one the run reported."""
    from typer.testing import CliRunner

    from deltatune.cli.main import app

    run = trained["runs"]["lora"]
    result = CliRunner().invoke(app, ["eval", str(run["path"]), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accuracy"] == run["summary"]["final"]["eval_accuracy"]
    bare = tmp_path / "bare"  # the artifact alone, without the run's checkpoints
    bare.mkdir()
    for file in ("deltatune.json", "delta.safetensors"):
        (bare / file).write_bytes((run["path"] / file).read_bytes())
    result = CliRunner().invoke(app, ["eval", str(bare)])
    assert result.exit_code != 0 and "--data" in result.output and "keeps no checkpoint" in result.output
