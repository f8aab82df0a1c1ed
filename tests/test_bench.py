"""deltatune bench on a tiny random Llama: every run gives a full record, ratios are to PEFT's LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from deltatune import bench as bench_module
from deltatune import models
from deltatune.errors import DeltatuneError


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("tiny-smol")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    models.load_tokenizer("smollm2-135m").save_pretrained(folder)
    return folder


def test_bench_records(tiny_folder, tmp_path):
    out = tmp_path / "bench.json"
    docs = tmp_path / "benchmarks.md"
    records = bench_module.bench(str(tiny_folder), "lora,full", 3, json_path=out, write_docs=True,
                                 docs_path=docs, batch_size=2, seq_len=32, max_train=200, max_eval=20, threads=1)
    by = {r["name"]: r for r in records}
    assert set(by) == {"deltatune lora", "deltatune full", "peft lora", "plain full"}
    for r in records:
        assert r.get("error") is None, r
        for f in bench_module.FIELDS:
            assert r[f] is not None and r[f] > 0, (r["name"], f)
        assert len(r["step_times"]) == 3
    assert all(v == pytest.approx(1.0) for v in by["peft lora"]["ratios"].values())
    assert by["deltatune lora"]["trainable"] == by["peft lora"]["trainable"]
    assert by["deltatune full"]["trainable"] == by["plain full"]["trainable"]
    assert by["deltatune lora"]["ratios"]["trainable"] == pytest.approx(1.0)
    payload = json.loads(out.read_text())
    assert [r["name"] for r in payload["records"]] == [r["name"] for r in records]
    assert payload["machine"]["torch_threads"] == 1 and payload["workload"]["steps"] == 3
    text = docs.read_text()
    assert "| peft lora |" in text and "deltatune bench" in text
    # a rewrite keeps hand-written notes below the marker
    docs.write_text(text + "my notes\n")
    bench_module.write_markdown(records, bench_module.Workload(model=str(tiny_folder)), docs, "cmd")
    assert docs.read_text().endswith("my notes\n")


def test_bench_rejects_unknown_method(tiny_folder):
    with pytest.raises(DeltatuneError, match="unknown method"):
        bench_module.bench(str(tiny_folder), "nope", 3)
