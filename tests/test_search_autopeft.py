"""``search: {space: autopeft}``: the paper's space expanded for the model's blocks (a tiny BERT and a tiny Llama
folder), trial configs that train the ``autopeft`` method, a mock search, and a bad declared space."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_sentiment_jsonl
from transformers import AutoConfig, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.api import config_problems
from deltatune.methods.autopeft import AutopeftConfig, count_parameters
from deltatune.ops import search as search_ops
from deltatune.ops.search_space import parse_search, trial_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("autopeft-space")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(root / "bert")
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(root / "llama")
    write_sentiment_jsonl(root / "data.jsonl")
    return {"bert": root / "bert", "llama": root / "llama", "data": root / "data.jsonl"}


def config(model: Path, data: Path, trials: int = 10, **search) -> dict:
    return {"model": str(model), "data": {"path": str(data), "task": "classification", "eval_fraction": 0.25},
            "method": {"name": "lora", "r": 8, "reparam": False, "modules_to_save": ["classifier"]},
            "train": {"steps": 3, "lr": 1.0e-3},
            "search": {"space": "autopeft", "trials": trials, **search}}


@pytest.mark.parametrize(("arch", "layers", "d"), [("bert", 3, 32), ("llama", 2, 32)])
def test_the_space_is_the_papers_for_the_models_blocks(folders, arch: str, layers: int, d: int) -> None:
    cfg = config(folders[arch], folders["data"])
    spec = parse_search(cfg["search"], cfg, config_problems)
    keys = [dim.key for dim in spec.space]
    assert keys == ["log2_reduction_serial", "log2_reduction_parallel", "log2_reduction_prefix",
                    *[f"leave_out_{i}" for i in range(layers)]]
    assert all(dim.choices == tuple(range(11)) for dim in spec.space[:3])
    assert all(dim.choices == (0, 1) for dim in spec.space[3:])
    values = {"log2_reduction_serial": 0, "log2_reduction_parallel": 10, "log2_reduction_prefix": 4,
              **{f"leave_out_{i}": int(i == 0) for i in range(layers)}}
    run = trial_config(cfg, spec.space, values)
    # the base's LoRA options are dropped, its autopeft ones (reparam, the head) kept, the space's decoded
    assert run["method"] == {"name": "autopeft", "reparam": False, "modules_to_save": ["classifier"], "serial": d,
                             "parallel": 0, "prefix": d // 16, "leave_out": [0]}
    assert "log2_reduction_serial" not in run and config_problems({**run, "output": "runs/x"}) == []


def test_the_declared_space_takes_generic_keys_beside_it(folders, tmp_path: Path) -> None:
    """space: {from: autopeft, train.lr: ...}: the paper's dimensions, then the learning rate; a trial config has
    both, and a key the declared space decides (method.name, one of its own) is refused with the other problems."""
    cfg = config(folders["bert"], folders["data"])
    cfg["search"]["space"] = {"from": "autopeft", "train.lr": {"log": [1.0e-4, 1.0e-2]}, "train.warmup": [0.0, 0.1]}
    spec = parse_search(cfg["search"], cfg, config_problems)
    assert [d.key for d in spec.space][-2:] == ["train.lr", "train.warmup"] and len(spec.space) == 3 + 3 + 2
    values = {"log2_reduction_serial": 3, "log2_reduction_parallel": 10, "log2_reduction_prefix": 10,
              **{f"leave_out_{i}": 0 for i in range(3)}, "train.lr": 3.0e-3, "train.warmup": 0.1}
    run = trial_config(cfg, spec.space, values)
    assert run["train"]["lr"] == 3.0e-3 and run["method"]["serial"] == 32 // 8 and run["train"]["warmup"] == 0.1
    assert config_problems({**run, "output": "runs/x"}) == []
    cfg["search"]["space"] = {"from": "autopeft", "method.name": ["lora"], "log2_reduction_serial": [1, 2],
                              "train.lrr": [0.1]}
    with pytest.raises(dt.DeltatuneError) as e:
        dt.search(cfg, tmp_path / "s", runner=lambda c, f: {})
    text = str(e.value)
    assert "search.space.method.name: already decided by the 'autopeft' space" in text
    assert "search.space.log2_reduction_serial: already decided" in text and "unknown key train.lrr" in text


def test_a_bad_declared_space_is_refused_with_the_others(folders, tmp_path: Path) -> None:
    cfg = config(folders["bert"], folders["data"])
    cfg["search"]["space"] = "lora"
    cfg["search"]["trials"] = 0
    with pytest.raises(dt.DeltatuneError) as e:
        dt.search(cfg, tmp_path / "s", runner=lambda c, f: {})
    assert "'lora' declares no search space" in str(e.value) and "search.trials=0" in str(e.value)
    cfg["search"].update(space="autopft", trials=2)
    with pytest.raises(dt.DeltatuneError, match="unknown method 'autopft'"):
        dt.search(cfg, tmp_path / "s", runner=lambda c, f: {})


def test_a_mock_search_over_the_autopeft_space(folders, tmp_path: Path) -> None:
    """The spec's mock objective (metric = 1 - exp(-param% / 3)): trials train autopeft configs whose trainable count
    is the counter's, the front's run configs are autopeft configs, trials.csv shows the paper's encoding."""
    geometry = AutoConfig.from_pretrained(folders["bert"])
    total = sum(p.numel() for p in BertModel(geometry).parameters())

    def mock(run: dict, folder: Path) -> dict:
        options = {k: v for k, v in run["method"].items() if k not in ("name", "modules_to_save")}
        trainable = count_parameters(geometry, AutopeftConfig(**options))
        accuracy = 1 - math.exp(-100 * trainable / total / 3)
        return {"metrics": {"accuracy": accuracy}, "trainable": trainable}

    cfg = config(folders["bert"], folders["data"], 12, startup=4)
    study = dt.search(cfg, tmp_path / "s", runner=mock)
    assert len(search_ops.finished(study)) == 12
    header = (tmp_path / "s" / "trials.csv").read_text().splitlines()[0]
    assert header.startswith("trial,state,log2_reduction_serial,log2_reduction_parallel,log2_reduction_prefix,"
                             "leave_out_0,leave_out_1,leave_out_2,accuracy,trainable")
    fronts = sorted((tmp_path / "s" / "pareto").glob("*.yaml"))
    assert fronts
    for path in fronts:
        run = yaml.safe_load(path.read_text())
        assert run["method"]["name"] == "autopeft" and {"serial", "parallel", "prefix", "leave_out"} <= set(run["method"])
        assert config_problems(run) == []
    # the counter is the instantiated count for a configuration the search took
    best = search_ops.front_rows(study, search_ops.prepare(cfg, config_problems))[-1]
    run = trial_config(cfg, search_ops.prepare(cfg, config_problems).space, best["values"])
    options = {k: v for k, v in run["method"].items() if k not in ("name", "modules_to_save")}
    tuned = dt.attach(BertModel(geometry), "autopeft", **options)
    assert tuned.num_trainable() == best["objectives"]["trainable"]


@pytest.mark.slow  # two real trials in their own processes (each imports torch): ~25 s on a busy 2-core machine
def test_a_real_autopeft_search_on_a_tiny_encoder(tmp_path: Path) -> None:
    from test_head_artifacts import save_tiny_encoder

    model = save_tiny_encoder(tmp_path / "model", tmp_path / "data.jsonl")
    cfg = config(model, tmp_path / "data.jsonl", 2, sampler="random", dev_size=8)
    cfg["data"]["max_length"] = 16
    cfg["train"] = {"steps": 2, "batch_size": 8, "lr": 1.0e-2, "seed": 0}
    study = dt.search(cfg, tmp_path / "s")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"], [t.user_attrs for t in study.trials]
    geometry = AutoConfig.from_pretrained(model)
    spec = search_ops.prepare(cfg, config_problems)
    for t in study.trials:
        run = trial_config(cfg, spec.space, t.user_attrs["values"])
        options = {k: v for k, v in run["method"].items() if k not in ("name", "modules_to_save")}
        head = 32 * 2 + 2  # the classifier: 2 labels on width 32
        assert t.values[1] == count_parameters(geometry, AutopeftConfig(**options)) + head
