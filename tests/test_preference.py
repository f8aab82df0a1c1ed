"""The preference task and the DPO family (deltatune.data.preference, train.objective).

Against the spec's CPU checks (shared/methods/preference.md): DPO = log 2 at init with dropout off and
dL/dΔ = -β/2; the completion log-prob masked exactly (prompt and padding never enter; the scored tokens decoded);
IPO = 1/(4β²) at init, SimPO = softplus(γ) on equal completions, ORPO = NLL + λ log 2 on an identical pair. The
reference: the delta taken off equals a separately built base model bit for bit (every switchable form); the
precomputed reference of a delta trained in place (written, equal to the live base, reused on resume, a stale
file refused). Runs end to end in the native loop (exact resume, metrics in the log), with a zeroth-order
policy, and under DeltaTuneTrainer; bad input gets a clear error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    SENTIMENT_WORDS,
    VOCAB,
    load_smol_tokenizer,
    save_word_llama,
    tiny_llama,
    train_then_resume,
)
from safetensors.torch import load_file

import deltatune as dt
from deltatune.data import models, objectives
from deltatune.data.config import DataConfig
from deltatune.data.preference import (
    DPO,
    IPO,
    ORPO,
    REFERENCE_DIR,
    REFERENCE_FILE,
    REFERENCE_META,
    Logps,
    PreferenceTask,
    SimPO,
    completion_logps,
    disable_dropout,
    live_reference,
    sequence_logps,
)
from deltatune.data.tasks import build_task
from deltatune.errors import DeltatuneError
from deltatune.train.config import load_config, parse_config
from deltatune.train.loop import build

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
LOG2 = math.log(2)


# -- helpers ---------------------------------------------------------------------------------------------------------
def random_pairs(n: int, seed: int = 0, prompt: tuple[int, int] = (3, 7), completion: tuple[int, int] = (1, 5)
                 ) -> list[dict]:
    """Pairs of random token ids (2..VOCAB-1: 0 pads, 1 is EOS) of random lengths, chosen != rejected."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return torch.randint(2, VOCAB, (int(torch.randint(lo, hi + 1, (1,), generator=g)),), generator=g).tolist()

    return [{"prompt_ids": ids(*prompt), "chosen_ids": ids(*completion) + [1], "rejected_ids": ids(*completion) + [1]}
            for _ in range(n)]


def task_of(train: list[dict], max_length: int = 32, objective=None) -> PreferenceTask:
    task = PreferenceTask(DataConfig(task="preference", max_length=max_length), SimpleNamespace(pad_token_id=0,
                          eos_token_id=1), train, train[:2])
    if objective is not None:
        task.use_objective(objective)
    return task


def add_noise(tuned, seed: int = 1, scale: float = 0.2) -> None:
    """Every delta tensor moved by N(0, scale²): a delta that changes the model (a fresh one may start at 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.deltas.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g) * scale)


def write_pairs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment_pairs() -> list[dict]:
    """48 plain pairs in the word-level tokenizer's vocabulary: the right label word is chosen."""
    other = {"positive": "negative", "negative": "positive"}
    return [{"prompt": f"what a {w} day number {i}", "chosen": lab, "rejected": other[lab]}
            for i in range(12) for lab, ws in SENTIMENT_WORDS.items() for w in ws[i % 2::2]]


@pytest.fixture(scope="module")
def word_pairs(tmp_path_factory) -> tuple[str, str]:
    """A word-level tiny Llama folder and a preference JSONL: a real ``dt.train`` run in a second."""
    root = tmp_path_factory.mktemp("word-pairs")
    return str(save_word_llama(root / "model")), str(write_pairs(root / "pairs.jsonl", sentiment_pairs()))


def run_config(word_pairs: tuple[str, str], out: Path, method: dict | str = "lora", objective="dpo",
               **train: object) -> dict:
    folder, path = word_pairs
    return {
        "model": folder,
        "data": {"path": path, "task": "preference", "max_length": 16, "eval_fraction": 0.25, "max_eval": 8},
        "method": method if isinstance(method, dict) else {"name": method},
        "train": {"objective": objective, "steps": 6, "batch_size": 4, "lr": 1e-2, "warmup": 1, "save_every": 2,
                  "keep_last": 4, "eval_every": 3, "progress": False, **train},
        "output": str(out),
    }


@pytest.fixture(scope="module")
def smol_tokenizer():
    return load_smol_tokenizer()


# -- the spec's checks -------------------------------------------------------------------------------------------------
def test_dpo_is_log_2_at_init_with_dropout_off_and_random_with_it_on() -> None:
    pairs = random_pairs(4)
    task = task_of(pairs, objective=DPO())
    tuned = dt.attach(tiny_llama(), "lora", r=4, dropout=0.5)
    add_noise(tuned)  # B != 0: the LoRA branch (and its dropout) acts
    tuned.train()
    batch = task.collate(pairs)
    first, _ = task.loss(tuned, batch)
    second, _ = task.loss(tuned, batch)
    assert float(first.detach()) != float(second.detach()), "with dropout on, the policy is random: not the reference"
    assert disable_dropout(tuned) > 0
    fresh = dt.attach(tiny_llama(), "lora", r=4, dropout=0.5)
    disable_dropout(fresh)
    fresh.train()
    task.take_metrics()
    loss, tokens = task.loss(fresh, batch)
    assert abs(float(loss.detach()) - LOG2) < 1e-6
    assert tokens == int(batch["attention_mask"].sum())
    metrics = task.take_metrics()
    assert metrics["rewards/chosen"] == metrics["rewards/rejected"] == metrics["rewards/margins"] == 0.0
    assert metrics["rewards/accuracies"] == 0.0, "TRL counts chosen > rejected strictly"


def test_dpo_gradient_is_minus_beta_over_2_and_a_step_raises_the_margin() -> None:
    for beta in (0.1, 0.5):
        chosen, rejected = torch.tensor([-3.0, -7.0], requires_grad=True), torch.tensor([-5.0, -2.0], requires_grad=True)
        policy = Logps(chosen, rejected, torch.tensor([2, 3]), torch.tensor([4, 1]))
        loss, _ = DPO(beta=beta).compute(policy, (chosen.detach(), rejected.detach()))
        loss.backward()
        # dL/dΔ_i = -β σ(-βΔ_i) / n at Δ = 0: -β/2 per pair, spread over the mean of 2 pairs
        assert torch.allclose(chosen.grad, torch.full((2,), -beta / 4), atol=1e-7)
        assert torch.allclose(rejected.grad, torch.full((2,), beta / 4), atol=1e-7)
    pairs = random_pairs(4, seed=2)
    task = task_of(pairs, objective=DPO())
    tuned = dt.attach(tiny_llama(), "lora", r=4)
    tuned.train()
    batch = task.collate(pairs)
    loss, _ = task.loss(tuned, batch)
    loss.backward()
    with torch.no_grad():
        for p in tuned.trainable_parameters():
            p -= 0.5 * p.grad
    after, _ = task.loss(tuned, batch)
    policy, (ref_c, ref_r) = sequence_logps(tuned, batch), live_reference(tuned, batch)
    margin = (policy.chosen - ref_c) - (policy.rejected - ref_r)
    assert bool((margin > 0).all()) and float(after.detach()) < LOG2


def test_the_completion_log_prob_takes_no_prompt_and_no_padding() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 8, 11, generator=g)
    labels = torch.full((2, 8), -100)
    labels[0, 2:5] = torch.tensor([4, 7, 1])  # prompt at 0-1, a 3-token completion, padding after
    labels[1, 3:5] = torch.tensor([9, 1])
    sums, counts = completion_logps(logits, labels)
    by_hand = sum(float(torch.log_softmax(logits[0, t], -1)[labels[0, t + 1]]) for t in (1, 2, 3))
    assert abs(float(sums[0]) - by_hand) < 1e-5 and counts.tolist() == [3, 2]
    unscored = F.pad(labels, (0, 1), value=-100)[:, 1:] == -100  # positions that predict a prompt token or padding
    changed = logits + 100.0 * torch.randn(logits.shape, generator=g) * unscored.unsqueeze(-1)
    assert torch.equal(completion_logps(changed, labels)[0], sums), "prompt and padding positions never enter"
    scored = logits.clone()
    scored[0, 2] += torch.randn(11, generator=g)
    assert float(completion_logps(scored, labels)[0][0]) != float(sums[0])


def test_more_padding_leaves_the_completion_log_probs_as_they_were() -> None:
    model = tiny_llama()
    short, long = random_pairs(2, seed=3, completion=(2, 3)), random_pairs(1, seed=4, prompt=(14, 16))
    task = task_of(short + long)
    with torch.no_grad():
        alone = sequence_logps(model, task.collate(short))
        padded = sequence_logps(model, task.collate(short + long))
    assert task.collate(short + long)["input_ids"].shape[1] > task.collate(short)["input_ids"].shape[1] + 8
    for a, b in ((alone.chosen, padded.chosen[:2]), (alone.rejected, padded.rejected[:2])):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_the_scored_tokens_decode_to_the_completion_and_eos(tmp_path, smol_tokenizer) -> None:
    rows = [{"prompt": f"Question {i}: is the sky blue?", "chosen": " Yes, it is.", "rejected": " No."} for i in range(6)]
    rows.append({"prompt": [{"role": "user", "content": "Say hi"}],
                 "chosen": [{"role": "assistant", "content": "Hello there!"}],
                 "rejected": {"role": "assistant", "content": "Bye."}})
    path = write_pairs(tmp_path / "pairs.jsonl", rows)
    task = build_task(DataConfig(path=str(path), task="preference", max_length=128, eval_fraction=0.3), smol_tokenizer,
                      tiny_llama())
    batch = task.collate(task.train + task.eval)
    n = batch["input_ids"].shape[0] // 2
    eos = smol_tokenizer.eos_token  # <|im_end|>: also the template's end of turn
    decoded = [smol_tokenizer.decode(ids[labels != -100]) for ids, labels in zip(batch["input_ids"], batch["labels"],
                                                                                 strict=True)]
    prompts = [smol_tokenizer.decode(ids[labels == -100][mask[labels == -100] == 1])
               for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True)]
    chat = [i for i in range(n) if "<|im_start|>" in prompts[i]]
    assert len(chat) == 1
    assert decoded[chat[0]] == f"Hello there!{eos}" and decoded[n + chat[0]] == f"Bye.{eos}"
    assert prompts[chat[0]].endswith("<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\n")
    for i in set(range(n)) - set(chat):
        assert decoded[i] == f" Yes, it is.{eos}" and decoded[n + i] == f" No.{eos}"
        assert prompts[i].startswith("Question ") and prompts[i].endswith(": is the sky blue?")


def test_ipo_at_init_is_one_over_four_beta_squared() -> None:
    pairs = random_pairs(4, seed=5)
    tuned = dt.attach(tiny_llama(), "lora", r=4)
    for beta in (0.1, 0.5):
        loss, _ = task_of(pairs, objective=IPO(beta=beta)).loss(tuned, task_of(pairs).collate(pairs))
        assert abs(float(loss.detach()) - 1 / (4 * beta**2)) < 1e-4 / beta**2


def test_simpo_on_equal_completions_is_softplus_gamma() -> None:
    pairs = [dict(p, rejected_ids=list(p["chosen_ids"])) for p in random_pairs(3, seed=6)]
    model = tiny_llama()
    for gamma, beta in ((0.5, 0.1), (1.0, 2.0)):
        loss, _ = task_of(pairs, objective=SimPO(beta=beta, simpo_gamma=gamma)).loss(model, task_of(pairs).collate(pairs))
        assert abs(float(loss.detach()) - F.softplus(torch.tensor(gamma)).item()) < 1e-6
    assert abs(F.softplus(torch.tensor(0.5)).item() - 0.9741) < 1e-4
    # cpo_alpha adds the chosen NLL (CPO-SimPO): TRL's CPOConfig default, not SimPO's
    task = task_of(pairs, objective=SimPO(cpo_alpha=1.0))
    loss, _ = task.loss(model, task.collate(pairs))
    assert abs(float(loss.detach()) - 0.974077 - task.take_metrics()["nll_loss"]) < 1e-5


def test_orpo_on_an_identical_pair_is_nll_plus_lambda_log_2() -> None:
    pairs = [dict(p, rejected_ids=list(p["chosen_ids"])) for p in random_pairs(3, seed=7)]
    model = tiny_llama()
    batch = task_of(pairs).collate(pairs)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:3]
    targets = F.pad(batch["labels"][:3], (0, 1), value=-100)[:, 1:]
    nll = F.cross_entropy(logits.flatten(0, 1), targets.reshape(-1), ignore_index=-100)  # token mean, chosen only
    for lam in (0.1, 1.0):
        task = task_of(pairs, objective=ORPO(beta=lam))
        loss, _ = task.loss(model, batch)
        assert abs(float(loss.detach()) - (float(nll) + lam * LOG2)) < 1e-5
        metrics = task.take_metrics()
        assert abs(metrics["log_odds_chosen"]) < 1e-6 and abs(metrics["log_odds_ratio"] + LOG2) < 1e-6


# -- the reference is the base model ------------------------------------------------------------------------------------
SWITCHABLE = {"lora": {"r": 4}, "dora": {"r": 4}, "spiel": {"density": 0.05}, "adapter": {"r": 4},
              "prefix": {"length": 3}}


@pytest.mark.parametrize("method", list(SWITCHABLE))
def test_the_delta_off_reference_is_the_base_model_bit_for_bit(method: str) -> None:
    pairs = random_pairs(4, seed=8)
    batch = task_of(pairs).collate(pairs)
    tuned = dt.attach(tiny_llama(seed=0), method, **SWITCHABLE[method])
    assert tuned.switchable
    add_noise(tuned)
    disable_dropout(tuned)  # as a run does (DoRA's own dropout would make two policy forwards differ)
    tuned.train()
    with torch.no_grad():
        before = sequence_logps(tuned, batch)
        ref_chosen, ref_rejected = live_reference(tuned, batch)
        after = sequence_logps(tuned, batch)
        base = sequence_logps(tiny_llama(seed=0).eval(), batch)
    assert torch.equal(ref_chosen, base.chosen) and torch.equal(ref_rejected, base.rejected)
    assert not torch.equal(before.chosen, base.chosen), "the delta must change the policy"
    assert torch.equal(before.chosen, after.chosen), "the delta is back on after the reference's forward"
    assert tuned.training and all(p.grad is None for p in tuned.deltas.parameters())


def test_full_fine_tuning_precomputes_the_reference_and_reuses_it_on_resume(word_pairs, tmp_path, monkeypatch) -> None:
    out = tmp_path / "full"
    cfg = run_config(word_pairs, out, method="full", steps=4, lr=1e-3)
    straight = dt.train(cfg)
    folder = out / REFERENCE_DIR
    assert (folder / REFERENCE_FILE).is_file() and (out / "deltatune.json").is_file(), "kept beside the artifact"
    saved = load_file(str(folder / REFERENCE_FILE))
    base = models.load(word_pairs[0]).eval()
    task = build(load_config(cfg)).task
    assert saved["train"].shape == (len(task.train), 2) and saved["eval"].shape == (len(task.eval), 2)
    with torch.no_grad():
        live = sequence_logps(base, task.collate(task.train))
    expected = torch.stack([live.chosen, live.rejected], 1)
    assert torch.allclose(saved["train"], expected, rtol=1e-6, atol=0), "precomputed = the live base, per pair"
    assert straight["final"]["eval_rewards/accuracies"] >= 0.0

    # resume: the reference is read back, not computed again (the delta would no longer be the base's)
    def refuse(*a, **k):
        raise AssertionError("the reference must be read back on resume")

    monkeypatch.setattr(PreferenceTask, "compute_reference", refuse)
    for c in sorted((out / "checkpoints").iterdir())[1:]:
        shutil.rmtree(c)
    uninterrupted = (out / "delta.safetensors").read_bytes()
    resumed = dt.train(cfg, resume=True)
    assert resumed["resumed_from"] == 2 and (out / "delta.safetensors").read_bytes() == uninterrupted

    # a file of other pairs (the data changed under the run) is refused, never silently used
    meta = json.loads((folder / REFERENCE_META).read_text())
    (folder / REFERENCE_META).write_text(json.dumps({**meta, "key": "0" * 64}))
    with pytest.raises(DeltatuneError, match="reference log-probs of other pairs"):
        dt.train(cfg, resume=True)


def test_a_dpo_run_resumes_bit_identical_and_logs_the_metrics(word_pairs, tmp_path) -> None:
    cfg = run_config(word_pairs, tmp_path / "dpo", method={"name": "lora", "r": 4, "dropout": 0.1})
    straight, _ = train_then_resume(cfg, keep=1)
    history = straight["history"]
    assert abs(history[0]["loss"] - LOG2) < 1e-6, "dropout off and B = 0: the policy is the reference at step 0"
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        assert all(key in h for h in history), key
    lines = [json.loads(line) for line in (tmp_path / "dpo" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rewards/margins"] for r in lines] == [h["rewards/margins"] for h in history]
    assert "eval_rewards/accuracies" in lines[2] and "eval_rewards/margins" in lines[-1]
    assert not (tmp_path / "dpo" / REFERENCE_DIR).exists(), "a switchable delta needs no stored reference"


@pytest.mark.parametrize("objective", ["dpo", "ipo", {"name": "simpo", "beta": 2.0}, "orpo"],
                         ids=["dpo", "ipo", "simpo", "orpo"])
def test_every_objective_lowers_its_loss_in_the_native_loop(word_pairs, tmp_path, objective) -> None:
    # one batch of all 36 training pairs: each step is a full-batch step on the same loss
    summary = dt.train(run_config(word_pairs, tmp_path / "run", objective=objective, save_every=0, batch_size=36))
    losses = [h["loss"] for h in summary["history"]]
    assert losses[-1] < losses[0]
    at_init = {"dpo": LOG2, "ipo": 1 / (4 * 0.1**2)}.get(objective if isinstance(objective, str) else "")
    if at_init is not None:
        assert abs(losses[0] - at_init) < 1e-5 * at_init
    assert "eval_rewards/accuracies" in summary["final"]
    if objective == "orpo":
        assert {"nll_loss", "log_odds_ratio", "log_odds_chosen"} <= set(summary["history"][0])


def test_a_zeroth_order_policy_trains_dpo_from_forward_passes(word_pairs, tmp_path) -> None:
    summary = dt.train(run_config(word_pairs, tmp_path / "mezo", method="mezo", steps=3, lr=1e-3, save_every=0))
    assert all(math.isfinite(h["loss"]) for h in summary["history"])
    assert "rewards/margins" in summary["history"][0]
    assert (tmp_path / "mezo" / REFERENCE_DIR / REFERENCE_FILE).is_file(), "MeZO trains in place: stored reference"
    delta = load_file(str(tmp_path / "mezo" / "delta.safetensors"))
    assert any(bool(t.abs().sum() > 0) for t in delta.values()), "the SPSA steps moved the weights"


def test_dpo_under_the_trainer_logs_trl_metrics(word_pairs, tmp_path) -> None:
    from transformers import TrainingArguments

    from deltatune.train.hf import DeltaTuneTrainer

    folder, path = word_pairs
    tokenizer = models.load_tokenizer(folder)
    for method in ("lora", "full"):
        task = build_task(DataConfig(path=path, task="preference", max_length=16, eval_fraction=0.25), tokenizer,
                          models.load(folder))
        tuned = dt.attach(models.load(folder), method, **({"r": 4} if method == "lora" else {}))
        args = TrainingArguments(output_dir=str(tmp_path / method), max_steps=3, per_device_train_batch_size=4,
                                 learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1,
                                 disable_tqdm=True, seed=0)
        trainer = DeltaTuneTrainer(model=tuned, args=args, train_dataset=task.train, eval_dataset=task.eval,
                                   data_collator=task.collate, objective={"name": "dpo", "beta": 0.1})
        assert ("ref" in task.train[0]) == (method == "full"), "in place: the reference precomputed into the pairs"
        trainer.train()
        logged = [h for h in trainer.state.log_history if "loss" in h]
        assert abs(logged[0]["loss"] - LOG2) < 1e-4 and "rewards/margins" in logged[0]
        metrics = trainer.evaluate()
        assert {"eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"} <= set(metrics)


def test_labelled_pairs_share_the_classification_prompt_and_split(smol_tokenizer) -> None:
    options = {"name": "tweets", "labels": ["negative", "positive"], "max_length": 64, "max_train": 24, "max_eval": 12}
    model = tiny_llama()
    pref = build_task(DataConfig(task="preference", **options), smol_tokenizer, model)
    cls = build_task(DataConfig(task="classification", **options), smol_tokenizer, model)
    assert len(pref.eval) == len(cls.eval) == 12
    words = {0: " negative", 1: " positive"}
    same = 0
    for p, c in zip(pref.eval, cls.eval, strict=True):
        # the text is cut (never the prompt around it) so that the longest label word and EOS fit as well
        assert len(p["prompt_ids"]) + len(p["chosen_ids"]) <= 64 and p["prompt_ids"][-4:] == c["input_ids"][-4:]
        if len(c["input_ids"]) + len(p["chosen_ids"]) <= 64:
            assert p["prompt_ids"] == c["input_ids"], "the prompt the classification task scores"
            same += 1
        assert smol_tokenizer.decode(p["chosen_ids"]) == words[c["label"]] + smol_tokenizer.eos_token
        assert smol_tokenizer.decode(p["rejected_ids"]) == words[1 - c["label"]] + smol_tokenizer.eos_token
        assert p["chosen_ids"][0] == int(cls.label_token_ids[c["label"]])
    assert same >= 6


# -- configs and bad input ---------------------------------------------------------------------------------------------
def test_bad_rows_get_errors_naming_the_row(tmp_path, smol_tokenizer) -> None:
    def build(rows: list[dict]) -> PreferenceTask:
        path = write_pairs(tmp_path / "p.jsonl", rows)
        return build_task(DataConfig(path=str(path), task="preference", eval_fraction=0.3), smol_tokenizer, tiny_llama())

    good = [{"prompt": f"p{i}", "chosen": " a", "rejected": " b"} for i in range(5)]
    with pytest.raises(DeltatuneError, match=r"row 3 of .*p\.jsonl has no 'rejected'"):
        build(good[:2] + [{"prompt": "p", "chosen": " a"}] + good[2:])
    with pytest.raises(DeltatuneError, match=r"row 1 .*'chosen' must be a non-empty text"):
        build([{"prompt": "p", "chosen": "", "rejected": " b"}] + good)
    with pytest.raises(DeltatuneError, match="in every one of the .* training pairs the chosen and rejected"):
        build([dict(r, rejected=r["chosen"]) for r in good])
    some = build([dict(r, rejected=r["chosen"]) if i % 2 else r for i, r in enumerate(good)])  # some equal: fine
    assert len(some.train) + len(some.eval) == 5


def test_the_objective_and_the_task_must_fit_before_anything_loads() -> None:
    base = {"model": "smollm2-135m", "method": "lora", "output": "runs/x"}
    preference = {"name": "tweets", "task": "preference", "labels": ["negative", "positive"]}
    classification = {"name": "tweets", "task": "classification"}
    assert parse_config({**base, "data": preference, "train": {"objective": {"name": "dpo", "beta": 0.2}}})
    with pytest.raises(DeltatuneError, match="train.objective 'dpo' trains on preference data, but data.task is "
                                             "'classification'; set data.task: preference"):
        parse_config({**base, "data": classification, "train": {"objective": "dpo"}})
    with pytest.raises(DeltatuneError, match="data.task 'preference' needs an objective made for it, not 'sft'"):
        parse_config({**base, "data": preference})
    bad = {"objective": {"name": "simpo", "beta": -1, "simpo_gama": 0.5}}
    with pytest.raises(DeltatuneError, match=r"train.objective.simpo_gama for simpo \(did you mean 'simpo_gamma'"):
        parse_config({**base, "data": preference, "train": bad})
    with pytest.raises(DeltatuneError, match="beta=-1 must be a finite number > 0"):
        parse_config({**base, "data": preference, "train": {"objective": {"name": "dpo", "beta": -1}}})
    with pytest.raises(DeltatuneError, match="unknown objective 'dop' \\(did you mean 'dpo'"):
        parse_config({**base, "data": preference, "train": {"objective": "dop"}})
    with pytest.raises(DeltatuneError, match="data.packing does not apply to task 'preference'"):
        DataConfig(name="tweets", task="preference", packing=True)


def test_trl_defaults_and_every_option_is_documented() -> None:
    assert (DPO().beta, IPO().beta, ORPO().beta) == (0.1, 0.1, 0.1)
    simpo = SimPO()
    assert (simpo.beta, simpo.simpo_gamma, simpo.cpo_alpha, simpo.label_smoothing) == (0.1, 0.5, 0.0, 0.0)
    assert all(o().disable_dropout for o in (DPO, IPO, SimPO, ORPO))
    doc = (ROOT / "docs" / "preference.md").read_text()
    for name in objectives.names():
        assert f"`{name}`" in doc, name
        for option in (f.name for f in dataclasses.fields(objectives.get(name).options)):
            assert f"`{option}`" in doc, f"{name}.{option}"
    assert load_config(ROOT / "examples" / "dpo.yaml").train.objective == {"name": "dpo", "beta": 0.1}


def test_cli_eval_takes_the_runs_objective_or_the_one_given(word_pairs, tmp_path) -> None:
    """``deltatune eval`` on a DPO run's artifact finds data and objective in its checkpoint; --objective gives
    another β (the rewards scale with β, so the margins scale too); a bad --objective is one line."""
    from typer.testing import CliRunner

    from deltatune.cli.main import app

    cfg = run_config(word_pairs, tmp_path / "dpo", objective={"name": "dpo", "beta": 0.1}, steps=4, save_every=4)
    dt.train(cfg)
    runner = CliRunner()
    own = runner.invoke(app, ["eval", str(tmp_path / "dpo"), "--json"])
    assert own.exit_code == 0, own.output
    doubled = runner.invoke(app, ["eval", str(tmp_path / "dpo"), "--json", "--objective", '{"name": "dpo", "beta": 0.2}'])
    assert doubled.exit_code == 0, doubled.output
    a, b = json.loads(own.output), json.loads(doubled.output)
    assert a["rewards/margins"] != 0
    assert math.isclose(b["rewards/margins"], 2 * a["rewards/margins"], rel_tol=1e-5)
    bad = runner.invoke(app, ["eval", str(tmp_path / "dpo"), "--objective", "{beta: 1"])
    assert bad.exit_code != 0 and "neither a name nor a JSON mapping" in bad.output
