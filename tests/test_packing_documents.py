"""Packing with document masks (issue 23): in a packed row every document gets the logits it gets alone, because
its position ids restart and transformers' masks keep it from attending to the other documents of the row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from deltatune.data import tasks
from deltatune.data.config import DataConfig
from deltatune.data.encode import blocks


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=49152, n_embd=32, n_layer=2, n_head=4, n_positions=128)).eval()


def write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def segments(positions: list[int]) -> list[tuple[int, int]]:
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    return list(zip(starts[:-1], starts[1:], strict=True))


def configs(tmp: Path) -> dict[str, DataConfig]:
    words = "the cat sat on a mat while rain fell over quiet hills and rivers ran to the sea".split()
    docs = [" ".join(words[(i * 5 + k) % len(words)] for k in range(3 + 2 * i)) for i in range(12)]
    chats = [{"prompt": f"Name colour {i}.", "response": "Blue" + " and green" * (i % 4)} for i in range(12)]
    labelled = [{"text": f"{w} {i}", "label": ["good", "bad"][i % 2]} for i, w in enumerate(words * 2)]
    return {
        "text": DataConfig(path=write(tmp / "d.jsonl", [{"text": d} for d in docs]), task="text", packing=True,
                           max_length=40, eval_fraction=0.25),
        "chat": DataConfig(path=write(tmp / "c.jsonl", chats), task="chat", packing=True, max_length=96,
                           eval_fraction=0.25),
        "classification": DataConfig(path=write(tmp / "l.jsonl", labelled), packing=True, max_length=48,
                                     eval_fraction=0.25),
    }


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("kind", ["text", "chat", "classification"])
def test_each_packed_document_has_the_logits_it_has_alone(kind: str, make: Any, tmp_path: Path,
                                                           smol_tok: Any) -> None:
    model = make()
    task = tasks.build_task(configs(tmp_path)[kind], smol_tok, model)
    assert task.document_masks
    features = task.train[:3]
    batch = task.collate(features)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    inputs, _ = tasks._split_batch(model, {k: v for k, v in batch.items() if k != "score_positions"})
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits  # a cache turns transformers' packed masks off
        checked = 0
        for row, f in enumerate(features):
            spans = segments(f["position_ids"])
            assert len(spans) >= 2 or kind == "text"  # rows hold several documents
            for a, b in spans:
                alone = model(input_ids=torch.tensor([f["input_ids"][a:b]])).logits[0]
                torch.testing.assert_close(packed[row, a:b], alone, rtol=1e-4, atol=1e-4 * float(alone.abs().max()))
                checked += 1
    assert checked >= 4


def test_without_document_masks_documents_see_each_other(tmp_path: Path, smol_tok: Any) -> None:
    """The invariant above is not vacuous: the old wrapped packing (an attention mask of ones, positions running on)
    changes a later document's logits."""
    model = tiny_llama()
    task = tasks.build_task(configs(tmp_path)["chat"], smol_tok, model)
    task.document_masks = False
    f = task.train[0]
    batch = task.collate([f])
    assert "attention_mask" in batch and "position_ids" not in batch
    a, b = segments(f["position_ids"])[1]
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[0, a:b]
        alone = model(input_ids=torch.tensor([f["input_ids"][a:b]])).logits[0]
    assert not torch.allclose(packed, alone, rtol=1e-3, atol=1e-3)


def test_text_blocks_restart_positions_at_documents_and_at_cuts() -> None:
    docs = [[1, 2, 3], [4, 5, 6, 7, 8], [9, 10]]
    out = blocks(docs, 4)
    assert [b["input_ids"] for b in out] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert [b["position_ids"] for b in out] == [[0, 1, 2, 0], [0, 1, 2, 3]]
