"""train.chunked_loss: next-token losses from the hidden states in chunks (deltatune.data.lm_loss) equal the plain
loss on the whole logits, in value and gradient, for every task that reads a causal LM's head and both paths (a
frozen plain head: fused; a trained or parametrised head: checkpointed module calls)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt2, tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.data import lm_loss, tasks
from deltatune.data.config import DataConfig

REL = 1e-5


def close(a: torch.Tensor, b: torch.Tensor, rel: float = REL) -> bool:
    """Equal up to summation order: within rel of the larger magnitude of the two tensors."""
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-12)
    return float((a - b).abs().max()) <= rel * scale


def loss_and_grads(model: torch.nn.Module, fn: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    params = [p for p in model.parameters() if p.requires_grad]
    loss = fn()
    return loss.detach(), list(torch.autograd.grad(loss, params))


def plain_sum(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits[:, -labels.shape[1]:]
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("arch", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("method,fused", [("lora", True), ("full", True), ("prefix", True), ("spiel", False),
                                          ("trainable_tokens", True)])
def test_token_nll_equals_the_plain_loss_in_value_and_gradient(arch: Any, method: str, fused: bool) -> None:
    # spiel: a sparse delta on the head itself (its forward replaced), which the fused path must not take
    # trainable_tokens: rows of the (tied) embedding, so the head's weight is parametrised: W0 + rows, fused
    options = {"length": 3} if method == "prefix" else {"targets": ["lm_head"]} if method == "spiel" else \
        {"token_indices": [3, 17, 40]} if method == "trainable_tokens" else {}
    tuned = dt.attach(arch(tied=False) if method == "spiel" and arch is tiny_llama else arch(), method,
                      **options).train()
    if method in ("spiel", "trainable_tokens"):
        with torch.no_grad():
            for p in tuned.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.5)  # a non-zero delta on the head: dropping it changes the loss
    for m in tuned.modules():  # dropout off: the two forwards must see the same network
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    head = lm_loss.output_head(tuned)
    assert head is not None and lm_loss._linear_head(head[2]) == fused
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (3, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # ignored labels inside and at the edges of chunks
    labels[1, 6] = -100
    labels[2, 7:] = -100
    want, want_grads = loss_and_grads(tuned, lambda: plain_sum(tuned, ids, labels))
    for chunk in (1, 3, 7, None):
        got, grads = loss_and_grads(tuned, lambda c=chunk: lm_loss.token_nll(tuned, {"input_ids": ids}, labels,
                                                                            chunk=c).nll.sum())
        assert close(got, want), (chunk, float(got), float(want))
        assert all(close(a, b) for a, b in zip(grads, want_grads, strict=True)), chunk


@pytest.mark.parametrize("method", ["full", "trainable_tokens"])
def test_a_trained_head_gets_the_gradient_of_a_loss_that_weighs_positions_differently(method: str) -> None:
    """The fused path keeps the head's gradient for a loss that weighs every position alike; per-sequence weights
    (as the preference losses give) take the recompute in the backward: both equal the plain loss's gradient."""
    tuned = dt.attach(tiny_llama(), method, **({"token_indices": [3, 17]} if method == "trainable_tokens" else {}))
    tuned.train()
    if method == "trainable_tokens":
        with torch.no_grad():
            for p in tuned.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.5)
    head = lm_loss.output_head(tuned)
    assert head is not None and lm_loss._linear_head(head[2])
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 128, (3, 9), generator=g)
    labels = ids.clone()
    labels[1, :5] = -100
    weights = torch.rand(3, 1, generator=g) + 0.5  # one weight per sequence

    def plain() -> torch.Tensor:
        logits = tuned(input_ids=ids, use_cache=False).logits
        targets = F.pad(labels, (0, 1), value=-100)[:, 1:]
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1), ignore_index=-100,
                              reduction="none").view_as(targets)
        return (nll * weights).sum()

    want, want_grads = loss_and_grads(tuned, plain)
    got, grads = loss_and_grads(tuned, lambda: (lm_loss.token_nll(tuned, {"input_ids": ids}, labels, chunk=4).nll
                                                * weights).sum())
    assert close(got, want)
    assert all(close(a, b) for a, b in zip(grads, want_grads, strict=True))


def test_hits_and_unlabelled_positions() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        out = lm_loss.token_nll(model, {"input_ids": ids}, labels, chunk=4, hits=True)
        logits = model(input_ids=ids).logits
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:]
    mask = targets != -100
    assert torch.equal(out.nll[~mask], torch.zeros_like(out.nll[~mask]))
    assert out.hit is not None and torch.equal(out.hit, (logits.argmax(-1) == targets) & mask)


def test_a_model_that_rescales_its_logits_keeps_the_plain_loss() -> None:
    model = tiny_llama()
    assert lm_loss.supported(model)
    model.config.final_logit_softcapping = 30.0  # Gemma 2's: the head's output is not the logits
    assert not lm_loss.supported(model)


# ---------------------------------------------------------------- through the tasks


def tiny_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)  # SmolLM2's vocabulary: several chunks of positions per batch
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def task_configs(tmp: Path) -> dict[str, DataConfig]:
    words = "the cat sat on a mat while rain fell over quiet hills and rivers ran to the sea".split()
    docs = [" ".join(words[(i * 5 + k) % len(words)] for k in range(30 + i)) for i in range(12)]
    chats = [{"prompt": f"Name a colour, number {i}.", "response": f"Blue, for number {i}, and green."}
             for i in range(12)]
    labelled = [{"text": f"{w} {i} {w}", "label": ["good", "bad"][i % 2]} for i, w in enumerate(words * 2)]
    edits = [{"prompt": f"The capital of place {i} is", "target": f"city {i}"} for i in range(6)]
    return {
        "text": DataConfig(path=write(tmp / "docs.jsonl", [{"text": d} for d in docs]), task="text",
                           max_length=64, eval_fraction=0.25),
        "text-packed": DataConfig(path=write(tmp / "docs2.jsonl", [{"text": d} for d in docs]), task="text",
                                  packing=True, max_length=48, eval_fraction=0.25),
        "chat": DataConfig(path=write(tmp / "chat.jsonl", chats), task="chat", max_length=64, eval_fraction=0.25),
        "classification-packed": DataConfig(path=write(tmp / "cls.jsonl", labelled), packing=True, max_length=48,
                                            eval_fraction=0.25),
        "edit": DataConfig(path=write(tmp / "edits.jsonl", edits), task="edit"),
    }


@pytest.mark.parametrize("kind,method", [("text", "lora"), ("text-packed", "lora"), ("chat", "lora"),
                                         ("classification-packed", "lora"), ("edit", "lora"), ("chat", "full")])
def test_every_task_loss_and_evaluation_equal_the_plain_ones(kind: str, method: str, tmp_path: Path,
                                                              smol_tok: Any) -> None:
    tuned = dt.attach(tiny_lm(), method).train()
    task = tasks.build_task(task_configs(tmp_path)[kind], smol_tok, tuned)
    batch = task.collate(task.train[:4])
    results = {}
    for chunked in (True, False):
        task.chunked_loss = chunked
        assert task.chunked(tuned) == chunked
        loss, grads = loss_and_grads(tuned, lambda: task.loss(tuned, batch)[0])
        results[chunked] = (loss, grads, task.evaluate(tuned, batch_size=3))
    (a, ga, ea), (b, gb, eb) = results[True], results[False]
    assert close(a, b)
    assert all(close(x, y) for x, y in zip(ga, gb, strict=True))
    assert ea.keys() == eb.keys()
    for key in ea:
        assert ea[key] == pytest.approx(eb[key], rel=REL, abs=1e-7), key


def test_preference_log_probs_equal_the_plain_ones(smol_tok: Any) -> None:
    from test_preference import random_pairs, task_of

    from deltatune.data.preference import sequence_logps

    pairs = random_pairs(4, seed=3)
    batch = task_of(pairs).collate(pairs)
    tuned = dt.attach(tiny_llama(), "lora").train()
    for m in tuned.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    chunked = sequence_logps(tuned, batch, chunked=True)
    plain = sequence_logps(tuned, batch, chunked=False)
    for x, y in zip(chunked, plain, strict=True):
        assert close(x.float(), y.float())


def test_the_run_config_switch(tmp_path: Path) -> None:
    from deltatune.train.config import parse_config

    cfg = parse_config({"model": "smollm2-135m", "method": {"name": "lora"}, "data": {"name": "tweets"}, "output": str(tmp_path),
                        "train": {"chunked_loss": False}})
    assert cfg.train.chunked_loss is False
    with pytest.raises(dt.DeltatuneError, match="chunked_loss"):
        parse_config({"model": "smollm2-135m", "method": {"name": "lora"}, "data": {"name": "tweets"}, "output": str(tmp_path),
                      "train": {"chunked_los": False}})
