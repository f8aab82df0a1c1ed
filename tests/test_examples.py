"""Every shipped preset (deltatune/presets/, `deltatune train NAME`) validates and runs, cut to one step on a
small subset."""

from __future__ import annotations

from pathlib import Path

import pytest

import deltatune as dt
from deltatune.train import load_config, preset_names
from deltatune.train.config import read_config

PRESETS = preset_names()

# methods whose example trains all 135M parameters (in place): the test narrows them to the last block
def trains_full_model(method: dict) -> bool:
    options = {k: v for k, v in method.items() if k != "name"}
    return dt.core.registry.get(method["name"]).has("full_model", options)


def test_every_method_has_a_preset() -> None:
    used = {load_config(name).method["name"] for name in PRESETS}
    # compeft is made by `deltatune compress`, not trained; q_adapter needs an image / audio encoder and no such
    # model ships (its example, examples/q-adapter-digits.yaml, names a ViT the user saves)
    trained = set(dt.methods()) - {"compeft", "q_adapter"}
    assert trained <= used, f"methods without a preset: {trained - used}"


@pytest.mark.slow  # most presets load the shipped 135M model
@pytest.mark.parametrize("name", PRESETS)
def test_preset_runs(name: str, tmp_path) -> None:
    # a full fine-tune of all 135M parameters writes ~2 GB of checkpoint (delta + Adam moments): test it on
    # the last block only, the same code path (MiniLM's 22M are small enough to train whole)
    preset = load_config(name)
    method = preset.method
    # (over another method's tensors, `base: lora`, nothing is narrowed: the base's targets are small)
    narrow = ["method.layers='29:'"] if trains_full_model(method) and preset.model == "smollm2-135m" else []
    cfg = load_config(name, narrow + [
        "train.steps=1", "train.batch_size=2", "train.eval_every=0", "train.save_every=0", "train.progress=false",
        "data.max_train=8", "data.max_eval=4", f"output={tmp_path / 'run'}",
    ])
    summary = dt.train(cfg)
    assert summary["steps"] == 1 and "eval_loss" in summary["final"]
    assert dt.inspect(tmp_path / "run")["method"] == cfg.method["name"]


EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_config_validates(path: Path) -> None:
    """The YAML files the docs point to (examples/) are valid run configs (or search configs): every key and value
    checked, nothing trained. (examples/accelerate/ holds accelerate's own configs.)"""
    if "search" in read_config(path):  # a `deltatune search` config: its space and the run in it
        from deltatune import api
        from deltatune.ops import search

        assert search.prepare(api.search_config(path, []), api.config_problems).trials >= 1
        return
    cfg = load_config(path)
    assert cfg.method["name"] in dt.methods() and cfg.train.steps >= 1
