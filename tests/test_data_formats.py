"""The data people bring (deltatune.data): .txt corpora, Alpaca, ShareGPT and TRL's prompt/completion rows
recognised by their fields, a chat template of one's own, several data sets mixed by weight, and packing of
whole chat and label-word classification examples.

The real SmolLM2 tokenizer (its ChatML template) and a tiny random Llama; data are small files in tmp_path.
Every loss mask is checked by decoding the learned tokens and comparing them with the answer text.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_tasks import GENERATION_TEMPLATE, IM_END, doc, tiny_bert, tiny_lm, write_csv, write_jsonl

from deltatune import data
from deltatune.data import encode, rows, tasks
from deltatune.data.tasks import DataConfig
from deltatune.errors import DeltatuneError

IM_START = "<|im_start|>"
SYSTEM = f"{IM_START}system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face{IM_END}\n"




def learned(tok: Any, feature: dict) -> str:
    """The decoded tokens that take a loss."""
    return tok.decode([t for t in feature["labels"] if t != -100])


def build(cfg: DataConfig, tok: Any) -> tasks.Task:
    return tasks.build_task(cfg, tok, tiny_lm())


def by_text(tok: Any, task: tasks.Task) -> dict[str, dict]:
    """Features by their decoded input (the test rows are all different)."""
    return {tok.decode(f["input_ids"]): f for f in task.train + task.eval}


# ---------------------------------------------------------------- .txt corpora


def test_txt_corpus_is_one_document_per_paragraph_and_a_folder_one_per_file(tmp_path: Path, smol_tok: Any) -> None:
    paragraphs = [doc(i, 4 + i) + "\n" + doc(i + 20, 3) for i in range(10)]  # two lines each: one document
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paragraphs[:5]) + "\n  \n\n\n" + "\r\n\r\n".join(paragraphs[5:]) + "\n")
    records = data.read_records(path)
    assert [r["text"] for r in records.rows] == paragraphs and records.fields == ["text"]
    task = build(DataConfig(path=str(path), task="text", max_length=64, eval_fraction=0.2), smol_tok)
    assert sorted(smol_tok.decode(f["input_ids"]) for f in task.train + task.eval) == sorted(paragraphs)

    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(6):
        (folder / f"{i:02d}.txt").write_text(paragraphs[i] + "\n\n" + paragraphs[i + 1])
    assert [r["text"] for r in data.read_records(folder).rows] == [
        paragraphs[i] + "\n\n" + paragraphs[i + 1] for i in range(6)
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeltatuneError, match=r"neither .*save_to_disk.* nor a folder of \.txt files"):
        data.read_records(tmp_path / "empty")


# ---------------------------------------------------------------- chat formats


def test_alpaca_rows_learn_exactly_the_output(tmp_path: Path, smol_tok: Any) -> None:
    alpaca = [{"instruction": f"Double {i}.", "input": f"The number is {i}." if i % 2 else "",
               "output": f"Twice {i} is {2 * i}."} for i in range(8)]
    alpaca[0]["system"] = "Answer in one line."
    path = write_jsonl(tmp_path / "alpaca.jsonl", alpaca)
    task = build(DataConfig(path=path, task="chat", max_length=256, eval_fraction=0.25), smol_tok)
    features = by_text(smol_tok, task)
    assert len(features) == 8
    for i, row in enumerate(alpaca):
        user = row["instruction"] + (f"\n{row['input']}" if row["input"] else "")
        system = f"{IM_START}system\nAnswer in one line.{IM_END}\n" if i == 0 else SYSTEM
        text = f"{system}{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n{row['output']}{IM_END}\n"
        assert learned(smol_tok, features[text]) == row["output"] + IM_END


def test_sharegpt_roles_map_and_every_gpt_turn_is_learned(tmp_path: Path, smol_tok: Any) -> None:
    share = [{"conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": f"Hi {i}"},
        {"from": "gpt", "value": f"Hello {i}."},
        {"from": "human", "value": "And?"},
        {"from": "gpt", "value": f"Bye {i}."},
    ]} for i in range(8)]
    path = write_jsonl(tmp_path / "share.jsonl", share)
    task = build(DataConfig(path=path, task="chat", max_length=256, eval_fraction=0.25), smol_tok)
    features = by_text(smol_tok, task)
    for i in range(8):
        text = (f"{IM_START}system\nBe brief.{IM_END}\n{IM_START}user\nHi {i}{IM_END}\n{IM_START}assistant\n"
                f"Hello {i}.{IM_END}\n{IM_START}user\nAnd?{IM_END}\n{IM_START}assistant\nBye {i}.{IM_END}\n")
        assert learned(smol_tok, features[text]) == f"Hello {i}.{IM_END}Bye {i}.{IM_END}"

    share[3]["conversations"][2]["from"] = "bot"
    bad = write_jsonl(tmp_path / "bad.jsonl", share)
    with pytest.raises(DeltatuneError, match=r"row 4 of .*ShareGPT role 'bot' is not one of human, user, gpt"):
        build(DataConfig(path=bad, task="chat"), smol_tok)


def test_trl_prompt_completion_texts_are_plain_and_learn_completion_and_eos(tmp_path: Path, smol_tok: Any) -> None:
    pairs = [{"prompt": f"The capital of country {i} is", "completion": f" city number {i}."} for i in range(10)]
    path = write_csv(tmp_path / "pc.csv", ["prompt", "completion"], [[p["prompt"], p["completion"]] for p in pairs])
    task = build(DataConfig(path=path, task="chat", max_length=64, eval_fraction=0.2), smol_tok)
    eos = smol_tok.eos_token
    features = by_text(smol_tok, task)
    for p in pairs:  # no chat template: the prompt as written, then the completion and EOS
        f = features[p["prompt"] + p["completion"] + eos]
        assert learned(smol_tok, f) == p["completion"] + eos
        n = len(smol_tok(p["prompt"], add_special_tokens=False)["input_ids"])
        assert f["labels"][:n] == [-100] * n and f["labels"][n:] == f["input_ids"][n:]


def test_trl_conversational_prompt_completion_learns_only_the_completion(tmp_path: Path, smol_tok: Any) -> None:
    convs = [{"prompt": [{"role": "user", "content": f"Count to {i}"}, {"role": "assistant", "content": "Sure."},
                         {"role": "user", "content": "Go"}],
              "completion": [{"role": "assistant", "content": " ".join(map(str, range(1, i + 2)))}]}
             for i in range(8)]
    path = write_jsonl(tmp_path / "conv.jsonl", convs)
    cfg = DataConfig(path=path, task="chat", max_length=256, eval_fraction=0.25)
    task = build(cfg, smol_tok)
    for f in task.train + task.eval:
        text = smol_tok.decode(f["input_ids"])
        i = next(i for i in range(8) if f"Count to {i}<" in text)
        # the assistant turn inside the prompt is context: only the completion is learned
        assert learned(smol_tok, f) == convs[i]["completion"][0]["content"] + IM_END
    # a template with {% generation %} marks the same tokens
    tagged = copy.deepcopy(smol_tok)
    tagged.chat_template = GENERATION_TEMPLATE
    assert build(cfg, tagged).train == task.train

    convs[2]["completion"] = "a text"
    mixed = write_jsonl(tmp_path / "mixed.jsonl", convs)
    with pytest.raises(DeltatuneError, match=r"row 3 .*'prompt' and 'completion' must both be texts or both be lists"):
        build(DataConfig(path=mixed, task="chat"), smol_tok)


def test_a_file_in_no_chat_format_gets_one_error_listing_the_formats(tmp_path: Path, smol_tok: Any) -> None:
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "Why?", "answer": "Because."}] * 4)
    with pytest.raises(DeltatuneError) as err:
        build(DataConfig(path=path, task="chat"), smol_tok)
    message = str(err.value)
    assert "\n" not in message and "its fields: question, answer" in message
    for fields in ("'messages'", "data.messages_field", "'conversations'", "{from, value}", "'instruction'",
                   "'output'", "'completion'", "'response'"):
        assert fields in message
    # a file where most rows match: the row that does not is named
    good = [{"instruction": "Say hi", "output": "hi"}] * 3
    path = write_jsonl(tmp_path / "r.jsonl", good + [{"instruction": "Say hi", "reply": "hi"}])
    with pytest.raises(DeltatuneError, match=r"^row 4 of .* matches no chat format \(its fields: instruction, reply\)"):
        build(DataConfig(path=path, task="chat"), smol_tok)


# ---------------------------------------------------------------- data.chat_template

PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}:\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:\n{% endif %}"
)


def test_chat_template_overrides_the_tokenizers(tmp_path: Path, smol_tok: Any) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"prompt": f"Q{i}?", "response": f"A{i}."} for i in range(8)])
    no_template = copy.deepcopy(smol_tok)
    no_template.chat_template = None  # the override is enough: the tokenizer needs none
    cfg = DataConfig(path=path, task="chat", chat_template=PLAIN_TEMPLATE, eval_fraction=0.25)
    task = build(cfg, no_template)
    assert task.chat_template == PLAIN_TEMPLATE
    for f in task.train + task.eval:
        text = smol_tok.decode(f["input_ids"])
        i = text.split("USER:\nQ")[1].split("?")[0]
        assert text == f"USER:\nQ{i}?\nASSISTANT:\nA{i}.\n"
        assert learned(smol_tok, f) == f"A{i}."  # the turn, without the newline after it
    jinja = tmp_path / "plain.jinja"
    jinja.write_text(PLAIN_TEMPLATE)
    from_file = build(DataConfig(path=path, task="chat", chat_template=str(jinja), eval_fraction=0.25), smol_tok)
    assert from_file.train == task.train and from_file.chat_template == PLAIN_TEMPLATE

    with pytest.raises(DeltatuneError, match=r"data\.chat_template='.*nope\.jinja' names a \.jinja file that cannot"):
        build(DataConfig(path=path, task="chat", chat_template=str(tmp_path / "nope.jinja")), smol_tok)
    for broken in ("{% for m in messages %}{{ m['content'] }}", "{{ raise_exception('roles must alternate') }}"):
        with pytest.raises(DeltatuneError, match=r"^data\.chat_template cannot render conversation \d+"):
            build(DataConfig(path=path, task="chat", chat_template=broken), smol_tok)
    with pytest.raises(DeltatuneError, match=r"data\.chat_template applies to task 'chat' only"):
        DataConfig(path=path, task="text", chat_template=PLAIN_TEMPLATE)


# ---------------------------------------------------------------- several data sets


def test_mix_takes_each_part_weight_times_its_size_deterministically() -> None:
    a, b, c = [f"a{i}" for i in range(10)], [f"b{i}" for i in range(7)], [f"c{i}" for i in range(4)]
    mixed = rows.mix([a, b, c], [0.5, 2.0, 1.25], seed=3)
    counts = collections.Counter(mixed)
    assert len(mixed) == 5 + 14 + 5
    assert sum(1 for x in counts if x[0] == "a") == 5 and all(counts[x] == 1 for x in counts if x[0] == "a")
    assert all(counts[x] == 2 for x in b)
    assert all(counts[x] in (1, 2) for x in c) and sum(counts[x] == 2 for x in c) == 1
    assert rows.mix([a, b, c], [0.5, 2.0, 1.25], seed=3) == mixed  # the same seed, the same mix
    assert rows.mix([a, b], [1.0, 1.0], seed=0) != a + b and sorted(rows.mix([a, b], [1.0, 1.0], seed=0)) == sorted(a + b)


def test_mixed_data_sets_train_by_weight_and_evaluate_every_part(tmp_path: Path, smol_tok: Any) -> None:
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": f"first file {i} " + doc(i, 5)} for i in range(20)])
    two = tmp_path / "two.txt"
    two.write_text("\n\n".join(f"second file {i} " + doc(i, 5) for i in range(10)))
    cfg = DataConfig(mix=[{"path": one, "task": "text", "max_length": 32, "eval_fraction": 0.25, "weight": 0.4},
                          {"path": str(two), "weight": 3}], seed=5)
    assert (cfg.task, cfg.max_length) == ("text", 32)  # shared keys set in one part apply to all
    assert cfg.mix[1].task == "text" and cfg.mix[1].max_length == 32 and cfg.mix[1].eval_fraction == 0.1
    task = build(cfg, smol_tok)
    train = [smol_tok.decode(f["input_ids"]) for f in task.train]
    first = [t for t in train if t.startswith("first")]
    second = collections.Counter(t for t in train if t.startswith("second"))
    assert len(first) == len(set(first)) == 6  # 0.4 x 15 training rows, each once
    assert len(second) == 9 and set(second.values()) == {3}  # 3 x 9 training rows
    held = [smol_tok.decode(f["input_ids"]) for f in task.eval]
    assert sum(t.startswith("first") for t in held) == 5 and sum(t.startswith("second") for t in held) == 1
    assert not set(held) & set(train)
    again = build(DataConfig(**dataclasses.asdict(cfg)), smol_tok)  # a config written out and read back
    assert (again.train, again.eval) == (task.train, task.eval)


def test_mixed_classification_parts_share_one_label_list(tmp_path: Path, smol_tok: Any) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": doc(i), "label": ["neg", "pos"][i % 2]} for i in range(12)])
    b = write_csv(tmp_path / "b.csv", ["body", "y"], [[doc(i + 50), ["pos", "mid"][i % 2]] for i in range(8)])
    cfg = DataConfig(mix=[{"path": a, "eval_fraction": 0.25}, {"path": b, "text_field": "body", "label_field": "y"}])
    task = build(cfg, smol_tok)
    assert task.label_names == ["mid", "neg", "pos"]
    assert collections.Counter(f["label"] for f in task.train + task.eval) == {0: 4, 1: 6, 2: 10}


def test_mix_errors_name_the_part(tmp_path: Path, smol_tok: Any) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": doc(i)} for i in range(8)])
    with pytest.raises(DeltatuneError, match=r"data\[0\]\.task='text' and data\[1\]\.task='chat' differ"):
        DataConfig(mix=[{"path": a, "task": "text"}, {"path": a, "task": "chat"}])
    with pytest.raises(DeltatuneError, match=r"data\.max_length=64 and data\[1\]\.max_length=32 differ"):
        DataConfig(mix=[{"path": a}, {"path": a, "max_length": 32}], max_length=64)
    with pytest.raises(DeltatuneError, match=r"^data\[1\]\.eval_fraction=1\.5 must be between 0 and 1"):
        DataConfig(mix=[{"path": a}, {"path": a, "eval_fraction": 1.5}])
    with pytest.raises(DeltatuneError, match=r"^data\[1\]: unknown key 'pth'"):
        DataConfig(mix=[{"path": a}, {"pth": a}])
    with pytest.raises(DeltatuneError, match=r"data\[1\]\.weight=0 must be a positive number"):
        DataConfig(mix=[{"path": a}, {"path": a, "weight": 0}])
    assert DataConfig(path=a, weight=2.0).problems() == [
        "data.weight=2.0 applies to a part of a list of data sets only; remove it, or list several data sets "
        "under data:"
    ]
    assert DataConfig(mix=[{"path": a}, {"task": "text"}]).problems() == [
        "set exactly one of data[1].name (a shipped data set: tweets, bbc, bbc-long) and data[1].path "
        f"(a {', '.join(data.FILE_TYPES)} file or a datasets save_to_disk folder)"
    ]
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(DeltatuneError, match=r"data file .*missing\.jsonl does not exist; set data\[1\]\.path"):
        build(DataConfig(mix=[{"path": a, "task": "text"}, {"path": missing}]), smol_tok)
    other = write_jsonl(tmp_path / "b.jsonl", [{"body": doc(i)} for i in range(8)])
    with pytest.raises(DeltatuneError, match=r"b\.jsonl has no field 'text' .*set data\[1\]\.text_field"):
        build(DataConfig(mix=[{"path": a, "task": "text"}, {"path": other}]), smol_tok)
    assert DataConfig(mix=[{"path": a}, {"path": other}]).paths() == [a, other]


# ---------------------------------------------------------------- packing


def chat_file(tmp_path: Path, n: int = 16) -> str:
    rows_ = [{"messages": [{"role": "user", "content": f"Question {i}: " + doc(i, i % 5)},
                           {"role": "assistant", "content": f"Answer {i}: " + doc(i + 3, 1 + i % 4)}]}
             for i in range(n)]
    return write_jsonl(tmp_path / "chat.jsonl", rows_)


def test_chat_packing_keeps_every_loss_token_once_in_whole_examples(tmp_path: Path, smol_tok: Any) -> None:
    path = chat_file(tmp_path)
    plain = build(DataConfig(path=path, task="chat", max_length=160, eval_fraction=0.25), smol_tok)
    packed = build(DataConfig(path=path, task="chat", max_length=160, eval_fraction=0.25, packing=True), smol_tok)
    assert packed.eval == plain.eval  # evaluation stays one example per row
    assert len(packed.train) < len(plain.train) and all(len(f["input_ids"]) <= 160 for f in packed.train)
    # every row is whole examples end to end, and every example is in exactly one row
    pieces = {tuple(f["input_ids"]): f for f in plain.train}
    used: collections.Counter = collections.Counter()
    for row in packed.train:
        start = 0
        while start < len(row["input_ids"]):
            f = next(f for ids, f in pieces.items() if tuple(row["input_ids"][start:start + len(ids)]) == ids)
            assert row["labels"][start:start + len(f["labels"])] == f["labels"]
            used[tuple(f["input_ids"])] += 1
            start += len(f["input_ids"])
    assert dict(used) == dict.fromkeys(pieces, 1)
    answers = [learned(smol_tok, f) for f in plain.train]
    all_learned = "".join(learned(smol_tok, r) for r in packed.train)
    assert all(all_learned.count(a) == 1 for a in answers)
    assert sum(t != -100 for r in packed.train for t in r["labels"]) == sum(
        t != -100 for f in plain.train for t in f["labels"])
    batch = packed.collate(packed.train[:2])
    loss, n = packed.loss(tiny_lm(), batch)
    # document masks replace the attention mask: the throughput count is every position of the rows
    assert torch.isfinite(loss) and n == batch["input_ids"].numel() >= sum(len(r["input_ids"]) for r in packed.train[:2])


def test_pack_groups_is_best_fit_decreasing_and_complete() -> None:
    lengths = [5, 9, 3, 7, 1, 4, 6, 2, 8, 10]
    groups = encode.pack_groups(lengths, 10)
    assert sorted(i for g in groups for i in g) == list(range(10))
    assert all(sum(lengths[i] for i in g) <= 10 for g in groups)
    assert len(groups) == 6  # 55 tokens: the fewest rows of 10 that can hold them whole
    with pytest.raises(ValueError, match="more than max_length"):
        encode.pack_groups([11], 10)


def test_label_word_packing_scores_each_prompt_once_and_the_first_as_alone(tmp_path: Path, smol_tok: Any) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": doc(i, 2 + i % 6), "label": ["bad", "good"][i % 2]}
                                              for i in range(24)])
    model = tiny_lm()
    plain = tasks.build_task(DataConfig(path=path, max_length=48, eval_fraction=0.25), smol_tok, model)
    packed = tasks.build_task(DataConfig(path=path, max_length=48, eval_fraction=0.25, packing=True), smol_tok, model)
    assert packed.eval == plain.eval and len(packed.train) < len(plain.train)
    prompts = collections.Counter((tuple(f["input_ids"]), f["label"]) for f in plain.train)
    found: collections.Counter = collections.Counter()
    for row in packed.train:
        assert len(row["input_ids"]) <= 48
        starts = [0] + [e + 1 for e in row["ends"][:-1]]
        assert row["ends"][-1] == len(row["input_ids"]) - 1
        found.update((tuple(row["input_ids"][s:e + 1]), y) for s, e, y in zip(starts, row["ends"], row["classes"],
                                                                               strict=True))
    assert found == prompts  # every prompt once, with its class, scored at its own last token
    batch = packed.collate(packed.train[:3])
    scores = packed.scores(model, batch)
    with torch.no_grad():
        for i, row in enumerate(packed.train[:3]):
            first = row["input_ids"][: row["ends"][0] + 1]
            alone = model(torch.tensor([first])).logits[0, -1, packed.label_token_ids]
            torch.testing.assert_close(scores[i, 0], alone, atol=1e-5, rtol=1e-4)
    loss, _ = packed.loss(model, batch)
    mask = batch["labels"] != -100
    torch.testing.assert_close(loss, F.cross_entropy(scores[mask], batch["labels"][mask]), atol=1e-6, rtol=1e-6)


def test_packing_errors(tmp_path: Path, smol_tok: Any) -> None:
    with pytest.raises(DeltatuneError, match=r"cannot pack examples for a classification head.*data\.head: false"):
        DataConfig(name="tweets", packing=True, head=True)
    with pytest.raises(DeltatuneError, match=r"data\.packing does not apply to task 'edit'"):
        DataConfig(path="edits.jsonl", task="edit", packing=True)
    path = write_jsonl(tmp_path / "s.jsonl", [{"text": doc(i), "label": i % 2} for i in range(12)])
    with pytest.raises(DeltatuneError, match=r"cannot pack examples for a classification head"):
        tasks.build_task(DataConfig(path=path, packing=True), smol_tok, tiny_bert(2))


def test_a_run_with_its_own_chat_template_generates_with_it(tmp_path: Path, word_run, monkeypatch) -> None:
    """The template a run trained with (data.chat_template) is saved with the delta and formats the prompt at
    generation: the word-level test tokenizer has no template of its own, so without it generate has none."""
    import json

    from transformers import PreTrainedTokenizerBase

    import deltatune as dt

    cfg = {"model": word_run[0], "output": str(tmp_path / "run"),
           "data": {"path": chat_file(tmp_path), "task": "chat", "chat_template": PLAIN_TEMPLATE, "max_length": 48,
                    "eval_fraction": 0.25},
           "method": {"name": "lora", "r": 2},
           "train": {"steps": 2, "batch_size": 2, "progress": False}}
    dt.train(cfg)
    meta = json.loads((tmp_path / "run" / "deltatune.json").read_text())
    assert meta["chat_template"] == PLAIN_TEMPLATE
    used = []
    apply = PreTrainedTokenizerBase.apply_chat_template

    def spy(self, conversation, *args, **kwargs):
        used.append(kwargs.get("chat_template"))
        return apply(self, conversation, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "apply_chat_template", spy)
    dt.generate(tmp_path / "run", "good movie", max_new_tokens=2, stream=False)
    assert used == [PLAIN_TEMPLATE]
