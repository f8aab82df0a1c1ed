"""A fresh classification head trains with every method (``deltatune.core.fresh_head``).

An encoder loaded for classification (or a causal LM with ``data.head: true``) gets a head initialised at random.
PEFT trains it for ``task_type="SEQ_CLS"`` whatever the adapter; deltatune does the same for every registered
method: the head trains fully next to the method's delta unless the method already changes it (full fine-tuning,
LISA, HFT, LT-SFT's head, DSEE's ``modules_to_save: auto``, P-tuning v2's head, MeZO on the whole model, a user's
``modules_to_save``) or reads its logits from a head of its own (VQT). The artifact records what trained, and the
verbs rebuild exactly that.

Each case trains the tiny encoder of ``test_head_artifacts`` for ``STEPS`` steps with ``dt.train`` and checks: the
head's weights moved, every head tensor is changed by exactly one form, the artifact loaded onto a fresh base as
``deltatune eval`` loads it gives the trained model's logits, and the trainable count includes the head.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import train_then_resume
from test_head_artifacts import LABELS, close, ids_of, logits, save_tiny_encoder

import deltatune as dt
from deltatune.core import fresh_head, registry
from deltatune.core.forms.base import WeightDelta
from deltatune.data import models
from deltatune.data.tasks import DataConfig, load_for_task
from deltatune.train import loop

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add waits

STEPS = 3
HEAD = ("classifier.weight", "classifier.bias")

# methods that cannot train on this model, with the reason (asserted in test_a_skipped_method_cannot_train_here)
SKIPPED = {"compeft": "made by `deltatune compress` from a saved artifact, never trained",
           "q_adapter": "ViT / AST encoders only, and this model is a text encoder; its fresh head trains on a tiny "
                        "ViT in tests/test_vision_audio.py"}

# (method, options, what happens to the fresh head). Options fit the tiny encoder (2 blocks of width 32, 64
# positions) and make each policy act within STEPS steps. The head is
#   "added":   trained fully next to the method's delta, recorded in the artifact (fresh_head);
#   "partial": the method trains part of it itself (BitFit: the bias), the rest is added;
#   "own":     the method's own forms train it (nothing added, nothing recorded);
#   "unused":  the method's logits come from a head of its own; the model's head stays as it is.
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("adalora", {"init_r": 2, "target_r": 1, "delta_t": 1}, "added"),
    ("adapter", {"r": 4}, "added"),
    ("autopeft", {"serial": 4, "parallel": 2, "prefix": 2, "mid_dim": 8, "leave_out": [0]}, "added"),
    ("bitfit", {}, "partial"),
    ("connected", {"r": 4, "adapter_r": 4}, "added"),
    ("corda", {"r": 2, "alpha": 4, "data": "random", "samples": 4}, "added"),
    ("dora", {"r": 2, "alpha": 4}, "added"),
    ("dsee", {"r": 2, "alpha": 4, "num_sparse": 8, "outer_iters": 3}, "own"),  # modules_to_save: auto
    ("dsee", {"r": 2, "alpha": 4, "num_sparse": 8, "outer_iters": 3, "modules_to_save": None,
              "prune_ratio": 0.5, "prune_at": 0.5}, "added"),  # stage 2 (pruning, fresh moments) with the head
    ("full", {}, "own"),
    ("full", {"layers": "1:"}, "added"),  # the last block only: the head is not one of its tensors
    ("hft", {"rounds": 2}, "own"),
    ("ia3", {}, "added"),
    ("id3", {"budget": 60}, "added"),
    ("increlora", {"init_r": 2, "init_warmup": 0, "incre_interval": 1}, "added"),
    ("ist", {"base_options": {"r": 2, "alpha": 4}, "update_fraction": 0.5, "score_interval": 2}, "added"),
    ("kasa", {"r": 2, "alpha": 4}, "added"),
    ("lift", {"lora_rank": 1, "approx_rank": 1, "update_interval": 2}, "added"),
    ("lightweight", {"parts": ["embeddings"]}, "added"),  # its "head" part is an output embedding: a classifier has none
    ("lisa", {"activated_layers": 1, "interval_steps": 1}, "own"),
    ("loha", {"r": 2, "alpha": 4}, "added"),
    ("lokr", {"r": 2, "alpha": 4}, "added"),
    ("locft", {"search_layers": [0, 1]}, "added"),
    ("lora", {"r": 2, "alpha": 4}, "added"),
    ("lt-sft", {"density": 0.05}, "own"),  # its head option: by default what lies outside the base model
    ("lt-sft", {"density": 0.05, "head": []}, "added"),  # no head of its own: the fresh head is added
    ("mam", {"prefix_length": 4, "r": 4}, "added"),
    ("mezo", {"eps": 1e-2}, "own"),  # every tensor of the model, the head among them
    ("mezo", {"base": "lora", "base_options": {"r": 2, "alpha": 4}, "eps": 1e-2}, "added"),  # head by SPSA too
    ("parallel_adapter", {"r": 4}, "added"),
    ("polyhistor", {"r": 4, "k": 2, "embedding": 8}, "added"),  # one task; a head per task: tests/test_polyhistor.py
    ("prefix", {"length": 4}, "added"),
    ("prompt", {"length": 4}, "added"),
    ("ptuning_v2", {"length": 4}, "own"),  # train_head: true
    ("ptuning_v2", {"length": 4, "train_head": False}, "added"),
    ("scaled_parallel_adapter", {"r": 4}, "added"),
    ("sparse_mezo", {"eps": 1e-2}, "own"),
    ("sparse_mezo", {"base": "lora", "base_options": {"r": 2, "alpha": 4}, "eps": 1e-2}, "added"),
    ("spiel", {"k": 200, "reselection_steps": 2, "selection_accumulation_steps": 1}, "added"),
    ("spt", {"sensitivity": "random", "budget": 2000, "r": 2}, "added"),
    ("vera", {"r": 8}, "added"),
    ("trainable_tokens", {"token_indices": [1, 2, 3]}, "added"),
    ("vqt", {}, "unused"),
]
OPTIONS = {name: options for name, options, _ in reversed(CASES)}  # each method's first row: its options here
HEAD_LOG = "deltatune.core.fresh_head"


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fresh-head")
    model = save_tiny_encoder(root / "model", root / "data.jsonl")
    data = {"path": str(root / "data.jsonl"), "task": "classification", "max_length": 16, "eval_fraction": 0.25,
            "labels": LABELS}
    return {"model": model, "data": data, "inputs": ids_of(model)}


def run_config(encoder: dict[str, Any], method: dict[str, Any], out: Path, steps: int = STEPS) -> dict[str, Any]:
    return {"model": str(encoder["model"]), "data": dict(encoder["data"]), "method": method, "output": str(out),
            "train": {"steps": steps, "batch_size": 8, "lr": 2e-2, "warmup": 0, "eval_every": 0, "save_every": 0,
                      "progress": False}}


def fresh_base(encoder: dict[str, Any]) -> torch.nn.Module:
    """The base as ``deltatune eval`` loads it for the artifact: the encoder with a fresh head sized to the data."""
    return load_for_task(DataConfig(**encoder["data"]), str(encoder["model"])).model


def train(cfg: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], dt.Tuned]:
    """``dt.train(cfg)``, and the tuned model the run trained (still attached, as the run left it)."""
    runs: list[loop.Run] = []
    build = loop.build

    def keep(config: Any) -> loop.Run:
        runs.append(build(config))
        return runs[-1]

    monkeypatch.setattr(loop, "build", keep)
    summary = dt.train(cfg)
    return summary, runs[-1].tuned


def forms_on(tuned: dt.Tuned, param: str) -> list[str]:
    """The names of the weight-side forms that change the model's tensor ``param``."""
    owner, _, attr = param.rpartition(".")
    module = tuned.model.get_submodule(owner)
    return [n for n, f in tuned.forms().items() if isinstance(f, WeightDelta) and (module, attr) in f.sites]


def head_values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The head's weights as the model computes with them (W0 + Δ where a dense delta is attached)."""
    return {n: getattr(model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]).detach().clone() for n in HEAD}


def check_trained_and_restored(encoder: dict[str, Any], out: Path, summary: dict[str, Any], trained: dt.Tuned,
                               expected: str) -> dt.Tuned:
    """The assertions every case shares; returns the artifact loaded onto a fresh base."""
    inputs = encoder["inputs"]
    base = fresh_base(encoder)
    untrained_head, untrained = head_values(base), logits(base, inputs)
    recorded = dt.inspect(out)["fresh_head"]
    loaded = dt.load(base, out).eval()  # as `deltatune eval` loads it: the run's data sizes the fresh head

    # the artifact gives the trained model's logits (and training moved them)
    trained.eval()  # both without dropout (DoRA's default is 0.05)
    ours = logits(trained, inputs)
    assert close(logits(loaded, inputs), ours), (logits(loaded, inputs) - ours).abs().max()
    assert not close(ours, untrained, 1e-4), "training must move the logits for the comparison to mean anything"

    now = head_values(loaded.model)
    if expected == "unused":  # a head of the method's own: the model's stays as loaded, untouched by any form
        assert recorded == [] and all(forms_on(loaded, n) == [] for n in HEAD)
        assert all(torch.equal(now[n], untrained_head[n]) for n in HEAD)
        return loaded
    # every head tensor trained, by exactly one form: never two forms on one tensor
    for name in HEAD:
        assert len(forms_on(loaded, name)) == 1, (name, forms_on(loaded, name))
        assert len(forms_on(trained, name)) == 1, (name, forms_on(trained, name))
        assert not torch.equal(now[name], untrained_head[name]), f"{name} is still at its random initialisation"
    added = {"added": list(HEAD), "partial": ["classifier.weight"], "own": []}[expected]
    assert recorded == added
    # the trainable count includes what was added for the head
    assert summary["trainable"] == trained.num_trainable()
    for name in added:
        assert forms_on(trained, name) == [name] and trained.forms()[name].num_trainable() == \
            trained.model.get_parameter(name).numel()
    return loaded


# -- every registered method ---------------------------------------------------------------------------------------
def test_every_registered_method_has_a_case_or_a_reason() -> None:
    assert {name for name, _, _ in CASES} | set(SKIPPED) == set(registry.names())
    assert not set(SKIPPED) & {name for name, _, _ in CASES}


@pytest.mark.parametrize(("method", "options", "expected"), CASES,
                         ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(CASES)])
def test_the_fresh_head_trains_and_the_artifact_restores_it(method: str, options: dict[str, Any], expected: str,
                                                            encoder: dict[str, Any], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    summary, trained = train(run_config(encoder, {"name": method, **options}, out), monkeypatch)
    assert summary["steps"] == STEPS
    check_trained_and_restored(encoder, out, summary, trained, expected)


def test_a_skipped_method_cannot_train_here(encoder: dict[str, Any]) -> None:
    method = registry.get("compeft")
    assert method.traits.made_by == "compress" and "never trained" in SKIPPED["compeft"]
    with pytest.raises(dt.DeltatuneError, match="compeft is not trained"):
        dt.attach(fresh_base(encoder), "compeft")


SAVERS = sorted(name for name in registry.names()
                if "modules_to_save" in {f.name for f in dataclasses.fields(registry.get(name).config_cls)})


def test_the_methods_with_modules_to_save_are_those_expected() -> None:
    assert set(SAVERS) == {"adapter", "autopeft", "connected", "corda", "dora", "dsee", "ia3", "kasa", "loha", "lokr",
                           "lora", "mam", "parallel_adapter", "polyhistor", "prefix", "prompt", "ptuning_v2", "scaled_parallel_adapter",
                           "spt", "vera"}


@pytest.mark.parametrize("method", SAVERS)
def test_a_users_modules_to_save_trains_the_head_with_no_second_form(method: str, encoder: dict[str, Any],
                                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    options = {**OPTIONS[method], "modules_to_save": ["classifier"]}
    with caplog.at_level(logging.INFO, logger=HEAD_LOG):
        summary, trained = train(run_config(encoder, {"name": method, **options}, out), monkeypatch)
    assert not [r for r in caplog.records if r.name == HEAD_LOG], "the user's modules_to_save trains the head"
    loaded = check_trained_and_restored(encoder, out, summary, trained, "own")
    assert dt.inspect(out)["config"]["modules_to_save"] == ["classifier"]
    assert [forms_on(loaded, n) for n in HEAD] == [[n] for n in HEAD]  # the user's forms, by their own names


# -- what is said, recorded and restored -------------------------------------------------------------------------------
def test_the_log_says_once_that_the_head_trains_fully(encoder: dict[str, Any], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=HEAD_LOG):
        train(run_config(encoder, {"name": "bitfit"}, tmp_path / "bitfit"), monkeypatch)
        said = [r for r in caplog.records if r.name == HEAD_LOG]
        assert len(said) == 1 and said[0].levelno == logging.INFO
        assert "the fresh classifier head (64 parameters; bitfit trains classifier.bias itself) trains fully with " \
               "bitfit" in said[0].getMessage()
        caplog.clear()
        train(run_config(encoder, {"name": "spiel", **OPTIONS["spiel"]}, tmp_path / "spiel"), monkeypatch)
        said = [r.getMessage() for r in caplog.records if r.name == HEAD_LOG]
        assert len(said) == 1 and "the fresh classifier head (66 parameters) trains fully with spiel" in said[0]
        caplog.clear()
        train(run_config(encoder, {"name": "full"}, tmp_path / "full"), monkeypatch)  # its own head: nothing to say
        assert not [r for r in caplog.records if r.name == HEAD_LOG]


def test_eval_and_merge_restore_the_head(encoder: dict[str, Any], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from deltatune import api

    cfg = run_config(encoder, {"name": "spiel", **OPTIONS["spiel"]}, tmp_path / "run")
    summary, trained = train(cfg, monkeypatch)
    metrics = api.eval(tmp_path / "run", cfg["data"])  # the verb loads the base with the recorded head
    assert metrics["accuracy"] == summary["final"]["eval_accuracy"]
    assert metrics["loss"] == pytest.approx(summary["final"]["eval_loss"], rel=1e-5)
    merged = models.load(str(api.merge(tmp_path / "run", out=tmp_path / "merged")))
    assert type(merged).__name__ == "BertForSequenceClassification"
    assert close(logits(merged, encoder["inputs"]), logits(trained, encoder["inputs"]))


def test_export_to_peft_saves_the_head_as_a_module_to_save(encoder: dict[str, Any], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from deltatune import api

    train(run_config(encoder, {"name": "lora", **OPTIONS["lora"]}, tmp_path / "run"), monkeypatch)
    out = api.export(tmp_path / "run", tmp_path / "peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]


def test_a_resumed_run_with_a_fresh_head_ends_bit_identical(encoder: dict[str, Any], tmp_path: Path) -> None:
    """IncreLoRA grows its delta during the run; the head's forms come first, so the grown tensors still join the
    parameter order at its end, where the optimizer and the checkpoints expect them."""
    cfg = run_config(encoder, {"name": "increlora", **OPTIONS["increlora"]}, tmp_path / "run", steps=6)
    cfg["train"].update(save_every=2, keep_last=4)
    train_then_resume(cfg, keep=1)
    assert dt.inspect(tmp_path / "run")["fresh_head"] == list(HEAD)


def test_the_decision_is_read_from_the_artifact_not_the_model(encoder: dict[str, Any], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading builds what the artifact records, whatever the model's mark says; an artifact without the record
    (from before it existed) loads without head forms, as it was saved."""
    import json

    train(run_config(encoder, {"name": "lora", **OPTIONS["lora"]}, tmp_path / "run"), monkeypatch)
    unmarked = fresh_base(encoder)
    fresh_head.mark(unmarked, [])  # a base loaded any other way: the artifact's record still decides
    assert [n for n in dt.load(unmarked, tmp_path / "run").forms() if n.startswith("classifier")] == list(HEAD)
    base = fresh_base(encoder)
    tuned = dt.attach(base, "lora", **OPTIONS["lora"])
    tuned.save(tmp_path / "untrained")  # nothing trained: the head's delta is zero and not stored
    meta_path = tmp_path / "untrained" / "deltatune.json"
    meta = json.loads(meta_path.read_text())
    assert meta["fresh_head"] == list(HEAD)
    del meta["fresh_head"]  # as an artifact saved before the record: neither the record nor the head's tensors
    meta["fingerprint"]["tensors"] = {k: v for k, v in meta["fingerprint"]["tensors"].items()
                                      if not k.startswith("classifier")}
    meta_path.write_text(json.dumps(meta))
    loaded = dt.load(fresh_base(encoder), tmp_path / "untrained")
    assert not [n for n in loaded.forms() if n.startswith("classifier")]


def test_only_a_head_the_loader_made_fresh_trains(encoder: dict[str, Any], tmp_path: Path) -> None:
    """A classifier whose head is in its checkpoint (a merged classifier, a model built in Python) is left to the
    method: its head is trained already, or the user chose what trains."""
    base = fresh_base(encoder)
    base.save_pretrained(tmp_path / "classifier")  # the head is now in the checkpoint
    models.load_tokenizer(str(encoder["model"])).save_pretrained(tmp_path / "classifier")
    loaded = models.load(str(tmp_path / "classifier"))
    assert type(loaded).__name__ == "BertForSequenceClassification"
    assert not [n for n in dt.attach(loaded, "lora", **OPTIONS["lora"]).forms() if n.startswith("classifier")]
    from transformers import BertConfig, BertForSequenceClassification

    plain = BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64))
    assert not [n for n in dt.attach(plain, "lora", **OPTIONS["lora"]).forms() if n.startswith("classifier")]


def test_spt_keeps_the_head_when_a_resume_brings_another_allocation(encoder: dict[str, Any]) -> None:
    """SPT rebuilds its forms from a checkpoint's allocation; the head's forms are not its own and stay on."""
    tuned = dt.attach(fresh_base(encoder), "spt", **OPTIONS["spt"])
    other = dt.attach(fresh_base(encoder), "spt", **{**OPTIONS["spt"], "seed": 1}).method_config.allocation
    assert other != tuned.method_config.allocation
    tuned.policy.load_state_dict({"allocation": other})
    assert tuned.method_config.allocation == other
    assert [forms_on(tuned, n) for n in HEAD] == [[n] for n in HEAD]
    assert all(f.attached for f in tuned.forms().values())
    assert torch.isfinite(logits(tuned, encoder["inputs"])).all()
