"""The ``seq2seq`` data task (issue 25): source -> target rows for T5 and BART, the model's own cross-entropy,
per-document equality under padding, generation metrics, training a delta on it end to end, and its errors."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import save_word_llama
from tokenizers import Tokenizer, pre_tokenizers, processors
from tokenizers import models as tokenizer_models
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

import deltatune as dt
from deltatune.data import models
from deltatune.data.seq2seq import Seq2SeqTask, exact_match, normalize_answer, rouge_l, text_metrics, token_f1
from deltatune.data.tasks import DataConfig, build_task, load_for_task
from deltatune.errors import DeltatuneError

PAD, UNK, EOS, BOS = 0, 1, 2, 3
LETTERS = "a b c d e f g h".split()
WORDS = ["[PAD]", "[UNK]", "[EOS]", "[BOS]", "copy", ":", *LETTERS]
KINDS = ("t5", "bart")


def save_seq2seq(folder: Path, kind: str) -> str:
    """A tiny random T5 or BART with a word-level tokenizer: T5's adds no special tokens (the task appends EOS to
    each target), BART's wraps every text in [BOS] ... [EOS] (as BART's own tokenizer does)."""
    tok = Tokenizer(tokenizer_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bart":
        tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]",
                                                           special_tokens=[("[BOS]", BOS), ("[EOS]", EOS)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]",
                            bos_token="[BOS]").save_pretrained(folder)
    torch.manual_seed(0)
    if kind == "t5":
        model = T5ForConditionalGeneration(T5Config(
            vocab_size=len(WORDS), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=2, pad_token_id=PAD,
            eos_token_id=EOS, decoder_start_token_id=PAD, dropout_rate=0.0))
    else:
        model = BartForConditionalGeneration(BartConfig(
            vocab_size=len(WORDS), d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
            pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, decoder_start_token_id=EOS,
            forced_eos_token_id=None, dropout=0.0))
    model.save_pretrained(folder)
    return str(folder)


def write_rows(path: Path, n: int = 24, fields: tuple[str, str] = ("source", "target")) -> str:
    """Copy rows of 1 to 6 letters: {"source": "copy : a b c", "target": "a b c"}."""
    rng = random.Random(0)
    lines = []
    for _ in range(n):
        letters = " ".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 6)))
        lines.append(json.dumps({fields[0]: f"copy : {letters}", fields[1]: letters}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seq2seq")
    for kind in KINDS:
        save_seq2seq(root / kind, kind)
    write_rows(root / "data.jsonl")
    return root


def data_config(root: Path, **extra) -> DataConfig:
    return DataConfig(path=str(root / "data.jsonl"), task="seq2seq", eval_fraction=0.25, max_new_tokens=6, **extra)


# ---------------------------------------------------------------- encoding and loss


@pytest.mark.parametrize("kind", KINDS)
def test_loads_the_seq2seq_lm_and_encodes_source_and_target(root: Path, kind: str) -> None:
    assert models.natural_task(root / kind) == "seq2seq_lm"
    model, tokenizer, task = load_for_task(data_config(root, max_length=5, max_target_length=4), str(root / kind))
    assert isinstance(model, (T5ForConditionalGeneration, BartForConditionalGeneration))
    assert isinstance(task, Seq2SeqTask) and task.kind == "seq2seq"
    assert len(task.train) == 18 and len(task.eval) == 6
    for f in task.train + task.eval:
        full_source = tokenizer(f"copy : {f['target']}")["input_ids"]
        assert f["input_ids"] == full_source[:5] or (kind == "bart" and f["input_ids"] == full_source[:4] + [EOS])
        assert f["labels"][-1] == EOS and len(f["labels"]) <= 4  # cut to max_target_length, EOS kept
        words = tokenizer(f["target"], add_special_tokens=False)["input_ids"]
        body = f["labels"][1:-1] if kind == "bart" else f["labels"][:-1]
        assert body == words[: len(body)]
    batch = task.collate(task.train[:5])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for i, f in enumerate(task.train[:5]):
        n, m = len(f["input_ids"]), len(f["labels"])
        assert batch["input_ids"][i, :n].tolist() == f["input_ids"]
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert batch["labels"][i].tolist() == f["labels"] + [-100] * (batch["labels"].shape[1] - m)


def _hand_loss(model, tokenizer, rows: list[tuple[str, str]], kind: str) -> float:
    """Σ -log p(target token) over every row's target, each row alone, / the number of target tokens."""
    total, count = 0.0, 0
    start = model.config.decoder_start_token_id
    for source, target in rows:
        src = tokenizer(source)["input_ids"]
        tgt = tokenizer(target)["input_ids"] + ([] if kind == "bart" else [EOS])
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([[start] + tgt[:-1]])).logits
        logp = F.log_softmax(logits[0].double(), -1)
        total -= float(logp[torch.arange(len(tgt)), torch.tensor(tgt)].sum())
        count += len(tgt)
    return total / count


@pytest.mark.parametrize("kind", KINDS)
def test_loss_is_the_models_cross_entropy_over_target_tokens(root: Path, kind: str) -> None:
    model, tokenizer, task = load_for_task(data_config(root), str(root / kind))
    features = task.train[:6]
    batch = task.collate(features)
    with torch.no_grad():
        loss, n_tokens = task.loss(model, batch)
        own = model(**batch).loss  # transformers shifts the labels into decoder inputs itself
    rows = [(f"copy : {f['target']}", f["target"]) for f in features]
    assert float(loss) == pytest.approx(_hand_loss(model, tokenizer, rows, kind), rel=1e-5)
    assert float(loss) == pytest.approx(float(own), rel=1e-6)
    assert n_tokens == int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())


@pytest.mark.parametrize("kind", KINDS)
def test_a_row_in_a_padded_batch_equals_the_row_alone(root: Path, kind: str) -> None:
    model, _, task = load_for_task(data_config(root), str(root / kind))
    features = sorted(task.train, key=lambda f: len(f["input_ids"]))
    features = [features[0], features[-1], features[len(features) // 2]]  # short, long, middle: real padding
    assert len({len(f["input_ids"]) for f in features}) == 3 and len({len(f["labels"]) for f in features}) > 1
    with torch.no_grad():
        batched, labels = task.logits(model, task.collate(features))
        for i, f in enumerate(features):
            alone, _ = task.logits(model, task.collate([f]))
            n = len(f["labels"])
            scale = float(alone.abs().max())
            torch.testing.assert_close(batched[i, :n], alone[0], rtol=1e-5, atol=1e-6 * scale)
            s_alone, n_alone = task._sums(model, task.collate([f]))
            s_batch = F.cross_entropy(batched[i, :n].float(), labels[i, :n], reduction="sum")
            assert float(s_batch) == pytest.approx(float(s_alone), rel=1e-5) and int(n_alone) == n


@pytest.mark.parametrize("kind", KINDS)
def test_batched_greedy_generation_equals_each_rows_own_greedy_decode(root: Path, kind: str) -> None:
    model, tokenizer, task = load_for_task(data_config(root), str(root / kind))
    # a random model predicts special tokens only: 30 full steps on the copy rows make it write letters and stop
    # after rows of different lengths (so the batch's generations are padded)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = task.collate(task.train)
    model.train()
    for _ in range(30):
        opt.zero_grad()
        task.loss(model, batch)[0].backward()
        opt.step()
    model.eval()
    features = task.eval
    predictions = task.generate(model, features)
    assert len({len(p.split()) for p in predictions}) > 1 and all(p.strip() for p in predictions)
    start = model.config.decoder_start_token_id
    for f, prediction in zip(features, predictions, strict=True):
        decoded = [start]
        with torch.no_grad():
            for _ in range(task.max_new_tokens):
                logits = model(input_ids=torch.tensor([f["input_ids"]]), decoder_input_ids=torch.tensor([decoded]))
                decoded.append(int(logits.logits[0, -1].argmax()))
                if decoded[-1] == EOS:
                    break
        assert prediction == tokenizer.decode(decoded[1:], skip_special_tokens=True)


# ---------------------------------------------------------------- metrics


def test_exact_match_token_f1_and_rouge_l_on_fixed_strings() -> None:
    assert exact_match("The cat sat.", "cat  sat") == 1.0  # SQuAD normalisation: case, punctuation, articles
    assert exact_match("cat sat on", "cat sat") == 0.0
    # prediction "a b c d" (tokens b c d after dropping the article "a"), reference "b c e": 2 common of 3 and 3
    assert token_f1("a b c d", "b c e") == pytest.approx(2 / 3)
    assert token_f1("x y", "z") == 0.0 and token_f1("", "") == 1.0 and token_f1("", "x") == 0.0
    assert token_f1("b b c", "b c c") == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))  # multisets: b, c common
    # ROUGE-L: LCS("w x y z", "w y x z") = 3 (w x z), P = R = 3/4
    assert rouge_l("w x y z", "w y x z") == pytest.approx(0.75)
    # LCS("the cat", "the big cat sat") = 2: P = 2/2, R = 2/4, F = 2PR/(P+R) = 2/3; punctuation is a separator
    assert rouge_l("The cat!", "the big cat, sat") == pytest.approx(2 / 3)
    assert rouge_l("", "x") == 0.0
    metrics = text_metrics(["cat sat", "w x y z"], ["cat sat", "w y x z"])
    assert metrics == pytest.approx({"exact_match": 0.5, "token_f1": 1.0, "rouge_l": (1 + 0.75) / 2})


def test_evaluate_scores_the_generations_against_each_rows_target(root: Path, monkeypatch) -> None:
    model, _, task = load_for_task(data_config(root), str(root / "t5"))
    first = sorted(f["target"] for f in task.eval)[0]

    def known(model, features):  # right for every row but the first target, which gets one word too many
        return [f["target"] + (" extra" if f["target"] == first else "") for f in features]

    monkeypatch.setattr(task, "generate", known)
    metrics = task.evaluate(model, batch_size=4)
    n = len(task.eval)
    wrong = sum(f["target"] == first for f in task.eval)
    # one extra word: precision k/(k+1), recall 1, F = 2k/(2k+1), k the target's words (SQuAD's F1 drops the
    # article "a"; ROUGE-L keeps it)
    k, k_rouge = len(normalize_answer(first).split()), len(first.split())
    assert metrics["exact_match"] == pytest.approx((n - wrong) / n)
    assert metrics["token_f1"] == pytest.approx((n - wrong + wrong * 2 * k / (2 * k + 1)) / n)
    assert metrics["rouge_l"] == pytest.approx((n - wrong + wrong * 2 * k_rouge / (2 * k_rouge + 1)) / n)
    whole, count = 0.0, 0
    with torch.no_grad():
        for f in task.eval:
            s, c = task._sums(model, task.collate([f]))
            whole, count = whole + float(s), count + int(c)
    assert metrics["loss"] == pytest.approx(whole / count, rel=1e-5)


# ---------------------------------------------------------------- training a delta


@pytest.mark.parametrize(("kind", "method", "options"), [
    ("t5", "lora", {"r": 4}), ("bart", "lora", {"r": 4}), ("t5", "adapter", {"r": 4}), ("bart", "adapter", {"r": 4}),
])
def test_training_a_delta_lowers_the_loss_and_saves_exactly(root: Path, tmp_path: Path, kind: str, method: str,
                                                             options: dict) -> None:
    model, _, task = load_for_task(data_config(root), str(root / kind))
    batch = task.collate(task.train[:8])
    with torch.no_grad():
        before = float(task.loss(model, batch)[0])
    torch.manual_seed(0)
    tuned = dt.attach(model, method, **options)
    params = [p for p in tuned.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    tuned.train()
    for _ in range(8):
        loss, _ = task.loss(tuned, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    tuned.eval()
    with torch.no_grad():
        after = float(task.loss(tuned, batch)[0])
        trained, _ = task.logits(tuned, batch)
    assert after < before, f"{method} on {kind}: loss {before} -> {after}"
    tuned.save(tmp_path / "artifact")
    fresh = models.load(str(root / kind))
    loaded = dt.load(fresh, tmp_path / "artifact")
    with torch.no_grad():
        again, _ = task.logits(loaded, batch)
    assert torch.equal(again, trained)


def test_train_and_eval_end_to_end(root: Path, tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from deltatune.cli.main import app

    data = {"path": str(root / "data.jsonl"), "task": "seq2seq", "eval_fraction": 0.25, "max_new_tokens": 4}
    cfg = {"model": str(root / "t5"), "data": data, "method": {"name": "lora", "r": 4},
           "train": {"steps": 4, "batch_size": 4, "lr": 1e-2, "eval_every": 0, "progress": False},
           "output": str(tmp_path / "run")}
    summary = dt.train(cfg)
    assert summary["steps"] == 4
    metrics = dt.eval(str(tmp_path / "run"), data)
    assert set(metrics) == {"loss", "perplexity", "exact_match", "token_f1", "rouge_l"}
    model, _, task = load_for_task(DataConfig(**data), str(root / "t5"))
    base = task.evaluate(model)
    assert metrics["loss"] != pytest.approx(base["loss"], rel=1e-6), "the delta must be attached"
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "run"), "--data", data["path"], "--task", "seq2seq",
                                      "--set", "eval_fraction=0.25", "--set", "max_new_tokens=4", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == pytest.approx(metrics, rel=1e-6)
    # generate: an encoder-decoder's output is the answer alone, nothing of the prompt to cut off (a tiny random
    # model greedily emits padding only, so its generate is replaced by a known answer: [start] a b [EOS])
    answer = torch.tensor([[PAD, WORDS.index("a"), WORDS.index("b"), EOS]])
    monkeypatch.setattr(T5ForConditionalGeneration, "generate", lambda self, **kw: answer)
    assert dt.generate(str(tmp_path / "run"), "c d e", max_new_tokens=4, stream=False, chat=False) == "a b"


# ---------------------------------------------------------------- other column names and errors


@pytest.mark.parametrize("fields", [("input", "output"), ("prompt", "completion")])
def test_other_column_names(root: Path, tmp_path: Path, fields: tuple[str, str]) -> None:
    path = write_rows(tmp_path / "rows.jsonl", fields=fields)
    _, _, task = load_for_task(DataConfig(path=path, task="seq2seq", eval_fraction=0.25), str(root / "t5"))
    _, _, plain = load_for_task(data_config(root), str(root / "t5"))
    assert task.train == plain.train and task.eval == plain.eval


def test_a_decoder_only_model_is_refused_in_one_line(root: Path, tmp_path: Path) -> None:
    llama = save_word_llama(tmp_path / "llama")
    with pytest.raises(DeltatuneError, match="task 'seq2seq' trains an encoder-decoder") as e:
        load_for_task(data_config(root), str(llama))
    assert "\n" not in str(e.value)
    model = models.load(str(llama))
    with pytest.raises(DeltatuneError, match="the model is a LlamaForCausalLM") as e:
        build_task(data_config(root), models.load_tokenizer(str(llama)), model)
    assert "\n" not in str(e.value)


def test_a_row_without_target_is_named(root: Path, tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"source": "copy : a", "target": "a"}\n{"source": "copy : b"}\n{"source": "copy : c", '
                    '"target": "c"}\n')
    with pytest.raises(DeltatuneError, match=r"row 2 of .*rows.jsonl has no 'target'") as e:
        load_for_task(DataConfig(path=str(path), task="seq2seq", eval_fraction=0.34), str(root / "t5"))
    assert "\n" not in str(e.value)
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(DeltatuneError, match="row 1 of .* has no source text"):
        load_for_task(DataConfig(path=str(path), task="seq2seq"), str(root / "t5"))


def test_config_errors() -> None:
    with pytest.raises(DeltatuneError, match="data.max_target_length applies to task 'seq2seq' only"):
        DataConfig(path="x.jsonl", task="text", max_target_length=8)
    with pytest.raises(DeltatuneError, match="data.max_new_tokens=0 must be a positive integer"):
        DataConfig(path="x.jsonl", task="seq2seq", max_new_tokens=0)
    with pytest.raises(DeltatuneError, match="not source/target pairs"):
        DataConfig(name="tweets", task="seq2seq")
    with pytest.raises(DeltatuneError, match="data.packing does not apply to task 'seq2seq'"):
        DataConfig(path="x.jsonl", task="seq2seq", packing=True)
