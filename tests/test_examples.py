"""Every shipped example config validates and runs (cut to one step on a small subset)."""

from __future__ import annotations

from pathlib import Path

import pytest

import deltatune as dt
from deltatune.train import load_config

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))

# methods whose example trains all 135M parameters (in place): the test narrows them to the last block
FULL_MODEL = {"full", "mezo", "sparse_mezo"}


def test_every_method_has_an_example() -> None:
    used = {load_config(p).method["name"] for p in EXAMPLES}
    trained = set(dt.methods()) - {"compeft"}  # made by `deltatune compress`, not trained
    assert trained <= used, f"methods without an example: {trained - used}"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path: Path, tmp_path: Path) -> None:
    # a full fine-tune of all 135M parameters writes ~2 GB of checkpoint (delta + Adam moments): test it on
    # the last block only, the same code path
    method = load_config(path).method
    # (over another method's tensors, `base: lora`, nothing is narrowed: the base's targets are small)
    narrow = ["method.layers='29:'"] if method["name"] in FULL_MODEL and "base" not in method else []
    cfg = load_config(path, narrow + [
        "train.steps=1", "train.batch_size=2", "train.eval_every=0", "train.save_every=0", "train.progress=false",
        "data.max_train=8", "data.max_eval=4", f"output={tmp_path / 'run'}",
    ])
    summary = dt.train(cfg)
    assert summary["steps"] == 1 and "eval_loss" in summary["final"]
    assert dt.inspect(tmp_path / "run")["method"] == cfg.method["name"]
