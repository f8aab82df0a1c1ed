"""What a practitioner meets on the first day: prefix-family methods refused on models whose attention
never reaches the key/value hook (instead of training nothing), and outputs readable by other users."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, batch, loss_of, tiny_bert, tiny_gpt2, tiny_llama, tiny_llama_cls, word_run_config
from transformers import (
    FalconConfig,
    FalconForCausalLM,
    FalconForSequenceClassification,
)

import deltatune as dt
from deltatune.core.forms.attention import attention_modules
from deltatune.errors import DeltatuneError
from deltatune.train.state import checkpoints

# small options of every method that goes through the key/value hook
PREFIX_FAMILY: dict[str, dict] = {
    "prefix": {"length": 2, "mid_dim": 8},
    "ptuning_v2": {"length": 2},
    "mam": {"prefix_length": 2, "mid_dim": 8, "r": 4},
    "autopeft": {"serial": 2, "parallel": 2, "prefix": 2, "mid_dim": 8},
    "prompt": {"length": 2},
}


def _falcon_config() -> FalconConfig:
    return FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        pad_token_id=0)


def tiny_falcon() -> FalconForCausalLM:
    torch.manual_seed(0)
    return FalconForCausalLM(_falcon_config()).eval()


def tiny_falcon_cls() -> FalconForSequenceClassification:
    torch.manual_seed(0)
    cfg = _falcon_config()
    cfg.num_labels = 2
    return FalconForSequenceClassification(cfg).eval()


def _refusal(method: str, model: torch.nn.Module) -> str:
    return (f"{method} needs the attention's key/value hook, which {type(model).__name__} does not call "
            "(it runs its own attention): use a weight-side method such as lora")


# ---------------------------------------------------------------- models that run their own attention

@pytest.mark.parametrize("make", [tiny_falcon], ids=["falcon"])  # T5 calls the hook (tests/test_architectures.py)
@pytest.mark.parametrize("method", sorted(PREFIX_FAMILY))
def test_prefix_family_refuses_a_model_that_bypasses_the_kv_hook(method: str, make: Callable) -> None:
    model = make()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    with pytest.raises(DeltatuneError) as refused:
        dt.attach(model, method, **PREFIX_FAMILY[method])
    assert str(refused.value) == _refusal(method, model)
    # nothing is left behind: no hook, the model's own attention, the same weights
    assert model.config._attn_implementation == "sdpa"
    assert not any("_deltatune_kv_hook" in m.__dict__ for m in model.modules())
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_vqt_refuses_a_classifier_that_bypasses_the_kv_hook() -> None:
    model = tiny_falcon_cls()
    with pytest.raises(DeltatuneError) as refused:
        dt.attach(model, "vqt", tokens=2)
    assert str(refused.value) == _refusal("vqt", model)


def test_the_probe_leaves_the_model_and_the_rng_as_they_were() -> None:
    from deltatune.core.forms.attention import check_kv_hook_reached

    model = tiny_llama().train()
    model.model.layers[0].eval()  # a mixed mode must come back mixed
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    check_kv_hook_reached(model, attention_modules(model), "prefix")
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    assert model.config._attn_implementation == "sdpa"
    assert not any("_deltatune_kv_hook" in m.__dict__ for m in model.modules())
    assert "_deltatune_kv_hooks" not in model.__dict__ or model.__dict__["_deltatune_kv_hooks"] == 0


# ---------------------------------------------------------------- the families that work still train

WORKING = [
    ("prefix", tiny_llama), ("prefix", tiny_gpt2), ("prefix", tiny_bert),
    ("ptuning_v2", tiny_bert), ("mam", tiny_gpt2), ("prompt", tiny_llama), ("prompt", tiny_gpt2),
    ("vqt", tiny_bert), ("vqt", tiny_llama_cls),
]


@pytest.mark.parametrize(("method", "make"), WORKING, ids=[f"{m}-{f.__name__}" for m, f in WORKING])
def test_prefix_family_still_attaches_and_trains_where_the_hook_is_called(method: str, make: Callable) -> None:
    options = PREFIX_FAMILY.get(method, {"tokens": 2})
    tuned = dt.attach(make(), method, **options)
    params = tuned.trainable_parameters()
    loss_of(tuned, batch(n=1)).backward()
    assert params and any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


# ---------------------------------------------------------------- output permissions

@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _modes(folder: Path) -> tuple[set[int], set[int]]:
    """The permission bits of ``folder`` and every folder under it, and of every file under it."""
    folders = {stat.S_IMODE(folder.stat().st_mode)}
    files: set[int] = set()
    for p in folder.rglob("*"):
        (folders if p.is_dir() else files).add(stat.S_IMODE(p.stat().st_mode))
    return folders, files


def test_a_saved_artifact_gets_the_umask_mode(tmp_path: Path, umask_022: None) -> None:
    tuned = dt.attach(tiny_llama(), "lora", r=2)
    tuned.save(tmp_path / "delta")
    assert _modes(tmp_path / "delta") == ({0o755}, {0o644})


def test_a_training_run_and_its_checkpoints_get_the_umask_mode(tmp_path: Path, umask_022: None,
                                                                word_run: tuple[str, str]) -> None:
    out = tmp_path / "run"
    dt.train(word_run_config(word_run, {"name": "lora", "r": 2}, out, steps=2, save_every=1))
    assert checkpoints(out / "checkpoints"), "the run wrote no checkpoint to check"
    assert _modes(out) == ({0o755}, {0o644})


def test_files_written_on_their_own_get_the_umask_mode(tmp_path: Path, umask_022: None) -> None:
    """SPT's sensitivity scores and the Trainer bridge's policy state are single safetensors files (safetensors
    leaves them 0600)."""
    from deltatune.hf import save_policy_state
    from deltatune.methods.spt import save_sensitivity

    save_sensitivity({"w": torch.ones(2)}, tmp_path / "scores.safetensors")
    save_policy_state(dt.attach(tiny_llama(), "lora", r=2), tmp_path / "checkpoint-1")
    assert _modes(tmp_path)[1] == {0o644}  # (pytest makes tmp_path itself 0700)
    assert _modes(tmp_path / "checkpoint-1") == ({0o755}, {0o644})
