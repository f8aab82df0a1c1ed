"""GRPO (deltatune.data.grpo) and its reward functions (deltatune.data.rewards).

The loss pieces against the spec's hand computations (advantages, clipping, k3, aggregation), the options
against TRL's GRPOConfig defaults, each built-in reward on hand cases, and the task end to end on a tiny random
Llama with SmolLM2's tokenizer: EOS masking (the scored tokens decoded), the gradient reaching a LoRA delta,
sampling that repeats from the torch RNG state, reward errors, and the KL term against the delta-off base.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.core.policy import Policy
from deltatune.data import rewards
from deltatune.data.config import DataConfig
from deltatune.data.grpo import (
    GRPOOptions,
    aggregate,
    build_prompts_task,
    clipped_token_loss,
    completion_mask,
    encode_prompt,
    group_advantages,
    grpo_refusal,
    k3,
    masked_mean,
)
from deltatune.errors import DeltatuneError

TASK = "prompts"  # the data task GRPO reads
EOS = 2  # SmolLM2's <|im_end|>


# ---------------------------------------------------------------- the loss pieces (spec CPU tests 7-10)


def test_group_advantages_match_the_hand_computation() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    a, std = group_advantages(r, 4, "group")
    # mean 0.25, Bessel std 0.5: (r - 0.25) / (0.5 + 1e-4) = [1.49970, -0.49990 x 3] (the spec writes 1.4994 and
    # -0.4998, 3e-4 and 1e-4 off: 0.75 / 0.5001 = 1.49970)
    assert torch.allclose(a, torch.tensor([0.75 / 0.5001] + [-0.25 / 0.5001] * 3), atol=1e-6)
    assert torch.allclose(a, torch.tensor([1.4994, -0.4998, -0.4998, -0.4998]), atol=5e-4)
    assert torch.allclose(std, torch.full((4,), 0.5))
    a, std = group_advantages(torch.full((4,), 0.7), 4, "group")
    assert torch.equal(a, torch.zeros(4)) and torch.equal(std, torch.zeros(4))
    a, _ = group_advantages(r, 4, "none")
    assert torch.allclose(a, torch.tensor([0.75, -0.25, -0.25, -0.25]))
    # two groups, "batch": each group's own mean, the batch's std
    two = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 0.0, 0.0])
    a, std = group_advantages(two, 4, "batch")
    batch_std = two.std()  # Bessel over all 8
    expect = (two - torch.tensor([0.25] * 4 + [1.0] * 4)) / (batch_std + 1e-4)
    assert torch.allclose(a, expect) and torch.allclose(std, batch_std.expand(8))


def test_nanstd_is_trls() -> None:
    from trl.trainer.utils import nanstd as trl_nanstd

    from deltatune.data.grpo import nanstd

    x = torch.tensor([[1.0, math.nan, 0.0, 3.5], [math.nan, math.nan, 2.0, math.nan], [0.1, 0.2, 0.3, 0.4]])
    for dim in (None, 0, 1):
        ours = nanstd(x) if dim is None else nanstd(x, dim=dim)
        theirs = trl_nanstd(x) if dim is None else trl_nanstd(x, dim=dim)
        assert torch.allclose(ours, theirs, equal_nan=True), dim


def test_advantages_leave_unscored_completions_out() -> None:
    r = torch.tensor([1.0, math.nan, 0.0, 0.0])
    a, _ = group_advantages(r, 4, "group")
    vals = torch.tensor([1.0, 0.0, 0.0])
    expect = (vals - vals.mean()) / (vals.std() + 1e-4)  # mean and std of the three scored ones
    assert a[1] == 0.0
    assert torch.allclose(a[[0, 2, 3]], expect)


def test_clipping_at_ratio_1_5_and_0_5() -> None:
    old = torch.zeros(2)
    logp = torch.log(torch.tensor([1.5, 0.5])).requires_grad_(True)
    loss, ratio = clipped_token_loss(logp, old, torch.tensor([1.0, 1.0]), 0.2, 0.2)
    assert torch.allclose(ratio, torch.tensor([1.5, 0.5]))
    assert torch.allclose(loss, torch.tensor([-1.2, -0.5]))
    loss.sum().backward()
    # ρ = 1.5, A = +1: clipped to 1.2, no gradient; ρ = 0.5: unclipped, d(-ρA)/dlogp = -ρ = -0.5
    assert torch.allclose(logp.grad, torch.tensor([0.0, -0.5]))
    # a negative advantage clips the low side: ρ = 0.5, A = -1 -> -min(-0.5, -0.8) = 0.8, no gradient
    logp2 = torch.log(torch.tensor([0.5])).requires_grad_(True)
    loss2, _ = clipped_token_loss(logp2, torch.zeros(1), torch.tensor([-1.0]), 0.2, 0.28)
    assert torch.allclose(loss2, torch.tensor([0.8]))
    loss2.sum().backward()
    assert logp2.grad.abs().item() == 0.0


def test_k3_is_zero_at_equality_positive_otherwise_and_estimates_kl() -> None:
    x = torch.tensor([-1.0, -2.5, -0.1])
    assert torch.equal(k3(x, x), torch.zeros(3))
    assert bool((k3(x, x + torch.tensor([0.3, -0.7, 1.0])) > 0).all())
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])
    exact = float((p * (p / q).log()).sum())
    draws = torch.multinomial(p, 400_000, replacement=True, generator=torch.Generator().manual_seed(0))
    values = k3(p.log()[draws], q.log()[draws])
    stderr = float(values.std()) / math.sqrt(len(values))
    assert abs(float(values.mean()) - exact) < 4 * stderr, (float(values.mean()), exact, stderr)


def test_aggregation_by_loss_type() -> None:
    # lengths 2 and 6 (width 8), per-token loss 1 in the first and 0 in the second
    mask = torch.zeros(2, 8)
    mask[0, :2], mask[1, :6] = 1, 1
    loss = torch.stack([torch.ones(8), torch.zeros(8)])
    assert aggregate(loss, mask, "grpo", 8).item() == pytest.approx(0.5)
    assert aggregate(loss, mask, "bnpo", 8).item() == pytest.approx(0.25)
    assert aggregate(loss, mask, "dapo", 8).item() == pytest.approx(0.25)
    assert aggregate(loss, mask, "dr_grpo", 8).item() == pytest.approx(2 / 16)
    assert aggregate(loss, mask, "dapo", 8, num_items=16).item() == pytest.approx(2 / 16)


def test_completion_mask_keeps_the_first_eos_and_nothing_after() -> None:
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [9, 0, 5, 5, 5]])
    mask, ended = completion_mask(ids, [2, 0])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


# ---------------------------------------------------------------- options


def test_option_defaults_are_trls() -> None:
    from trl import GRPOConfig

    trl_defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    ours = GRPOOptions(rewards=["numeric"])  # TRL has no default reward either
    for name in ("num_generations", "max_completion_length", "temperature", "top_p", "top_k", "epsilon",
                 "epsilon_high", "beta", "scale_rewards", "loss_type", "num_iterations",
                 "mask_truncated_completions"):
        assert getattr(ours, name) == trl_defaults[name], name


@pytest.mark.parametrize("values, words", [
    ({"num_generation": 4}, ["unknown option 'num_generation'", "num_generations"]),
    ({"num_generations": 1}, ["num_generations=1", "at least 2"]),
    ({"loss_type": "ppo"}, ["loss_type='ppo'", "dapo"]),
    ({"scale_rewards": True}, ["scale_rewards=True", "group"]),
    ({"num_iterations": 2}, ["num_iterations=2", "set 1"]),
    ({"temperature": 0}, ["temperature=0", "above 0"]),
    ({"rewards": ["numeric", "format"]}, ["'format' needs the option 'pattern'"]),
    ({"rewards": ["numric"]}, ["unknown reward 'numric'", "did you mean 'numeric'"]),
    ({"rewards": ["numeric"], "reward_weights": [1.0, 2.0]}, ["reward_weights", "list of 1 numbers"]),
    ({"rewards": [{"name": "length", "target": 10, "units": "chars"}]}, ["unknown option 'units'", "unit"]),
    ({}, ["needs reward functions", "train.objective.rewards"]),
    ({"name": "dpo", "rewards": ["numeric"]}, ["name='dpo'"]),
])
def test_bad_options_are_refused_with_the_fix(values: dict, words: list[str]) -> None:
    with pytest.raises(DeltatuneError) as e:
        GRPOOptions.from_dict(values)
    for w in words:
        assert w in str(e.value)


def test_from_dict_takes_the_objective_section() -> None:
    o = GRPOOptions.from_dict({"name": "grpo", "beta": 0.04, "rewards": "numeric", "epsilon_high": 0.28})
    assert o.rewards == ["numeric"] and o.beta == 0.04 and o.epsilon_low == 0.2 and o.epsilon_upper == 0.28
    assert o.weights() == [1.0]


def test_a_method_that_takes_whole_steps_is_refused() -> None:
    assert grpo_refusal(Policy()) is None
    tuned = dt.attach(tiny_model(), "mezo")
    why = grpo_refusal(tuned.policy, "mezo")
    assert why is not None and "'mezo'" in why and "needs gradients" in why
    assert grpo_refusal(dt.attach(tiny_model(), "lora", r=2).policy) is None


# ---------------------------------------------------------------- rewards


def call(spec: Any, texts: list[str], **columns: Any) -> list[float]:
    reward = rewards.resolve(spec)
    ids = columns.pop("completion_ids", [[0] * len(t) for t in texts])
    return reward({"prompts": ["p"] * len(texts), "completions": texts, "completion_ids": ids, **columns},
                  len(texts))


def test_exact_reward() -> None:
    texts = ["The answer is 42.", "\\boxed{41}", "  42 \n", "forty-two", "x"]
    got = call("exact", texts, answer=["42", "42", "42", "42", None])
    assert got[:4] == [1.0, 0.0, 1.0, 0.0] and math.isnan(got[4])
    assert call({"name": "exact", "field": "solution"}, ["so #### 7"], solution=["7"]) == [1.0]


def test_numeric_reward() -> None:
    texts = ["17 + 25 = 42", "it is 42.0000001", "41.9", "\\boxed{42 apples}", "no number", "1,000 then 42"]
    assert call("numeric", texts, answer=[42] * 6) == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert call({"name": "numeric", "tolerance": 0.5}, ["41.9"], answer=["42"]) == [1.0]
    assert call({"name": "numeric", "tolerance": 0}, ["42.0000001"], answer=["42"]) == [0.0]
    # a sampled "(42" stopped a run (SymPy's tokenizer raised): the number in it is read, never an error
    assert call("numeric", ["The answer is (42", "The answer is (42).", "so 7)"], answer=["42"] * 3) == [1.0] * 2 + [0.0]
    with pytest.raises(DeltatuneError, match="not a number"):
        call("numeric", ["42"], answer=["forty"])


def test_format_reward() -> None:
    texts = ["so \\boxed{5}", "no box", "\\boxed{}"]
    assert call({"name": "format", "pattern": r"\\boxed\{.+\}"}, texts) == [1.0, 0.0, 0.0]
    spec = {"name": "format", "pattern": r"(?s)<think>.*</think>\s*\d+", "match": "fullmatch"}
    assert call(spec, ["<think>a\nb</think> 7", "x <think></think> 7", "<think></think> 7 more"]) == [1.0, 0.0, 0.0]
    with pytest.raises(DeltatuneError, match="not a valid regular expression"):
        rewards.resolve({"name": "format", "pattern": "(unclosed"})
    with pytest.raises(DeltatuneError, match="match='all'"):
        rewards.resolve({"name": "format", "pattern": "a", "match": "all"})


def test_length_reward() -> None:
    spec = {"name": "length", "target": 4}
    got = call(spec, ["a", "b", "c", "d"], completion_ids=[[1] * 4, [1] * 2, [1] * 8, [1] * 6])
    assert got == [1.0, 0.5, 0.0, 0.5]
    assert call({"name": "length", "target": 4, "unit": "chars"}, ["abcd", "ab", "abcdefghij"]) == [1.0, 0.5, 0.0]
    with pytest.raises(DeltatuneError, match="target=0"):
        rewards.resolve({"name": "length", "target": 0})


def test_chat_completions_are_read_as_their_text() -> None:
    assert call("exact", [[{"role": "assistant", "content": "42"}]], answer=["42"]) == [1.0]


def test_dotted_paths_load_and_bad_ones_say_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_rewards.py").write_text(
        "def has_answer(completions, answer):\n    return [float(a in c) for c, a in zip(completions, answer)]\n"
        "def scaled(completions, scale, **kwargs):\n    return [scale * len(c) for c in completions]\n"
        "NOT_A_FUNCTION = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    # only the arguments it names reach it (no prompts / completion_ids / other columns)
    assert call("my_rewards:has_answer", ["x 42", "x"], answer=["42", "42"], other=[1, 2]) == [1.0, 0.0]
    assert call("my_rewards.has_answer", ["42"], answer=["42"]) == [1.0]
    assert call({"name": "my_rewards:scaled", "scale": 0.5}, ["ab", "abcd"]) == [1.0, 2.0]
    for spec, words in [("no_such_module_xyz:f", "cannot import module"), ("my_rewards:missing", "has no 'missing'"),
                        ("my_rewards:NOT_A_FUNCTION", "not a function"), ("justaname", "unknown reward")]:
        with pytest.raises(DeltatuneError, match=words):
            rewards.resolve(spec)
    sys.modules.pop("my_rewards", None)


def test_reward_outputs_are_checked() -> None:
    out = rewards.checked_rewards("f", [1, None, True, float("nan")], 4)
    assert out[0] == 1.0 and math.isnan(out[1]) and out[2] == 1.0 and math.isnan(out[3])
    for out, words in [([1.0], "returned 1 rewards for 2"), ("ab", "returned str"), ([1.0, "x"], "'x'")]:
        with pytest.raises(DeltatuneError, match=words):
            rewards.checked_rewards("f", out, 2)


# ---------------------------------------------------------------- the task on a tiny model




def tiny_model(seed: int = 0, eos_boost: float = 0.0) -> LlamaForCausalLM:
    """A tiny random Llama over SmolLM2's vocabulary; ``eos_boost`` adds to EOS's logit so that completions end
    early (about 1 token in 5 at 9)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(cfg).eval()
    if eos_boost:
        bias = torch.zeros(cfg.vocab_size)
        bias[EOS] = eos_boost
        model.lm_head.register_forward_hook(lambda module, args, out: out + bias.to(out.dtype))
    return model


def prompt_rows() -> list[dict]:
    text = [{"prompt": f"What is {i} + {i + 1}? Answer:", "answer": str(2 * i + 1)} for i in range(8)]
    chat = [{"prompt": [{"role": "user", "content": f"What is {i} times 2?"}], "answer": str(2 * i)}
            for i in range(8)]
    return text + chat


def make_task(tmp_path: Path, tok: Any, rows: list[dict] | None = None, **options: Any):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (rows or prompt_rows())))
    options.setdefault("num_generations", 4)
    options.setdefault("max_completion_length", 10)
    options.setdefault("rewards", [chars])
    return build_prompts_task(DataConfig(path=str(path), task=TASK, eval_fraction=0.25), tok,
                              GRPOOptions.from_dict(options))


def chars(completions: list[Any], **_: Any) -> list[float]:
    """A reward that differs between random completions: the share of 'e' in the text."""
    texts = [rewards.completion_text(c) for c in completions]
    return [t.count("e") / max(len(t), 1) for t in texts]


def test_prompts_are_rendered_as_trl_renders_them(smol_tok: Any) -> None:
    chat = encode_prompt(smol_tok, [{"role": "user", "content": "What is 2 + 2?"}], 0)
    assert smol_tok.decode(chat).endswith("What is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
    assert encode_prompt(smol_tok, "What is 2 + 2?", 0) == smol_tok("What is 2 + 2?")["input_ids"]
    # a csv cell holding the messages as JSON is read as messages
    assert encode_prompt(smol_tok, json.dumps([{"role": "user", "content": "What is 2 + 2?"}]), 0) == chat
    with pytest.raises(DeltatuneError, match="row 3"):
        encode_prompt(smol_tok, 17, 2)


def test_data_errors_name_the_problem(tmp_path: Path, smol_tok: Any) -> None:
    with pytest.raises(DeltatuneError, match="no field 'prompt'"):
        make_task(tmp_path, smol_tok, rows=[{"question": "q", "answer": "1"}] * 8)
    with pytest.raises(DeltatuneError, match="set data.path"):
        build_prompts_task(DataConfig(name="tweets", task="text"), smol_tok,
                           GRPOOptions.from_dict({"rewards": ["numeric"]}))
    with pytest.raises(DeltatuneError, match="'answer' column"):
        make_task(tmp_path, smol_tok, rows=[{"prompt": "q"}] * 8, rewards=["numeric"])
    (tmp_path / "need.py").write_text("def needs(completions, solution):\n    return [0.0] * len(completions)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(DeltatuneError, match="requires 'solution'"):
            make_task(tmp_path, smol_tok, rewards=["need:needs"])
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("need", None)


def test_tokens_after_eos_are_masked_and_the_scored_tokens_decode_to_the_completion(
        tmp_path: Path, smol_tok: Any) -> None:
    task = make_task(tmp_path, smol_tok, max_completion_length=12)
    tuned = dt.attach(tiny_model(eos_boost=9.0), "lora", r=2)
    tuned.train()
    torch.manual_seed(0)
    task.loss(tuned, task.collate(task.train[:4]))
    r = task.last_rollout
    ended = r.terminated
    assert 0 < int(ended.sum()) < len(ended), "the seed should give both ended and cut completions"
    for ids, mask, done, text in zip(r.completion_ids, r.completion_mask, ended, r.texts, strict=True):
        n = int(mask.sum())
        if done:
            assert ids[n - 1] == EOS and EOS not in ids[: n - 1].tolist()  # the first EOS is the last scored
            assert bool((ids[n:] == task.pad_id).all()) and not bool(mask[n:].any())
        else:
            assert n == ids.shape[0] and EOS not in ids.tolist()
        assert text == smol_tok.decode(ids[:n].tolist(), skip_special_tokens=True)
    metrics = task.last_metrics
    assert metrics["completions/clipped_ratio"] == pytest.approx(float((~ended).float().mean()))
    assert metrics["completions/max_length"] <= 12
    assert [c["completion"] for c in task.last_completions] == r.texts


def test_mask_truncated_completions_takes_cut_ones_out_of_the_loss(tmp_path: Path, smol_tok: Any) -> None:
    task = make_task(tmp_path, smol_tok, max_completion_length=12, mask_truncated_completions=True)
    tuned = dt.attach(tiny_model(eos_boost=9.0), "lora", r=2)
    torch.manual_seed(0)
    task.loss(tuned, task.collate(task.train[:4]))
    r = task.last_rollout
    assert not bool(r.completion_mask[~r.terminated].any())
    assert bool(r.completion_mask[r.terminated].any(dim=1).all())
    assert task.last_metrics["completions/max_length"] == 12  # lengths are what was generated


def test_loss_is_finite_and_its_gradient_reaches_the_delta(tmp_path: Path, smol_tok: Any) -> None:
    task = make_task(tmp_path, smol_tok)
    tuned = dt.attach(tiny_model(), "lora", r=2)
    tuned.train()
    torch.manual_seed(1)
    loss, tokens = task.loss(tuned, task.collate(task.train[:3]))
    assert math.isfinite(float(loss.detach())) and tokens > 0
    loss.backward()
    grads = [p.grad for p in tuned.deltas.parameters() if p.requires_grad]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
    assert tuned.training and all(m.training for m in tuned.deltas.modules()), "sampling restores train mode"
    m = task.last_metrics
    for key in ("reward", "reward_std", "frac_reward_zero_std", "rewards/chars/mean", "rewards/chars/std",
                "entropy", "clip_ratio/region_mean", "completions/mean_length", "completions/clipped_ratio"):
        assert key in m and math.isfinite(m[key]), key
    assert "kl" not in m and m["clip_ratio/region_mean"] == 0.0  # one update per generation: ratio 1
    assert m["reward"] == pytest.approx(float(task.last_rollout.rewards.mean()))
    # the loss at ratio 1 is -Σ A over tokens / tokens (dapo): the advantages weighted by each completion's length
    r = task.last_rollout
    lengths = r.completion_mask.sum(-1).float()
    assert float(loss.detach()) == pytest.approx(float(-(r.advantages * lengths).sum() / lengths.sum()), abs=1e-6)


def test_sampling_repeats_from_the_torch_rng_state(tmp_path: Path, smol_tok: Any) -> None:
    task = make_task(tmp_path, smol_tok)
    tuned = dt.attach(tiny_model(eos_boost=6.0), "lora", r=2)
    tuned.train()
    batch = task.collate(task.train[:2])
    torch.manual_seed(3)
    task.loss(tuned, batch)
    first = task.last_rollout.completion_ids.clone()
    state = torch.get_rng_state()
    task.loss(tuned, batch)
    second = task.last_rollout.completion_ids.clone()
    assert not (first.shape == second.shape and torch.equal(first, second)), "the RNG moved on"
    torch.manual_seed(3)
    task.loss(tuned, batch)
    assert torch.equal(task.last_rollout.completion_ids, first)
    torch.set_rng_state(state)  # as a resumed run restores the checkpoint's state
    task.loss(tuned, batch)
    assert torch.equal(task.last_rollout.completion_ids, second)


def test_a_reward_that_raises_names_itself_and_the_row(tmp_path: Path, smol_tok: Any) -> None:
    def picky(completions: list[Any], answer: list[str], **_: Any) -> list[float]:
        if "3" in answer:
            raise ValueError("cannot score this one")
        return [0.0] * len(completions)

    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(8)]
    task = make_task(tmp_path, smol_tok, rows=rows, rewards=[chars, picky])
    tuned = dt.attach(tiny_model(), "lora", r=2)
    row3 = next(f for f in task.train + task.eval if f["row"] == 3)
    other = next(f for f in task.train if f["row"] != 3)
    with pytest.raises(DeltatuneError) as e:
        task.loss(tuned, task.collate([other, row3]))
    message = str(e.value)
    assert "'picky'" in message and "row 4 of the data" in message and "cannot score this one" in message


def test_all_nan_rewards_are_an_error_and_partial_none_is_left_out(tmp_path: Path, smol_tok: Any) -> None:
    rows = [{"prompt": f"q{i}", "answer": (str(i) if i % 2 else None)} for i in range(12)]
    tuned = dt.attach(tiny_model(), "lora", r=2)

    def nothing(completions: list[Any], **_: Any) -> list[float]:
        return [math.nan] * len(completions)

    task = make_task(tmp_path, smol_tok, rows=rows, rewards=[nothing])
    with pytest.raises(DeltatuneError, match="nothing to learn from"):
        task.loss(tuned, task.collate(task.train[:2]))
    # exact gives None where the answer is missing; with a second reward those rows get the second one only
    task = make_task(tmp_path, smol_tok, rows=rows, rewards=["exact", chars], reward_weights=[2.0, 0.5])
    feats = [next(f for f in task.train if rows[f["row"]]["answer"] is None),
             next(f for f in task.train if rows[f["row"]]["answer"] is not None)]
    torch.manual_seed(0)
    task.loss(tuned, task.collate(feats))
    r = task.last_rollout
    missing = torch.tensor([rows[i]["answer"] is None for i in r.rows])
    assert bool(torch.isnan(r.per_function[missing, 0]).all()) and not bool(torch.isnan(r.per_function[~missing, 0]).any())
    assert torch.allclose(r.rewards[missing], 0.5 * r.per_function[missing, 1])
    assert torch.allclose(r.rewards[~missing], 2.0 * r.per_function[~missing, 0] + 0.5 * r.per_function[~missing, 1])
    assert task.last_metrics["rewards/exact/mean"] == pytest.approx(float(r.per_function[~missing, 0].mean()))
    # with exact alone, the rows without an answer are unscored: no reward, advantage 0
    task = make_task(tmp_path, smol_tok, rows=rows, rewards=["exact"])
    torch.manual_seed(0)
    task.loss(tuned, task.collate(feats))
    r = task.last_rollout
    missing = torch.tensor([rows[i]["answer"] is None for i in r.rows])
    assert bool(torch.isnan(r.rewards[missing]).all()) and bool((r.advantages[missing] == 0).all())
    assert task.last_metrics["frac_reward_unscored"] == pytest.approx(0.5)


def test_kl_uses_the_delta_off_base_and_is_zero_at_init(tmp_path: Path, smol_tok: Any) -> None:
    task = make_task(tmp_path, smol_tok, beta=0.1)
    model = tiny_model()
    base = copy.deepcopy(model)
    tuned = dt.attach(model, "lora", r=2)
    tuned.train()
    batch = task.collate(task.train[:2])
    torch.manual_seed(0)
    loss, _ = task.loss(tuned, batch)
    assert task.last_metrics["kl"] == 0.0, "a fresh delta is a no-op: the policy is the reference"
    loss.backward()
    with torch.no_grad():  # move the delta away from the base
        for p in tuned.deltas.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    torch.manual_seed(0)
    loss, _ = task.loss(tuned, batch)
    loss.backward()  # the reference pass left the graph intact
    assert tuned.attached
    r = task.last_rollout
    with torch.no_grad():
        policy, _ = task.token_logps(tuned, r)
        reference, _ = task.token_logps(base, r)
    expect = masked_mean(k3(policy, reference), r.completion_mask)
    assert expect > 0
    assert task.last_metrics["kl"] == pytest.approx(expect, rel=1e-5)


def test_kl_reference_with_an_in_place_delta(tmp_path: Path, smol_tok: Any) -> None:
    task = make_task(tmp_path, smol_tok, beta=0.1, max_completion_length=6)
    tuned = dt.attach(tiny_model(), "full")
    assert not tuned.switchable
    tuned.train()
    batch = task.collate(task.train[:2])
    torch.manual_seed(0)
    loss, _ = task.loss(tuned, batch)
    loss.backward()  # taking the in-place delta off did not touch the tensors the graph saved
    assert task.last_metrics["kl"] == 0.0
    with torch.no_grad():
        tuned.model.model.layers[0].mlp.up_proj.weight.add_(0.5)
    torch.manual_seed(0)
    loss, _ = task.loss(tuned, batch)
    loss.backward()
    assert task.last_metrics["kl"] > 0


def test_kl_without_an_attached_delta_is_refused(tmp_path: Path, smol_tok: Any) -> None:
    task = make_task(tmp_path, smol_tok, beta=0.1)
    with pytest.raises(DeltatuneError, match="no attached delta"):
        task.loss(tiny_model(), task.collate(task.train[:1]))


def test_evaluate_is_greedy_and_leaves_rng_and_modes_alone(tmp_path: Path, smol_tok: Any) -> None:
    task = make_task(tmp_path, smol_tok, rewards=[chars, {"name": "length", "target": 5}])
    tuned = dt.attach(tiny_model(eos_boost=6.0), "lora", r=2)
    tuned.train()
    state = torch.get_rng_state()
    first = task.evaluate(tuned, batch_size=3)
    texts = [s["completion"] for s in task.last_eval_completions]
    assert torch.equal(torch.get_rng_state(), state), "greedy evaluation draws nothing from the RNG"
    assert tuned.training
    assert task.evaluate(tuned, batch_size=2) == first
    assert [s["completion"] for s in task.last_eval_completions] == texts
    assert len(texts) == len(task.eval)
    assert set(first) == {"reward", "rewards/chars/mean", "rewards/length/mean", "completions/mean_length"}
    expect = sum(s["reward"] for s in task.last_eval_completions) / len(texts)
    assert first["reward"] == pytest.approx(expect)


@pytest.mark.parametrize("method,eos_boost", [("lora", 0.0), ("lora", 3.0), ("full", 0.0)])
def test_chunked_log_probs_equal_the_full_logits(tmp_path: Path, smol_tok: Any, method: str, eos_boost: float) -> None:
    """train.chunked_loss: the completion tokens' log-probs (at a temperature), their entropy and the gradient of a
    loss that weighs tokens differently equal those from the whole (N, C, V) logits, whichever path the head
    takes (plain: fused; a hooked head: checkpointed module calls; trained in place: fused with its gradient)."""
    task = make_task(tmp_path, smol_tok, temperature=0.7)
    tuned = dt.attach(tiny_model(eos_boost=eos_boost), method, **({"r": 2} if method == "lora" else {}))
    tuned.train()
    if method == "lora":
        with torch.no_grad():
            for p in tuned.deltas.parameters():
                p.add_(torch.randn_like(p) * 0.3)
    torch.manual_seed(0)
    rollout = task.rollout(tuned, task.collate(task.train[:2]))
    weights = torch.rand(rollout.completion_ids.shape, generator=torch.Generator().manual_seed(3))
    params = [p for p in tuned.parameters() if p.requires_grad]
    results = []
    for chunked in (True, False):
        task.chunked_loss = chunked
        logps, entropy = task.token_logps(tuned, rollout, entropy=True)
        grads = torch.autograd.grad((logps * weights).sum(), params)
        results.append((logps.detach(), entropy, grads))
    (a, ea, ga), (b, eb, gb) = results
    assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
    assert ea is not None and eb is not None and torch.allclose(ea, eb, rtol=1e-5, atol=1e-5 * float(eb.abs().max()))
    for x, y in zip(ga, gb, strict=True):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-5 * float(y.abs().max()) + 1e-12)
