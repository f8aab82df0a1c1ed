"""AutoPEFT's configuration (``deltatune.methods.autopeft``): the paper's size encoding and its edge cases, the
parameter counter against the instantiated modules on a tiny BERT and a tiny Llama, and the artifact round trip."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from conftest import batch, output_of, tiny_bert, tiny_llama
from transformers import BertConfig

import deltatune as dt
from deltatune.methods import autopeft
from deltatune.methods.autopeft import AutopeftConfig, count_parameters

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sizes_follow_the_papers_reductions_with_its_edge_cases() -> None:
    # BERT-base: {768, 384, ..., 3, 1, 0}: ρ = 512 gives 1 (768 / 512 = 1.5), ρ = 1024 means absent
    assert [autopeft.size(x, 768) for x in range(11)] == [768, 384, 192, 96, 48, 24, 12, 6, 3, 1, 0]
    # a narrower model keeps every present module at least 1 wide (MiniLM: d = 384)
    assert [autopeft.size(x, 384) for x in range(11)] == [384, 192, 96, 48, 24, 12, 6, 3, 1, 1, 0]
    with pytest.raises(ValueError):
        autopeft.size(11, 768)


def test_every_encoding_decodes_to_a_valid_config_and_back() -> None:
    base = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12)
    dims = autopeft.search_dimensions(base)
    assert list(dims)[:3] == ["log2_reduction_serial", "log2_reduction_parallel", "log2_reduction_prefix"]
    assert [k for k in dims if k.startswith("leave_out_")] == [f"leave_out_{i}" for i in range(12)]
    rng = random.Random(0)
    for _ in range(200):
        z = {k: rng.choice(v) for k, v in dims.items()}
        options = autopeft.options_from_search(z, base)
        AutopeftConfig(**options)  # valid
        assert autopeft.search_from_options(options, base) == z  # on d = 768 the encoding is one to one
        assert options["leave_out"] == [i for i in range(12) if z[f"leave_out_{i}"]]
    absent = autopeft.options_from_search({**dict.fromkeys(dims, 0), "log2_reduction_prefix": 10}, base)
    assert absent == {"serial": 768, "parallel": 768, "prefix": 0, "leave_out": []}
    assert autopeft.options_from_search({**dict.fromkeys(dims, 0), "log2_reduction_serial": 9}, base)["serial"] == 1


def _random_config(rng: random.Random, n_layers: int, d: int) -> AutopeftConfig:
    holder = type("C", (), {"hidden_size": d, "num_hidden_layers": n_layers, "num_attention_heads": 4})()
    z = {k: rng.choice(v) for k, v in autopeft.search_dimensions(holder).items()}
    options = autopeft.options_from_search(z, holder)
    return AutopeftConfig(**options, reparam=rng.random() < 0.5, mid_dim=rng.choice([4, 16]))


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_the_parameter_counter_equals_the_instantiated_count(make) -> None:
    rng = random.Random(1)
    model = make()
    n, d = model.config.num_hidden_layers, model.config.hidden_size
    configs = [_random_config(rng, n, d) for _ in range(12)]
    configs.append(AutopeftConfig(serial=3, parallel=5, prefix=2, leave_out=[0, 2], mid_dim=8))
    configs.append(AutopeftConfig(leave_out=list(range(n))))  # every block left out: nothing at all
    for cfg in configs:
        options = {k: getattr(cfg, k) for k in ("serial", "parallel", "prefix", "leave_out", "reparam", "mid_dim")}
        tuned = dt.attach(make(), "autopeft", **options)
        assert count_parameters(model.config, cfg) == tuned.num_trainable(), options
        stored = sum(t.numel() for f in tuned.forms().values() for t in f.stored_tensors().values())
        assert count_parameters(model.config, cfg, training=False) == stored, options
    # the head as modules_to_save: counted by the caller (the model's own size)
    tuned = dt.attach(make(), "autopeft", serial=2, parallel=0, prefix=0, modules_to_save=["classifier"]) \
        if make is tiny_bert else None
    if tuned is not None:
        head = sum(p.numel() for p in model.classifier.parameters())
        assert tuned.num_trainable() == count_parameters(model.config, AutopeftConfig(serial=2, parallel=0,
                                                                                      prefix=0)) + head


def test_sites_and_names_of_the_three_modules() -> None:
    tuned = dt.attach(tiny_llama(), "autopeft", serial=4, parallel=2, prefix=3, leave_out=[1], reparam=False)
    names = set(tuned.forms())
    assert names == {"model.layers.0.self_attn", "model.layers.2.self_attn", "model.layers.0.mlp.serial_adapter",
                     "model.layers.2.mlp.serial_adapter", "model.layers.0.mlp.parallel_adapter",
                     "model.layers.2.mlp.parallel_adapter"}
    pa = tuned.forms()["model.layers.0.mlp.parallel_adapter"]
    assert pa.reads == "input" and float(pa.bottleneck.scale) == 4.0 and pa.bottleneck.down.out_features == 2
    assert tuned.forms()["model.layers.0.mlp.serial_adapter"].reads == "output"
    with pytest.raises(dt.DeltatuneError, match="leave_out"):
        dt.attach(tiny_llama(), "autopeft", leave_out=[3])


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama], ids=["bert", "llama"])
def test_a_trained_delta_saves_and_loads_to_the_same_outputs(make, tmp_path: Path) -> None:
    tuned = dt.attach(make(), "autopeft", serial=4, parallel=2, prefix=3, mid_dim=8, leave_out=[0])
    inputs = batch()
    with torch.no_grad():  # move the zero-initialised up-projections, so every module acts
        for p in tuned.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = output_of(make(), inputs)
    ours = output_of(tuned, inputs)
    assert not torch.allclose(ours, before, atol=1e-4)
    tuned.save(tmp_path / "a")
    loaded = dt.load(make(), tmp_path / "a")
    assert torch.allclose(output_of(loaded, inputs), ours, atol=1e-5)
    assert "prefix_encoder" not in loaded.forms()  # the MLP was folded into P_k, P_v
