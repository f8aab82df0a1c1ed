"""GRPO wired into training (issue 21): ``train.objective: grpo`` on ``data.task: prompts``.

A native-loop run through ``dt.train`` on a tiny random Phi saved with SmolLM2's tokenizer (its metrics in
``logs/metrics.jsonl``, ``metrics.csv`` and TensorBoard, the eval reward judging early stopping), exact resume from a
checkpoint half way (the sampling RNG is part of the state), a zeroth-order method refused before anything trains,
``DeltaTuneTrainer`` with the GRPO objective logging TRL's ``reward``, and the data config's errors.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import train_then_resume

import deltatune as dt
from deltatune.data import models
from deltatune.data.config import DataConfig
from deltatune.data.grpo import GRPOTask
from deltatune.data.tasks import build_task
from deltatune.errors import DeltatuneError
from deltatune.train.config import load_config

ROOT = Path(__file__).resolve().parent.parent
EOS = 2  # SmolLM2's <|im_end|>
REWARDS = [{"name": "length", "target": 3}]  # learnable: how soon EOS comes; cheap: no text parsing




@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, smol_tok) -> tuple[str, str]:
    """A tiny random Phi over SmolLM2's vocabulary (Phi: its LM head has a bias), saved with SmolLM2's tokenizer,
    and 24 prompts with answers. EOS's bias makes about one token in five an EOS, so completions end at every
    length up to the limit: the length reward differs within groups."""
    from transformers import PhiConfig, PhiForCausalLM

    root = tmp_path_factory.mktemp("grpo-run")
    torch.manual_seed(0)
    cfg = PhiConfig(vocab_size=len(smol_tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=2, eos_token_id=EOS, bos_token_id=1, pad_token_id=smol_tok.pad_token_id,
                    resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    model = PhiForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.bias.zero_()
        model.lm_head.bias[EOS] = 9.0
    model.save_pretrained(root / "model")
    smol_tok.save_pretrained(root / "model")
    rows = [{"prompt": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1)} for i in range(24)]
    path = root / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root / "model"), str(path)


def run_config(grpo_run: tuple[str, str], out: Path, method: dict | str = "lora", objective: Any = None,
               **train: Any) -> dict:
    folder, path = grpo_run
    return {
        "model": folder,
        "data": {"path": path, "task": "prompts", "max_length": 32, "eval_fraction": 0.25, "max_eval": 4},
        "method": method if isinstance(method, dict) else {"name": method},
        "train": {"objective": objective or {"name": "grpo", "num_generations": 4, "max_completion_length": 8,
                                             "rewards": REWARDS},
                  "steps": 4, "batch_size": 2, "lr": 1e-2, "save_every": 2, "keep_last": 4, "eval_every": 2,
                  "progress": False, **train},
        "output": str(out),
    }


def lines(out: Path, name: str = "metrics.jsonl") -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "logs" / name).read_text().splitlines()]


# ---------------------------------------------------------------- the native loop


def test_a_grpo_run_logs_trls_metrics_everywhere_and_judges_by_the_eval_reward(grpo_run, tmp_path) -> None:
    out = tmp_path / "run"
    cfg = run_config(grpo_run, out, report_to=["csv", "tensorboard"], grad_accum=2,
                     early_stopping={"patience": None})
    assert load_config(cfg).train.early_stopping.metric == "eval_reward", "GRPO's eval has a reward, no loss"
    summary = dt.train(cfg)
    history = summary["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "rewards/length/mean", "rewards/length/std",
                "entropy", "clip_ratio/region_mean", "completions/mean_length", "completions/min_length",
                "completions/max_length", "completions/clipped_ratio"):
        assert all(key in h and math.isfinite(h[key]) for h in history), key
    for h in history:
        # the length reward of a completion of L tokens is max(0, 1 - |L - 3| / 3): the step's mean reward lies
        # between the rewards of its shortest and longest completions' lengths, which lie in [1, 8]
        assert 0.0 <= h["reward"] <= 1.0
        assert 1 <= h["completions/min_length"] <= h["completions/mean_length"] <= h["completions/max_length"] <= 8
        assert h["clip_ratio/region_mean"] == 0.0, "one update per generation: ratio 1, nothing clipped"
        assert "kl" not in h, "beta 0: no reference pass"
    assert "eval_loss" not in history[1] and {"eval_reward", "eval_rewards/length/mean"} <= set(history[1])
    assert lines(out) == history, "metrics.jsonl holds every step's GRPO metrics"
    completions = lines(out, "completions.jsonl")
    for h in history:
        # every completion of both micro-batches (2 prompts x 4 samples each), whose rewards average to the step's
        train = [c for c in completions if c["step"] == h["step"] and c["split"] == "train"]
        assert len(train) == 2 * 2 * 4 and all(isinstance(c["completion"], str) for c in train)
        assert sum(c["reward"] for c in train) / len(train) == pytest.approx(h["reward"], rel=1e-6)
        assert all(c["rewards"]["length"] == c["reward"] for c in train), "one reward function, weight 1"
        evaluated = [c for c in completions if c["step"] == h["step"] and c["split"] == "eval"]
        if "eval_reward" in h:  # the 4 eval prompts' greedy completions
            assert len(evaluated) == 4
            assert sum(c["reward"] for c in evaluated) / 4 == pytest.approx(h["eval_reward"], rel=1e-6)
        else:
            assert evaluated == []
    with open(out / "logs" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["reward"]) for r in rows] == pytest.approx([h["reward"] for h in history], rel=1e-12)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "tensorboard"))
    events.Reload()
    rewards = [e.value for e in events.Scalars("train/reward")]
    assert rewards == pytest.approx([h["reward"] for h in history], rel=1e-6)
    assert [e.step for e in events.Scalars("eval/reward")] == [2, 4]
    best = max((h for h in history if "eval_reward" in h), key=lambda h: (h["eval_reward"], -h["step"]))
    assert summary["best"]["metric"] == "eval_reward" and summary["best"]["value"] == best["eval_reward"]


def test_the_reward_rises_when_it_is_learnable(grpo_run, tmp_path) -> None:
    """The length reward with target 8 (the limit) pays for not stopping: L / 8. BitFit trains the LM head's bias,
    so GRPO's gradient can lower EOS's bias wherever a longer completion beat its group; over 12 steps the mean
    reward rises (from about 0.54 over the first three steps to about 0.78 over the last three on this seed)."""
    objective = {"name": "grpo", "num_generations": 4, "max_completion_length": 8,
                 "rewards": [{"name": "length", "target": 8}]}
    summary = dt.train(run_config(grpo_run, tmp_path / "learn", method="bitfit", objective=objective, steps=12,
                                  batch_size=4, lr=0.3, save_every=0, eval_every=0))
    rewards = [h["reward"] for h in summary["history"]]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.1, rewards


def test_a_grpo_run_resumes_bit_identical(grpo_run, tmp_path) -> None:
    cfg = run_config(grpo_run, tmp_path / "resume", method={"name": "lora", "r": 2}, eval_every=0)
    logged: list[list[dict[str, Any]]] = []
    straight, resumed = train_then_resume(cfg, keep=1, inspect=lambda _: logged.append(lines(Path(cfg["output"]),
                                                                                               "completions.jsonl")))
    assert lines(Path(cfg["output"]), "completions.jsonl") == logged[0], \
        "the resumed run's completions log is cut back to its checkpoint and goes on with the same samples"
    assert resumed["resumed_from"] == 2
    # the steps after the checkpoint sampled the same completions: the same rewards, bit for bit
    assert [h["reward"] for h in resumed["history"]] == [h["reward"] for h in straight["history"]]


def test_a_zeroth_order_method_is_refused_before_anything_loads(grpo_run, tmp_path) -> None:
    with pytest.raises(DeltatuneError, match=r"grpo needs gradients .* 'mezo' trains from forward passes"):
        load_config(run_config(grpo_run, tmp_path / "mezo", method="mezo"))
    assert not (tmp_path / "mezo").exists()


def test_a_zeroth_order_policy_is_refused_by_the_loop_too(grpo_run, tmp_path, monkeypatch) -> None:
    """The config check reads the method's trait; the loop asks its policy (a policy that takes whole steps)."""
    from deltatune.data import objectives

    monkeypatch.setattr(objectives, "method_problem", lambda *a, **k: None)
    with pytest.raises(DeltatuneError, match="trains from forward passes"):
        dt.train(run_config(grpo_run, tmp_path / "mezo", method="mezo"))


# ---------------------------------------------------------------- DeltaTuneTrainer


def test_grpo_under_the_trainer_logs_the_reward(grpo_run, smol_tok, tmp_path) -> None:
    from transformers import TrainingArguments

    from deltatune.train.hf import DeltaTuneTrainer

    folder, path = grpo_run
    objective = {"name": "grpo", "num_generations": 4, "max_completion_length": 8, "rewards": REWARDS}
    base = models.load(folder)
    task = build_task(DataConfig(path=path, task="prompts", max_length=32, eval_fraction=0.25, max_eval=4),
                      smol_tok, base, objective=objective)
    assert isinstance(task, GRPOTask)
    tuned = dt.attach(base, "lora", r=2)
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=2, per_device_train_batch_size=2,
                             per_device_eval_batch_size=4, learning_rate=1e-2, logging_steps=1, eval_strategy="steps",
                             eval_steps=2, save_strategy="no", report_to=[], use_cpu=True, seed=0)
    trainer = DeltaTuneTrainer(model=tuned, args=args, objective="grpo", task=task, train_dataset=task.train,
                               eval_dataset=task.eval)
    trainer.train()
    logs = trainer.state.log_history
    train_logs = [entry for entry in logs if "loss" in entry]
    assert len(train_logs) == 2
    for entry in train_logs:
        assert 0.0 <= entry["reward"] <= 1.0 and "rewards/length/mean" in entry and "completions/mean_length" in entry
    evals = [entry for entry in logs if "eval_reward" in entry]
    assert evals and "eval_loss" not in evals[0] and 0.0 <= evals[0]["eval_reward"] <= 1.0
    assert (tmp_path / "hf" / "deltatune" / "deltatune.json").is_file()


def test_the_trainer_refuses_grpo_without_its_task_and_with_a_zeroth_order_method(grpo_run, smol_tok,
                                                                                    tmp_path) -> None:
    from transformers import TrainingArguments

    from deltatune.train.hf import DeltaTuneTrainer

    folder, path = grpo_run
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(DeltatuneError, match="task=build_task"):
        DeltaTuneTrainer(model=dt.attach(models.load(folder), "lora", r=2), args=args, objective="grpo")
    base = models.load(folder)
    task = build_task(DataConfig(path=path, task="prompts", max_length=32), smol_tok, base,
                      objective={"name": "grpo", "rewards": REWARDS})
    with pytest.raises(DeltatuneError, match="trains from forward passes"):
        DeltaTuneTrainer(model=dt.attach(base, "mezo"), args=args, objective="grpo", task=task)


# ---------------------------------------------------------------- data config errors


def test_data_config_errors_name_the_key(grpo_run, smol_tok, tmp_path) -> None:
    folder, path = grpo_run
    with pytest.raises(DeltatuneError, match="holds labelled texts, not prompts.*set data.path"):
        DataConfig(name="tweets", task="prompts")
    with pytest.raises(DeltatuneError, match="data.packing does not apply to task 'prompts'"):
        DataConfig(path=path, task="prompts", packing=True)
    DataConfig(path=path, task="prompts", chat_template="{{ messages }}")  # chat prompts may bring a template
    # a preference objective on prompts, GRPO on preference pairs, the default sft on prompts
    cfg = run_config(grpo_run, tmp_path / "x", objective="dpo")
    with pytest.raises(DeltatuneError, match="'dpo' trains on preference data, but data.task is 'prompts'"):
        load_config(cfg)
    cfg = run_config(grpo_run, tmp_path / "x")
    cfg["data"]["task"] = "preference"
    with pytest.raises(DeltatuneError, match="'grpo' trains on prompts data, but data.task is 'preference'; "
                                             r"set data.task: prompts \(rows with a prompt"):
        load_config(cfg)
    cfg = run_config(grpo_run, tmp_path / "x", objective="sft")
    with pytest.raises(DeltatuneError, match="data.task 'prompts' needs an objective made for it.*grpo"):
        load_config(cfg)
    # building the task without the objective (its reward functions) says what to pass
    with pytest.raises(DeltatuneError, match="train.objective grpo and its reward functions"):
        build_task(DataConfig(path=path, task="prompts"), smol_tok, models.load(folder))


def test_the_example_config_reads() -> None:
    cfg = load_config(ROOT / "examples" / "grpo.yaml")
    assert cfg.data.task == "prompts" and cfg.train.objective["name"] == "grpo"
    assert [r if isinstance(r, str) else r["name"] for r in cfg.train.objective["rewards"]] == ["numeric", "format"]


def test_the_results_script_scores_the_base_and_the_artifact_and_draws_the_reward(grpo_run, tmp_path) -> None:
    """scripts/grpo_results.py reads a finished run's config from its checkpoint: its "after" is what `deltatune
    eval` gives the artifact, its "before" the same prompts with the delta off (a LoRA whose B is zero: the base)."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cfg = run_config(grpo_run, out, method={"name": "lora", "r": 2}, steps=2, eval_every=2)
    summary = dt.train(cfg)
    objective = cfg["train"]["objective"]
    untrained = tmp_path / "untrained"  # a fresh LoRA: B = 0, so exactly the base model
    dt.attach(AutoModelForCausalLM.from_pretrained(grpo_run[0]), "lora", r=2).save(untrained)
    script = ROOT / "scripts" / "grpo_results.py"
    done = subprocess.run([sys.executable, str(script), "--run", str(out), "--out", str(tmp_path / "results")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "results" / "grpo-results.json").read_text())
    after = dt.eval(str(out), cfg["data"], objective=objective)
    assert results["after"]["reward"] == pytest.approx(after["reward"], rel=1e-6)
    assert results["after"]["reward"] == pytest.approx(summary["history"][-1]["eval_reward"], rel=1e-6)
    base = dt.eval(str(untrained), cfg["data"], objective=objective)
    assert results["before"]["reward"] == pytest.approx(base["reward"], rel=1e-6)
    assert len(results["completions"]) == 4, "every held-out prompt, before and after"
    assert (tmp_path / "results" / "grpo-reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| base model (before) |" in (tmp_path / "results" / "grpo-results.md").read_text()
