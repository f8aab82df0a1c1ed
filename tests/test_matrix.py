"""Every registered method through the life of a delta: attach, train, save, load, merge, unmerge.

Later issues add their methods as rows of ``CASES``; a registered method without a row fails
``test_every_method_has_a_row``, so no method escapes the matrix.
"""

from __future__ import annotations

import pytest
import torch
from conftest import MODELS, batch, loss_of, output_of

import deltatune as dt
from deltatune.errors import DeltatuneError

# (method, options, model) rows
CASES = [
    ("lora", {"r": 4, "alpha": 8}, "llama"),
    ("lora", {"r": 4, "alpha": 8, "targets": ["c_attn", "wte"]}, "gpt2"),
    ("lora", {"r": 2, "alpha": 4, "use_rslora": True, "targets": ["query", "value"], "bias": "all"}, "bert"),
    ("full", {}, "llama"),
    ("full", {"layers": "1:", "types": ["conv1d"]}, "gpt2"),
    ("bitfit", {}, "gpt2"),
    ("bitfit", {}, "bert"),
    ("lightweight", {}, "llama"),
    ("lightweight", {"parts": [], "last_k": 1}, "gpt2"),
    ("spiel", {"density": 0.05}, "llama"),
    ("spiel", {"match": "lora:r=2", "regrow": "sm3"}, "gpt2"),
    ("spiel", {"k": 300, "targets": ["query", "value"]}, "bert"),
    ("lt-sft", {}, "llama"),
    ("lt-sft", {"density": 0.05, "n_iterations": 2}, "llama"),
    ("lift", {"lora_rank": 2, "approx_rank": 2}, "llama"),
    ("lift", {"lora_rank": 1, "approx_rank": 2}, "gpt2"),
    ("lift", {"lora_rank": 1, "approx_rank": 1, "targets": ["query", "value"]}, "bert"),
    ("dsee", {"r": 4, "alpha": 8, "num_sparse": 8, "outer_iters": 3}, "bert"),
    ("dsee", {"r": 4, "alpha": 8, "num_sparse": 8, "outer_iters": 3}, "llama"),
    ("dsee", {"r": 4, "alpha": 8, "num_sparse": 8, "outer_iters": 3}, "gpt2"),
    ("spt", {"sensitivity": "random", "budget": 6000}, "llama"),
    ("spt", {"sensitivity": "random", "budget": 6000, "modules_to_save": ["classifier"]}, "bert"),
    ("spt", {"sensitivity": "random", "budget": 3000, "r": 4, "alpha": 5}, "gpt2"),
    ("lisa", {}, "llama"),
    ("lisa", {"activated_layers": 1}, "gpt2"),
    ("lisa", {"activated_layers": 3}, "bert"),
    ("hft", {}, "llama"),
    ("hft", {"seed": 1}, "gpt2"),
    ("hft", {}, "bert"),
    ("id3", {"budget": 500}, "llama"),
    ("id3", {"density": 0.05, "exp": 1.0, "targets": ["c_attn", "mlp.c_fc"]}, "gpt2"),
    ("id3", {"budget": 300, "targets": ["query", "value"]}, "bert"),
    ("locft", {"layer": 1}, "llama"),
    ("locft", {"layer": 2}, "gpt2"),
    ("locft", {"layer": 0}, "bert"),
    ("ist", {"base_options": {"r": 4, "alpha": 8}}, "llama"),
    ("ist", {"base_options": {"r": 4, "alpha": 8, "targets": ["c_attn", "wte"]}, "update_fraction": 0.5}, "gpt2"),
    ("ist", {"base_options": {"r": 2, "alpha": 4, "targets": ["query", "value"], "bias": "all"}}, "bert"),
    ("kasa", {"r": 4, "alpha": 8}, "llama"),  # truncates: starts at the truncated base, not at the base
    ("kasa", {"r": 4, "alpha": 8, "truncation": "none"}, "llama"),
    ("kasa", {"r": 4, "alpha": 8, "truncation": "in_features", "targets": ["mlp.c_proj"]}, "gpt2"),  # wide: drops 0
    ("kasa", {"r": 2, "alpha": 4, "truncation": "none", "targets": ["query", "value"], "modules_to_save": ["classifier"]},
     "bert"),
    ("dora", {"r": 4, "alpha": 8, "dropout": 0.0}, "llama"),
    ("dora", {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["c_attn", "mlp.c_fc", "wte"]}, "gpt2"),
    ("dora", {"r": 2, "alpha": 4, "dropout": 0.0, "use_rslora": True, "targets": ["query", "value"], "bias": "all"}, "bert"),
    ("adalora", {"init_r": 4, "target_r": 2}, "llama"),
    ("adalora", {"init_r": 2, "target_r": 1}, "gpt2"),
    ("adalora", {"init_r": 2, "target_r": 1, "targets": ["query", "value"]}, "bert"),
    ("increlora", {}, "llama"),
    ("increlora", {"init_r": 2}, "gpt2"),
    ("increlora", {"targets": ["query", "value"]}, "bert"),
    ("corda", {"r": 4, "data": "random", "samples": 4}, "llama"),
    ("corda", {"r": 2, "mode": "kpa", "data": "random", "samples": 4, "targets": ["c_attn", "mlp.c_fc"]}, "gpt2"),
    ("corda", {"r": 2, "alpha": 4, "data": "random", "samples": 4, "batch_size": 2, "targets": ["query", "value"],
               "modules_to_save": ["classifier"]}, "bert"),
    ("adapter", {"r": 4}, "llama"),
    ("adapter", {"r": 4, "placement": "pfeiffer"}, "gpt2"),
    ("adapter", {"r": 4, "activation": "linear", "modules_to_save": ["classifier"]}, "bert"),  # mergeable
    ("parallel_adapter", {"r": 4}, "llama"),
    ("parallel_adapter", {"r": 4, "sublayers": ["attention", "ffn"]}, "gpt2"),
    ("parallel_adapter", {"r": 4, "modules_to_save": ["classifier"]}, "bert"),
    ("scaled_parallel_adapter", {"r": 4}, "llama"),
    ("scaled_parallel_adapter", {"r": 4, "learnable_scale": True}, "gpt2"),
    ("scaled_parallel_adapter", {"r": 4, "layers": "1:"}, "bert"),
    ("connected", {"r": 4, "adapter_r": 4, "modules_to_save": ["classifier"]}, "bert"),
    ("connected", {"r": 4, "adapter_r": 4, "variant": "linked", "placement": "houlsby"}, "llama"),
    ("connected", {"r": 4, "variant": "aside", "activation": "gelu"}, "gpt2"),
    ("vqt", {}, "bert"),
    ("vqt", {"tokens": 2}, "llama-cls"),
    ("mezo", {}, "llama"),
    ("mezo", {"layers": "1:", "types": ["conv1d"]}, "gpt2"),
    ("mezo", {"base": "lora", "base_options": {"r": 2, "alpha": 4, "targets": ["query", "value"], "bias": "all"}},
     "bert"),
    ("sparse_mezo", {}, "llama"),
    ("sparse_mezo", {"threshold": "dynamic", "base": "lora", "base_options": {"r": 4, "alpha": 8, "targets": ["c_attn"]}},
     "gpt2"),
    ("sparse_mezo", {"sparsity": 0.5}, "bert"),
    ("prefix", {"length": 4, "reparam": False}, "llama"),
    ("prefix", {"length": 4, "mid_dim": 16}, "gpt2"),
    ("prefix", {"length": 4, "reparam": False, "modules_to_save": ["classifier"]}, "bert"),
    ("prompt", {"length": 4}, "llama"),
    ("prompt", {"length": 4, "init": "random"}, "gpt2"),
    ("prompt", {"length": 4, "modules_to_save": ["classifier"]}, "bert"),
    ("ptuning_v2", {"length": 4}, "llama"),
    ("ptuning_v2", {"length": 4, "reparam": True, "mid_dim": 16}, "gpt2"),
    ("ptuning_v2", {"length": 4}, "bert"),
    ("mam", {"prefix_length": 3, "mid_dim": 16, "r": 4}, "llama"),
    ("mam", {"prefix_length": 3, "reparam": False, "r": 4}, "gpt2"),
    ("mam", {"prefix_length": 3, "mid_dim": 16, "r": 4, "modules_to_save": ["classifier"]}, "bert"),
]


# prefix / prompt methods change attention from the first step by their papers' design (a prefix key
# takes attention mass before it has learnt anything): they cannot start at the base model
PREFIX_METHODS = {"prefix", "prompt", "ptuning_v2", "mam"}
# VQT replaces the model's head by one on its query features: its logits are a new head's from the start
# (the base model's own features stay bit-identical: tests/test_vqt.py)
NEW_HEAD_METHODS = {"vqt"}
# methods whose deltas are made from other artifacts, not trained (tests/test_compress.py)
MADE_BY_OPERATIONS = {"compeft"}


def starts_at_base(method: str, options: dict) -> bool:
    """KaSA removes the r smallest singular directions of each base weight when it attaches (its paper's
    knowledge-aware truncation): its fresh delta starts at the truncated base by design."""
    if method in PREFIX_METHODS | NEW_HEAD_METHODS:
        return False
    return not (method == "kasa" and options.get("truncation", "min") == "min")


def folds_on_save(method: str, options: dict) -> bool:
    """Prefix tuning's reparametrisation MLP trains but is folded into the prefixes it produces when saved."""
    reparam_by_default = {"prefix": True, "mam": True, "ptuning_v2": False}
    return method in reparam_by_default and options.get("reparam", reparam_by_default[method])


def test_every_method_has_a_row() -> None:
    assert set(dt.methods()) - MADE_BY_OPERATIONS <= {m for m, _, _ in CASES}


def _base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("method", "options", "arch"), CASES, ids=[f"{m}-{a}-{i}" for i, (m, _, a) in enumerate(CASES)])
def test_life_of_a_delta(method: str, options: dict, arch: str, tmp_path) -> None:
    model = MODELS[arch]()
    x = batch()
    before = output_of(model, x)
    w0 = _base_state(model)

    tuned = dt.attach(model, method, **options)
    if starts_at_base(method, options):
        assert torch.equal(output_of(tuned, x), before), "a fresh delta must start exactly at the base model"

    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss_of(tuned, x).backward()
        opt.step()
    with_grad = [p for p in tuned.parameters() if p.grad is not None]
    assert tuned.num_trainable() == sum(p.numel() for p in with_grad) > 0
    trained = output_of(tuned, x)
    assert not torch.allclose(trained, before), "training must change the output"

    tuned.save(tmp_path / "a")
    fresh = MODELS[arch]()
    loaded = dt.load(fresh, tmp_path / "a")
    assert torch.equal(output_of(loaded, x), trained), "save/load must be bit-identical"
    if not folds_on_save(method, options):
        assert loaded.num_trainable() == tuned.num_trainable()

    if not all(f.mergeable for f in tuned.forms().values()):
        # an activation-side delta: merging is refused with a clear error and changes nothing
        with pytest.raises(DeltatuneError, match="cannot be merged"):
            tuned.merge()
        assert torch.equal(output_of(tuned, x), trained)
        tuned.detach()
        assert torch.equal(output_of(model, x), before), "detaching restores the base model"
        return

    plain = tuned.merge()
    assert type(plain) is type(model)
    assert not any("parametrizations" in k for k in plain.state_dict()), "merge leaves a plain model"
    assert torch.allclose(output_of(plain, x), trained, atol=1e-5, rtol=0)

    tuned.unmerge()
    assert torch.allclose(output_of(tuned, x), trained, atol=1e-5, rtol=0)
    for form in tuned.forms().values():
        form.detach()
    restored = _base_state(model)
    assert restored.keys() == w0.keys()
    for k in w0:
        assert torch.allclose(restored[k], w0[k], atol=1e-6, rtol=0), k
