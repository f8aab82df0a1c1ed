"""The dev split a search carves from the training part (deltatune.ops.search_data) for text, chat, preference and
mixed data: a trial's own split holds out exactly the dev rows, and no row of the reported eval split is in the pool."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import deltatune as dt
from deltatune.data import rows
from deltatune.data.config import DataConfig
from deltatune.ops.search_data import dev_data


def jsonl(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return path


def held_out(section: dict) -> list[dict]:
    """The eval rows a run of ``section`` (a local file) scores on."""
    cfg = DataConfig(**section)
    table = rows.records(cfg).rows
    _, eval_idx = rows.split_indices(len(table), cfg.eval_fraction, cfg.seed)
    return [table[i] for i in rows.cut(eval_idx, cfg.max_eval)]


def trial_split(section: dict) -> tuple[list[dict], list[dict]]:
    """(train, dev) rows of a trial reading the carved section."""
    cfg = DataConfig(**section)
    table = rows.records(cfg).rows
    train_idx, eval_idx = rows.split_indices(len(table), cfg.eval_fraction, cfg.seed)
    return [table[i] for i in train_idx], [table[i] for i in eval_idx]


@pytest.mark.parametrize("task", ["text", "chat", "preference"])
def test_the_pool_is_the_training_part_and_the_trial_holds_out_the_dev_rows(task: str, tmp_path: Path) -> None:
    n = 60
    make = {"text": lambda i: {"text": f"document {i}"},
            "chat": lambda i: {"messages": [{"role": "user", "content": f"q{i}"},
                                            {"role": "assistant", "content": f"a{i}"}]},
            "preference": lambda i: {"prompt": f"p{i}", "chosen": f" yes{i}", "rejected": f" no{i}"}}[task]
    source = jsonl(tmp_path / "rows.jsonl", [make(i) for i in range(n)])
    data = {"path": str(source), "task": task, "eval_fraction": 0.2, "max_train": 30, "seed": 3}
    section, sizes = dev_data(data, tmp_path / "study", None)
    assert sizes == {"train": 30, "dev": 12}  # dev: as many as the eval split holds (0.2 of 60)
    train, dev = trial_split(section)
    assert len(train) == 30 and len(dev) == 12
    reported = held_out(data)
    assert not ({json.dumps(r) for r in train + dev} & {json.dumps(r) for r in reported})
    assert section["task"] == task and section["max_train"] is None
    again, _ = dev_data(data, tmp_path / "other", None)  # seeded: the same pool in another folder
    assert Path(again["path"]).read_text() == Path(section["path"]).read_text()


def test_preference_pairs_built_from_labels_carve_the_labelled_texts(word_run: tuple[str, str], tmp_path: Path) -> None:
    """``task: preference`` on labelled data (pairs built from the labels): the pool holds the labelled texts (the
    classification pool), so a trial builds its pairs from the search's own training texts and is scored on dev
    pairs whose prompts are exactly the classification dev split's."""
    from deltatune.data.tasks import load_for_task

    folder, path = word_run
    data = {"path": path, "task": "preference", "labels": ["negative", "positive"], "max_length": 16,
            "eval_fraction": 0.25, "max_train": 24, "max_eval": 8}
    section, sizes = dev_data(data, tmp_path / "dpo", None)
    assert section["task"] == "preference" and section["labels"] == ["negative", "positive"] and "prompt" in section
    as_words, _ = dev_data({**data, "task": "classification"}, tmp_path / "words", None)
    assert Path(section["path"]).read_text() == Path(as_words["path"]).read_text()
    _, _, pairs = load_for_task(DataConfig(**section), folder)
    _, _, words = load_for_task(DataConfig(**as_words), folder)
    assert len(pairs.eval) == sizes["dev"] == 8 and len(pairs.train) == sizes["train"] == 24
    for part in ("train", "eval"):
        assert sorted(f["prompt_ids"] for f in getattr(pairs, part)) == sorted(f["input_ids"]
                                                                              for f in getattr(words, part))


def test_a_shipped_text_set_and_a_mix_get_one_pool_per_part(tmp_path: Path) -> None:
    a = jsonl(tmp_path / "a.jsonl", [{"body": f"a{i}"} for i in range(40)])
    b = jsonl(tmp_path / "b.jsonl", [{"body": f"b{i}"} for i in range(100)])
    data = [{"path": str(a), "text_field": "body", "task": "text", "eval_fraction": 0.25},
            {"path": str(b), "text_field": "body", "weight": 0.5, "max_eval": 5}]
    section, sizes = dev_data(data, tmp_path / "study", None)
    assert isinstance(section, list) and [Path(p["path"]).name for p in section] == ["pool-0.jsonl", "pool-1.jsonl"]
    assert section[1]["weight"] == 0.5 and section[0]["text_field"] == "text"
    assert sizes == {"train": (30 - 10) + (90 - 5), "dev": 10 + 5}  # the dev rows come out of the training part
    cfg = DataConfig(mix=section)  # a valid mix: a trial reads it
    assert [p.eval_fraction for p in cfg.parts()] == [10 / 30, 5 / 90]
    for part, source in zip(section, data, strict=True):
        pooled = {r["text"] for r in rows.records(DataConfig(**part)).rows}
        table = rows.records(DataConfig(**source)).rows
        _, eval_idx = rows.split_indices(len(table), source["eval_fraction"] if "eval_fraction" in source else 0.1,
                                         0)
        assert not pooled & {table[i]["body"] for i in eval_idx}
    dev_size_given, sizes = dev_data(data, tmp_path / "given", 4)
    assert sizes["dev"] == 8


def test_an_edit_task_has_no_dev_split_to_carve(tmp_path: Path) -> None:
    source = jsonl(tmp_path / "edits.jsonl", [{"prompt": f"p{i}", "target": f"t{i}"} for i in range(10)])
    with pytest.raises(dt.DeltatuneError, match="task 'edit', which has no held-out part"):
        dev_data({"path": str(source), "task": "edit"}, tmp_path / "s", None)
