"""Every registered method through the life of a delta: attach, train with its own policy in the real training
loop (``dt.train``), load the artifact, merge, unmerge.

Each row's options shorten its policy's intervals so that the policy acts within ``STEPS`` steps: SpIEL
reselects, LISA and HFT switch layers, AdaLoRA prunes and IncreLoRA grows ranks, LT-SFT and DSEE change
phase, IST probes, ID3 unmasks, LIFT refreshes its masks, LocFT searches its layer, MeZO takes its own steps.
Whether a fresh delta starts at the base model comes from the method's traits in the registry.

Later issues add their methods as rows of ``CASES``; a registered method without a row fails
``test_every_method_has_a_row``, so no method escapes the matrix.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import MODELS, batch, output_of, save_word_llama, write_sentiment_jsonl

import deltatune as dt
from deltatune.core import registry
from deltatune.data import models
from deltatune.data.tasks import DataConfig, load_for_task
from deltatune.errors import DeltatuneError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add waits

STEPS = 4
RUN_DATA = "<the run's data section>"  # an option replaced by the run's data (YAML: `data: *data`)
# three labels: the classification heads of the tiny encoder and decoder have three outputs
WORDS = {"negative": ["awful", "sad", "terrible", "bad"], "positive": ["great", "lovely", "happy", "superb"],
         "neutral": ["okay", "fine", "plain", "usual"]}

RESELECT = {"reselection_steps": 2, "selection_accumulation_steps": 1}  # SpIEL: regrow at step 2

# (method, options, model) rows; options shorten each policy's intervals to act within STEPS
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
    ("spiel", {"density": 0.05, **RESELECT}, "llama"),
    ("spiel", {"match": "lora:r=2", "regrow": "sm3", **RESELECT}, "gpt2"),
    ("spiel", {"k": 300, "targets": ["query", "value"], **RESELECT}, "bert"),
    ("lt-sft", {}, "llama"),
    ("lt-sft", {"density": 0.05, "n_iterations": 2}, "llama"),
    ("lift", {"lora_rank": 2, "approx_rank": 2, "update_interval": 2}, "llama"),
    ("lift", {"lora_rank": 1, "approx_rank": 2, "update_interval": 2}, "gpt2"),
    ("lift", {"lora_rank": 1, "approx_rank": 1, "targets": ["query", "value"], "update_interval": 2}, "bert"),
    ("dsee", {"r": 4, "alpha": 8, "num_sparse": 8, "outer_iters": 3}, "bert"),
    ("dsee", {"r": 4, "alpha": 8, "num_sparse": 8, "outer_iters": 3}, "llama"),
    ("dsee", {"r": 4, "alpha": 8, "num_sparse": 8, "outer_iters": 3}, "gpt2"),
    ("spt", {"sensitivity": "random", "budget": 6000}, "llama"),
    ("spt", {"sensitivity": "random", "budget": 6000, "modules_to_save": ["classifier"]}, "bert"),
    ("spt", {"sensitivity": "random", "budget": 3000, "r": 4, "alpha": 5}, "gpt2"),
    ("lisa", {"interval_steps": 2}, "llama"),
    ("lisa", {"activated_layers": 1, "interval_steps": 2}, "gpt2"),
    ("lisa", {"activated_layers": 3, "interval_steps": 2}, "bert"),
    ("hft", {"rounds": 2}, "llama"),
    ("hft", {"seed": 1, "rounds": 2}, "gpt2"),
    ("hft", {}, "bert"),
    ("id3", {"budget": 500}, "llama"),
    ("id3", {"density": 0.05, "exp": 1.0, "targets": ["c_attn", "mlp.c_fc"]}, "gpt2"),
    ("id3", {"budget": 300, "targets": ["query", "value"]}, "bert"),
    ("locft", {"layer": 1}, "llama"),
    ("locft", {"search_layers": [1, 2]}, "gpt2"),
    ("locft", {"layer": 0}, "bert"),
    ("ist", {"base_options": {"r": 4, "alpha": 8}, "score_interval": 2, "data": RUN_DATA}, "llama"),
    ("ist", {"base_options": {"r": 4, "alpha": 8, "targets": ["c_attn", "wte"]}, "update_fraction": 0.5,
             "score_interval": 2}, "gpt2"),
    ("ist", {"base_options": {"r": 2, "alpha": 4, "targets": ["query", "value"], "bias": "all"}}, "bert"),
    ("kasa", {"r": 4, "alpha": 8}, "llama"),  # truncates: starts at the truncated base, not at the base
    ("kasa", {"r": 4, "alpha": 8, "truncation": "none"}, "llama"),
    ("kasa", {"r": 4, "alpha": 8, "truncation": "in_features", "targets": ["mlp.c_proj"]}, "gpt2"),  # wide: drops 0
    ("kasa", {"r": 2, "alpha": 4, "truncation": "none", "targets": ["query", "value"], "modules_to_save": ["classifier"]},
     "bert"),
    ("dora", {"r": 4, "alpha": 8, "dropout": 0.0}, "llama"),
    ("dora", {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["c_attn", "mlp.c_fc", "wte"]}, "gpt2"),
    ("dora", {"r": 2, "alpha": 4, "dropout": 0.0, "use_rslora": True, "targets": ["query", "value"], "bias": "all"}, "bert"),
    ("ia3", {}, "llama"),  # PEFT's defaults: k, v outputs and the down_proj input
    ("ia3", {}, "gpt2"),  # c_attn (its bias scaled too) and the mlp.c_proj input
    ("ia3", {"modules_to_save": ["classifier"]}, "bert"),
    ("vera", {"r": 16}, "llama"),
    ("trainable_tokens", {"token_indices": [3, 4, 9]}, "llama"),
    ("trainable_tokens", {"token_indices": list(range(40)), "targets": ["word_embeddings"]}, "bert"),
    ("vera", {"r": 8, "bias": "vera_only"}, "gpt2"),
    ("vera", {"r": 8, "targets": ["query", "value", "dense"], "dropout": 0.1}, "bert"),
    ("loha", {"r": 2, "alpha": 4}, "llama"),
    ("loha", {"r": 2, "targets": ["query", "value"], "rank_dropout": 0.2, "modules_to_save": ["classifier"]}, "bert"),
    ("lokr", {"r": 2, "alpha": 4}, "llama"),
    ("lokr", {"r": 1, "decompose_both": True, "targets": ["query", "value"], "module_dropout": 0.2}, "bert"),
    ("adalora", {"init_r": 4, "target_r": 2, "delta_t": 1}, "llama"),
    ("adalora", {"init_r": 2, "target_r": 1, "delta_t": 1}, "gpt2"),
    ("adalora", {"init_r": 2, "target_r": 1, "targets": ["query", "value"], "delta_t": 1}, "bert"),
    ("increlora", {"init_warmup": 0, "incre_interval": 1}, "llama"),
    ("increlora", {"init_r": 2, "init_warmup": 0, "incre_interval": 1}, "gpt2"),
    ("increlora", {"targets": ["query", "value"], "init_warmup": 0, "incre_interval": 1}, "bert"),
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
    ("autopeft", {"serial": 4, "parallel": 2, "prefix": 3, "mid_dim": 16, "leave_out": [1]}, "llama"),
    ("autopeft", {"serial": 2, "parallel": 0, "prefix": 2, "reparam": False, "modules_to_save": ["classifier"]},
     "bert"),
    ("polyhistor", {"r": 4, "k": 2, "embedding": 8}, "bert"),  # one task here; two in tests/test_polyhistor.py
    ("polyhistor", {"r": 4, "k": 2, "lite": True, "placement": "houlsby"}, "llama"),
    ("q_adapter", {"tokens": 2}, "vit"),  # a ViT backbone on the shipped digits (task image-classification)
]
# rows on an image model: their data and inputs instead of the text ones
IMAGE_DATA = {"name": "digits", "task": "image-classification", "labels": ["0", "1", "2"], "eval_fraction": 0.25,
              "max_train": 16, "max_eval": 6}


def tiny_vit_backbone() -> torch.nn.Module:
    """A ViT body without a head on 8×8 grey images: the loader adds a fresh head sized to the data."""
    import transformers as tf

    torch.manual_seed(0)
    return tf.ViTModel(tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=8, patch_size=4, num_channels=1, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0), add_pooling_layer=False)


def pixels(seed: int = 1) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(seed))}


def test_every_method_has_a_row() -> None:
    trained = {m for m in dt.methods() if registry.get(m).traits.made_by is None}
    assert trained <= {m for m, _, _ in CASES}


def test_traits_answer_for_every_method_and_follow_the_options() -> None:
    for name in dt.methods():
        m = registry.get(name)
        for trait in ("starts_at_base", "full_model", "gradient_free", "new_head"):
            assert isinstance(m.has(trait), bool), (name, trait)  # a trait of the config accepts the defaults
    mezo, kasa = registry.get("mezo"), registry.get("kasa")
    assert mezo.has("full_model") and not mezo.has("full_model", {"base": "lora"})
    assert mezo.has("gradient_free", {"base": "lora"}) and not registry.get("lora").has("gradient_free")
    assert kasa.has("starts_at_base", {"truncation": "none"}) and not kasa.has("starts_at_base")
    assert registry.get("compeft").traits.made_by == "compress"


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("matrix-data") / "sentiment.jsonl"
    write_sentiment_jsonl(path, WORDS)
    return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, str]:
    """Each tiny model of ``MODELS`` saved as a model folder with a word-level tokenizer of the data's words."""
    root = tmp_path_factory.mktemp("matrix-models")
    tokenizer = models.load_tokenizer(save_word_llama(root / "tokenizer", ("neutral", *WORDS["neutral"])))
    out = {}
    for arch, make in MODELS.items():
        folder = root / arch
        make().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        out[arch] = str(folder)
    tiny_vit_backbone().save_pretrained(root / "vit")
    out["vit"] = str(root / "vit")
    return out


def _run_config(folder: str, data: dict, method: str, options: dict, out: Path) -> dict:
    options = {k: (data if v == RUN_DATA else v) for k, v in options.items()}
    return {
        "model": folder,
        "data": data,
        "method": {"name": method, **options},
        "train": {"steps": STEPS, "batch_size": 4, "lr": 1e-2, "schedule": "constant", "eval_batch_size": 8,
                  "progress": False},
        "output": str(out),
    }


def _base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("method", "options", "arch"), CASES, ids=[f"{m}-{a}-{i}" for i, (m, _, a) in enumerate(CASES)])
def test_life_of_a_delta(method: str, options: dict, arch: str, folders, data_path, tmp_path) -> None:
    data = {"path": data_path, "task": "classification", "labels": list(WORDS), "max_length": 16,
            "eval_fraction": 0.25, "max_train": 16, "max_eval": 6}
    if arch == "vit":
        data = dict(IMAGE_DATA)
    cfg = _run_config(folders[arch], data, method, options, tmp_path / "run")
    resolved = {k: v for k, v in cfg["method"].items() if k != "name"}
    m = registry.get(method)
    config = registry.make_config(m, dict(resolved))

    def fresh() -> tuple[torch.nn.Module, object]:
        model, _, task = load_for_task(DataConfig(**data), folders[arch], seed=0)
        return model, task

    model, _ = fresh()
    x = pixels() if arch == "vit" else batch()
    before = output_of(model, x)
    torch.manual_seed(0)  # as the loop seeds its attach: the delta the run starts from
    initial = output_of(dt.attach(model, method, **resolved), x)
    if m.has("starts_at_base", config):
        assert torch.equal(initial, before), "a fresh delta must start exactly at the base model"

    summary = dt.train(cfg)
    assert summary["steps"] == STEPS and summary["trainable"] > 0
    assert all(math.isfinite(h["loss"]) for h in summary["history"])

    model, task = fresh()
    w0 = _base_state(model)
    loaded = dt.load(model, tmp_path / "run")
    trained = output_of(loaded, x)
    assert not torch.equal(trained, initial), "training must change the output"
    loaded.save(tmp_path / "again")
    stored = (tmp_path / "run" / "delta.safetensors").read_bytes()
    assert (tmp_path / "again" / "delta.safetensors").read_bytes() == stored, "a loaded delta saves back bit for bit"
    # the run evaluated its delta in memory: saving settles an in-place weight onto its stored value (one rounding)
    # and drops AdaLoRA's pruned components (a narrower matmul), so the two evaluations agree to float precision
    evaluated = {k: v for k, v in summary["final"].items() if k.startswith("eval_")}
    assert {f"eval_{k}": v for k, v in task.evaluate(loaded, 8).items()} == pytest.approx(evaluated, rel=1e-6)
    assert loaded.num_trainable() > 0, "a loaded delta trains on"

    if not all(f.mergeable for f in loaded.forms().values()):
        # an activation-side delta: merging is refused with a clear error and changes nothing
        with pytest.raises(DeltatuneError, match="cannot be merged"):
            loaded.merge()
        assert torch.equal(output_of(loaded, x), trained)
        loaded.detach()
        assert torch.equal(output_of(model, x), before), "detaching restores the base model"
        return

    plain = loaded.merge()
    assert type(plain) is type(model)
    assert not any("parametrizations" in k for k in plain.state_dict()), "merge leaves a plain model"
    assert torch.allclose(output_of(plain, x), trained, atol=1e-5, rtol=0)

    loaded.unmerge()
    assert torch.allclose(output_of(loaded, x), trained, atol=1e-5, rtol=0)
    for form in loaded.forms().values():
        form.detach()
    restored = _base_state(model)
    assert restored.keys() == w0.keys()
    for k in w0:
        assert torch.allclose(restored[k], w0[k], atol=1e-6, rtol=0), k
