"""Data formats for training (deltatune.data.tasks): text, packing, chat masks, head and generative classification.

Tiny random models built from configs, with the real SmolLM2 and MiniLM tokenizers; the data are small
files written to tmp_path, plus the shipped tweets and bbc sets.
"""

from __future__ import annotations

import collections
import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune import data
from deltatune.data import models, tasks
from deltatune.data.tasks import DataConfig
from deltatune.errors import DeltatuneError

IM_END = "<|im_end|>"




@pytest.fixture(scope="module")
def mini_tok() -> Any:
    return models.load_tokenizer("minilm-l6")


def tiny_lm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(num_labels: int, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, num_labels=num_labels)
    return BertForSequenceClassification(cfg).eval()


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> str:
    import csv

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


WORDS = "the cat sat on a mat while rain fell over quiet hills and rivers ran to the sea".split()


def doc(i: int, n: int = 12) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(n)) + f" {i}."


def labelled_rows(counts: dict[Any, int]) -> list[dict]:
    rows, i = [], 0
    for label, n in counts.items():
        for _ in range(n):
            rows.append({"text": doc(i, 4 + i % 5), "label": label})
            i += 1
    return rows


def check_modes_restored(task: tasks.Task, model: torch.nn.Module, keys: set[str]) -> dict[str, float]:
    for training in (True, False):
        model.train(training)
        metrics = task.evaluate(model, batch_size=4)
        assert set(metrics) == keys
        assert all(m.training is training for m in model.modules())
    return metrics


# ---------------------------------------------------------------- text


def test_text_task_masks_padding_and_evaluates(tmp_path: Path, smol_tok: Any) -> None:
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": doc(i, 3 + 2 * i)} for i in range(10)])
    task = tasks.build_task(DataConfig(path=path, task="text", max_length=16, eval_fraction=0.3), smol_tok, tiny_lm())
    assert task.kind == "text" and task.label_names is None
    assert (len(task.train), len(task.eval)) == (7, 3)
    assert all(2 <= len(f["input_ids"]) <= 16 for f in task.train + task.eval)
    batch = task.collate(task.train[:4])
    mask = batch["attention_mask"].bool()
    assert not mask.all()  # the lengths differ, so something is padded (on the right)
    assert torch.equal(batch["labels"][mask], batch["input_ids"][mask])
    assert (batch["labels"][~mask] == -100).all()
    model = tiny_lm()
    loss, n = task.loss(model, batch)
    assert n == int(mask.sum()) and torch.isfinite(loss)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    metrics = check_modes_restored(task, model, {"loss", "perplexity"})
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))


def test_packing_gives_full_blocks_of_the_document_stream(tmp_path: Path, smol_tok: Any) -> None:
    texts = [doc(i, 5 + i) for i in range(20)]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"body": t} for t in texts])
    cfg = DataConfig(path=path, task="text", text_field="body", packing=True, max_length=16, eval_fraction=0.25)
    task = tasks.build_task(cfg, smol_tok, tiny_lm())
    assert all(len(f["input_ids"]) == 16 for f in task.train + task.eval)
    train_idx, _ = tasks.split_indices(len(texts), 0.25, 0)
    stream = [t for i in train_idx for t in smol_tok(texts[i])["input_ids"] + [smol_tok.eos_token_id]]
    assert len(task.train) == len(stream) // 16
    assert [t for f in task.train for t in f["input_ids"]] == stream[: 16 * len(task.train)]
    batch = task.collate(task.train[:3])
    # document masks: positions restart at each document (after each EOS) in place of an attention mask
    assert "attention_mask" not in batch and torch.equal(batch["labels"], batch["input_ids"])
    eos = smol_tok.eos_token_id
    for row, ids in zip(batch["position_ids"].tolist(), batch["input_ids"].tolist(), strict=True):
        assert all(row[k] == 0 for k in range(1, len(ids)) if ids[k - 1] == eos)
        assert all(row[k] == row[k - 1] + 1 for k in range(1, len(ids)) if ids[k - 1] != eos)
    with pytest.raises(DeltatuneError, match="packing"):
        tasks.build_task(DataConfig(path=path, task="text", text_field="body", packing=True, max_length=2000),
                         smol_tok, tiny_lm())


# ---------------------------------------------------------------- chat

GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chat_rows() -> list[dict]:
    rows: list[dict] = []
    for i in range(8):
        rows.append({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}."},
            {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": f"Yes, {i} + {i} = {2 * i}, certainly."},
        ]})
    for i in range(8):
        rows.append({"prompt": f"Name a colour, number {i}.", "response": f"Blue, for number {i}!"})
    return rows


def assistant_text(messages: list[dict]) -> str:
    return "".join(m["content"] + IM_END for m in messages if m["role"] == "assistant")


def test_chat_loss_mask_covers_exactly_the_assistant_tokens(tmp_path: Path, smol_tok: Any) -> None:
    rows = chat_rows()
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = DataConfig(path=path, task="chat", max_length=256, eval_fraction=0.25)
    task = tasks.build_task(cfg, smol_tok, tiny_lm())
    assert task.kind == "chat" and (len(task.train), len(task.eval)) == (12, 4)
    conversations = [r.get("messages") or [{"role": "user", "content": r["prompt"]},
                                           {"role": "assistant", "content": r["response"]}] for r in rows]
    train_idx, eval_idx = tasks.split_indices(len(rows), 0.25, 0)
    for i, feature in zip(train_idx + eval_idx, task.train + task.eval, strict=True):
        learned = [t for t in feature["labels"] if t != -100]
        assert smol_tok.decode(learned) == assistant_text(conversations[i])
        full = smol_tok.apply_chat_template(conversations[i], tokenize=False)
        assert smol_tok.decode(feature["input_ids"]) == full
        # the learned tokens are the assistant's, at the assistant's positions
        assert all(t == -100 or t == x for t, x in zip(feature["labels"], feature["input_ids"], strict=True))

    # a template with {% generation %} markers marks the same tokens itself
    tagged = copy.deepcopy(smol_tok)
    tagged.chat_template = GENERATION_TEMPLATE
    assert tasks.build_task(cfg, tagged, tiny_lm()).train == task.train

    batch = task.collate(task.train[:4])
    loss, n = task.loss(tiny_lm(), batch)
    assert torch.isfinite(loss) and n == int(batch["attention_mask"].sum())
    check_modes_restored(task, tiny_lm(), {"loss", "perplexity"})


def test_chat_from_csv_prompt_response_and_truncation(tmp_path: Path, smol_tok: Any) -> None:
    path = write_csv(tmp_path / "pairs.csv", ["prompt", "response"],
                     [[f"Say {i}", f"{i} is said"] for i in range(10)])
    task = tasks.build_task(DataConfig(path=path, task="chat", max_length=64, eval_fraction=0.2), smol_tok, tiny_lm())
    assert smol_tok.decode([t for t in task.train[0]["labels"] if t != -100]).endswith(f" is said{IM_END}")
    # the system prompt alone is longer than 20 tokens: no assistant token survives, so nothing is left
    with pytest.raises(DeltatuneError, match="empty"):
        tasks.build_task(DataConfig(path=path, task="chat", max_length=20, eval_fraction=0.2), smol_tok, tiny_lm())


# ---------------------------------------------------------------- generative classification


def test_generative_loss_matches_hand_computation_and_left_padding(tmp_path: Path, smol_tok: Any) -> None:
    rows = [{"text": doc(i, 3 + 3 * (i % 4)), "label": ["negative", "positive"][i % 2]} for i in range(20)]
    path = write_jsonl(tmp_path / "sentiment.jsonl", rows)
    model = tiny_lm()
    task = tasks.build_task(DataConfig(path=path), smol_tok, model)
    assert task.kind == "classification-generative"
    assert task.label_names == ["negative", "positive"] and task.label_words == [" negative", " positive"]
    label_ids = [smol_tok(w, add_special_tokens=False)["input_ids"][0] for w in (" negative", " positive")]
    assert task.label_token_ids.tolist() == label_ids

    features = task.train[:5]
    assert len({len(f["input_ids"]) for f in features}) > 1
    by_ids = {tuple(smol_tok(f"Text: {r['text']}\nLabel:")["input_ids"]): r for r in rows}
    hand = []
    alone_last = []
    with torch.no_grad():
        for f in features:
            row = by_ids[tuple(f["input_ids"])]  # the prompt is tokenized as the joint string would be
            assert f["label"] == task.label_names.index(row["label"])
            logits = model(torch.tensor([f["input_ids"]])).logits[0, -1]
            alone_last.append(logits)
            hand.append(-torch.log_softmax(logits[label_ids], -1)[f["label"]])
        batch = task.collate(features)
        assert (batch["attention_mask"][:, -1] == 1).all() and (batch["attention_mask"][:, 0] == 0).any()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        padded_last = model(**inputs).logits[:, -1]
    assert (padded_last - torch.stack(alone_last)).abs().max() <= 1e-5
    loss, n = task.loss(model, batch)
    assert n == int(batch["attention_mask"].sum())
    torch.testing.assert_close(loss, torch.stack(hand).mean(), atol=1e-5, rtol=1e-5)
    metrics = check_modes_restored(task, model, {"loss", "accuracy"})
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_tuned_wrapper_trains_through_the_task(tmp_path: Path, smol_tok: Any) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": doc(i), "label": i % 2} for i in range(12)])
    model = tiny_lm()
    task = tasks.build_task(DataConfig(path=path), smol_tok, model)
    tuned = dt.attach(model, "lora", r=2, alpha=4, targets=["q_proj", "v_proj"])
    assert tasks.build_task(DataConfig(path=path), smol_tok, tuned).train == task.train
    tuned.train()
    loss, _ = task.loss(tuned, task.collate(task.train[:4]))
    loss.backward()
    assert all(p.grad is not None for p in tuned.trainable_parameters())
    assert tuned.training and set(task.evaluate(tuned)) == {"loss", "accuracy"} and tuned.training


def test_split_is_deterministic_and_stratified(tmp_path: Path, smol_tok: Any) -> None:
    counts = {0: 60, 1: 30, 2: 10}
    rows = labelled_rows(counts)
    path = write_jsonl(tmp_path / "ints.jsonl", rows)
    model = tiny_lm()
    cfg = DataConfig(path=path, eval_fraction=0.2, seed=3)
    task = tasks.build_task(cfg, smol_tok, model)
    assert task.label_names == ["0", "1", "2"]
    # SmolLM2 reads " 0" as "Ġ" + "0": the shared "Ġ" ends the prompt and the digits are the class scores
    assert smol_tok.decode(task.train[0]["input_ids"]).endswith("\nLabel: ")
    assert task.label_token_ids.tolist() == smol_tok.convert_tokens_to_ids(["0", "1", "2"])
    again = tasks.build_task(DataConfig(path=path, eval_fraction=0.2, seed=3), smol_tok, model)
    assert (again.train, again.eval) == (task.train, task.eval)
    other = tasks.build_task(DataConfig(path=path, eval_fraction=0.2, seed=4), smol_tok, model)
    assert other.eval != task.eval
    assert len(task.eval) == 20 and len(task.train) == 80
    eval_counts = collections.Counter(f["label"] for f in task.eval)
    assert all(abs(eval_counts[y] - 0.2 * n) <= 1 for y, n in counts.items())
    seqs = [tuple(f["input_ids"]) for f in task.train + task.eval]
    assert len(set(seqs)) == len(rows)  # disjoint and complete
    assert [f["label"] for f in task.train] != sorted(f["label"] for f in task.train)  # shuffled

    small = tasks.build_task(DataConfig(path=path, eval_fraction=0.2, seed=3, max_train=40, max_eval=10),
                             smol_tok, model)
    assert (len(small.train), len(small.eval)) == (40, 10)
    assert collections.Counter(f["label"] for f in small.train) == {0: 24, 1: 12, 2: 4}
    assert {tuple(f["input_ids"]) for f in small.eval} <= {tuple(f["input_ids"]) for f in task.eval}


def test_csv_string_labels_and_label_filter(tmp_path: Path, smol_tok: Any) -> None:
    rows = labelled_rows({"spam": 10, "ham": 10, "eggs": 10})
    path = write_csv(tmp_path / "food.csv", ["label", "text"], [[r["label"], r["text"]] for r in rows])
    task = tasks.build_task(DataConfig(path=path), smol_tok, tiny_lm())
    assert task.label_names == ["eggs", "ham", "spam"]  # sorted names
    kept = tasks.build_task(DataConfig(path=path, labels=["spam", "ham"], eval_fraction=0.25), smol_tok, tiny_lm())
    assert kept.label_names == ["spam", "ham"] and len(kept.train) + len(kept.eval) == 20
    assert collections.Counter(f["label"] for f in kept.eval) == {0: 2, 1: 3} or \
        collections.Counter(f["label"] for f in kept.eval) == {0: 3, 1: 2}


def test_tweets_filtered_to_negative_and_positive(smol_tok: Any) -> None:
    cfg = DataConfig(name="tweets", labels=["negative", "positive"], max_train=50, max_eval=20, max_length=64)
    assert tasks.model_request(cfg, "smollm2-135m") == {}
    task = tasks.build_task(cfg, smol_tok, tiny_lm())
    assert task.kind == "classification-generative" and task.label_names == ["negative", "positive"]
    assert task.label_words == [" negative", " positive"]
    assert (len(task.train), len(task.eval)) == (50, 20)
    assert collections.Counter(f["label"] for f in task.eval) == {0: 14, 1: 6}  # 16,186 : 6,954
    assert collections.Counter(f["label"] for f in task.train) == {0: 35, 1: 15}
    text = smol_tok.decode(task.train[0]["input_ids"])
    assert text.startswith("Tweet: ") and text.endswith("\nSentiment:")
    assert all(len(f["input_ids"]) <= 64 for f in task.train + task.eval)


def test_load_for_task_reads_the_data_once_and_sizes_the_head(monkeypatch: pytest.MonkeyPatch) -> None:
    from deltatune.data import rows

    reads = []
    read = rows.classification_data
    monkeypatch.setattr(rows, "classification_data", lambda cfg: reads.append(cfg) or read(cfg))
    cfg = DataConfig(name="bbc", max_train=20, max_eval=10, max_length=32)
    model, tokenizer, task = tasks.load_for_task(cfg, "minilm-l6", seed=5)
    assert len(reads) == 1, "the label count and the task come from one read"
    assert model.config.num_labels == 5 and task.kind == "classification-head" and tokenizer.cls_token_id is not None
    again = tasks.load_for_task(cfg, "minilm-l6", seed=5).model
    torch.testing.assert_close(again.classifier.weight, model.classifier.weight)  # the seed fixes the fresh head


# ---------------------------------------------------------------- classification with a head


def test_head_classification_on_bbc_with_minilm_tokenizer(mini_tok: Any) -> None:
    cfg = DataConfig(name="bbc", max_train=30, max_eval=10, max_length=64)
    request = tasks.model_request(cfg, "minilm-l6")
    assert request == _head(["business", "entertainment", "politics", "sports", "tech"])
    model = tiny_bert(5)
    task = tasks.build_task(cfg, mini_tok, model)
    assert task.kind == "classification-head"
    assert task.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert (len(task.train), len(task.eval)) == (30, 10)
    assert all(len(f["input_ids"]) == 64 and f["input_ids"][0] == mini_tok.cls_token_id for f in task.train)
    batch = task.collate(task.train[:6])
    loss, n = task.loss(model, batch)
    assert n == 6 * 64 and loss.requires_grad
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(loss, F.cross_entropy(logits, batch["labels"]))
    metrics = check_modes_restored(task, model, {"loss", "accuracy"})
    assert metrics["accuracy"] * 10 == pytest.approx(round(metrics["accuracy"] * 10))


def _head(names: list[str]) -> dict:
    """The load request for a classification head over ``names``: its size and both label maps."""
    return {"task": "classification", "num_labels": len(names), "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)}}


def test_model_request_by_task_and_head() -> None:
    assert tasks.model_request(DataConfig(name="bbc"), "smollm2-135m") == {}
    assert tasks.model_request(DataConfig(name="bbc", head=True), "smollm2-135m") == _head(["business", "entertainment", "politics", "sports", "tech"])
    assert tasks.model_request(DataConfig(name="tweets", labels=["negative", "positive"]), "minilm-l6") == _head(
        ["negative", "positive"])
    assert tasks.model_request(DataConfig(name="bbc", task="text"), "smollm2-135m") == {}
    with pytest.raises(DeltatuneError, match="causal"):
        tasks.model_request(DataConfig(name="bbc", task="text"), "minilm-l6")
    with pytest.raises(DeltatuneError, match="encoder"):
        tasks.model_request(DataConfig(name="bbc", head=False), "minilm-l6")


# ---------------------------------------------------------------- files


def test_json_and_tsv_files(tmp_path: Path, smol_tok: Any) -> None:
    rows = labelled_rows({"a": 5, "b": 5})
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "rows.tsv").write_text("text\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))
    model = tiny_lm()
    built = [tasks.build_task(DataConfig(path=str(tmp_path / f), labels=["a", "b"]), smol_tok, model)
             for f in ("rows.json", "rows.tsv")]
    assert built[0].train == built[1].train


def test_parquet_and_saved_dataset_folder(tmp_path: Path, smol_tok: Any) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = labelled_rows({0: 6, 1: 6})
    features = {"text": {"dtype": "string", "_type": "Value"}, "label": {"names": ["pos", "neg"], "_type": "ClassLabel"}}
    table = pa.Table.from_pylist(rows).replace_schema_metadata(
        {"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(table, tmp_path / "rows.parquet")
    folder = tmp_path / "saved" / "train"  # the layout of DatasetDict.save_to_disk
    folder.mkdir(parents=True)
    (tmp_path / "saved" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": features}))
    model = tiny_lm()
    built = [tasks.build_task(DataConfig(path=str(p)), smol_tok, model) for p in (tmp_path / "rows.parquet", folder.parent)]
    assert built[0].label_names == built[1].label_names == ["pos", "neg"]  # the ClassLabel order
    assert built[0].train == built[1].train


def test_parquet_without_pyarrow_names_the_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import fails, as when it is not installed
    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    with pytest.raises(DeltatuneError, match=r"pip install .deltatune\[parquet\]"):
        data.read_records(tmp_path / "rows.parquet")
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "state.json").write_text("{}")
    with pytest.raises(DeltatuneError, match=r"pip install .deltatune\[parquet\]"):
        data.read_records(tmp_path / "saved")


# ---------------------------------------------------------------- errors


def test_missing_field_names_field_fields_and_key(tmp_path: Path, smol_tok: Any) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"body": "hello there", "sentiment": "good"}] * 4)
    with pytest.raises(DeltatuneError) as err:
        tasks.build_task(DataConfig(path=path), smol_tok, tiny_lm())
    message = str(err.value)
    assert "'text'" in message and "body, sentiment" in message and "data.text_field" in message
    with pytest.raises(DeltatuneError, match=r"'label'.*body, sentiment.*data\.label_field"):
        tasks.build_task(DataConfig(path=path, text_field="body"), smol_tok, tiny_lm())
    with pytest.raises(DeltatuneError, match=r"'messages'.*data\.messages_field"):
        tasks.build_task(DataConfig(path=path, task="chat"), smol_tok, tiny_lm())
    csv_path = write_csv(tmp_path / "x.csv", ["body", "y"], [["a", "1"]])
    with pytest.raises(DeltatuneError, match=r"'text'.*body, y.*data\.text_field"):
        tasks.build_task(DataConfig(path=csv_path, task="text"), smol_tok, tiny_lm())


def test_config_and_file_errors(tmp_path: Path, smol_tok: Any) -> None:
    with pytest.raises(DeltatuneError, match=r"unknown task 'summarize'.*text, chat, classification"):
        DataConfig(name="tweets", task="summarize")
    with pytest.raises(DeltatuneError, match="exactly one"):
        DataConfig(name="tweets", path="x.jsonl")
    assert DataConfig().problems()  # constructible (config parsers build defaults), but not usable
    with pytest.raises(DeltatuneError, match="exactly one"):
        tasks.build_task(DataConfig(), smol_tok, tiny_lm())
    with pytest.raises(DeltatuneError, match="imdb"):
        DataConfig(name="imdb")
    with pytest.raises(DeltatuneError, match=r"\{text\}"):
        DataConfig(name="tweets", prompt="no placeholder")
    with pytest.raises(DeltatuneError, match="packing"):
        DataConfig(name="tweets", packing=True, head=True)
    (tmp_path / "rows.xlsx").write_bytes(b"x")
    with pytest.raises(DeltatuneError, match=r"unknown data file type '\.xlsx'.*\.jsonl"):
        tasks.build_task(DataConfig(path=str(tmp_path / "rows.xlsx")), smol_tok, tiny_lm())
    with pytest.raises(DeltatuneError, match="does not exist"):
        tasks.build_task(DataConfig(path=str(tmp_path / "nope.jsonl")), smol_tok, tiny_lm())
    with pytest.raises(DeltatuneError, match=r"no label 'happy'.*negative, neutral, positive"):
        tasks.build_task(DataConfig(name="tweets", labels=["happy", "negative"]), smol_tok, tiny_lm())
    with pytest.raises(DeltatuneError, match="max_length"):
        tasks.build_task(DataConfig(name="tweets", max_length=4), smol_tok, tiny_lm())


def test_model_and_label_word_errors(tmp_path: Path, smol_tok: Any, mini_tok: Any) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": doc(i), "label": ["aa1", "aa2", "bb"][i % 3]} for i in range(12)])
    with pytest.raises(DeltatuneError, match="same token"):
        tasks.build_task(DataConfig(path=path), smol_tok, tiny_lm())
    with pytest.raises(DeltatuneError, match="num_labels=5"):
        tasks.build_task(DataConfig(name="bbc", max_train=10, max_eval=5), mini_tok, tiny_bert(3))
    with pytest.raises(DeltatuneError, match="causal"):
        tasks.build_task(DataConfig(name="bbc", task="text"), mini_tok, tiny_bert(5))
    with pytest.raises(DeltatuneError, match="no head"):
        tasks.build_task(DataConfig(name="bbc", head=True), smol_tok, tiny_lm())
    no_template = copy.deepcopy(smol_tok)
    no_template.chat_template = None
    chat = write_jsonl(tmp_path / "c.jsonl", chat_rows())
    with pytest.raises(DeltatuneError, match="chat template"):
        tasks.build_task(DataConfig(path=chat, task="chat"), no_template, tiny_lm())
