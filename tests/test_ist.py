"""IST: per-step block selection from learned scores, the suppression probe and its score update,
exact restoration of scales and modes, the official AdamW semantics, resume, errors."""

from __future__ import annotations

import struct

import pytest
import torch
from conftest import (
    VOCAB,
    batch,
    loss_of,
    output_of,
    save_word_llama,
    tiny_gpt2,
    tiny_llama,
    write_sentiment_jsonl,
)
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.core.targeting import layer_index
from deltatune.train import state as ckpt
from deltatune.train.loop import sync_optimizer


def llama(layers: int = 8, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(cfg).eval()


def ist(model: torch.nn.Module, **options) -> dt.Tuned:
    torch.manual_seed(1)  # the LoRA factors' initialisation
    return dt.attach(model, "ist", base_options={"r": 2, "init": False}, **options)


def block_of(name: str) -> int | None:
    return layer_index(name.replace(":", "."))


def loop_step(tuned: dt.Tuned, opt: torch.optim.Optimizer, step: int, trainable: set[int]) -> set[int]:
    """One optimizer step as the native loop takes it (hooks, then the loop's optimizer sync)."""
    opt.zero_grad(set_to_none=True)
    loss_of(tuned, batch()).backward()
    tuned.policy.before_optimizer_step(step, tuned, opt)
    opt.step()
    tuned.policy.after_optimizer_step(step, tuned, opt)
    return sync_optimizer(opt, tuned, trainable)


def test_a_step_trains_exactly_the_drawn_blocks_and_leaves_the_rest_bitwise() -> None:
    tuned = ist(llama(8))
    policy = tuned.policy
    assert policy.layers == list(range(8)) and policy.n_update == 2  # ⌊0.25·8⌋
    params = list(tuned.deltas.parameters())
    named = dict(tuned.deltas.named_parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    trainable = {id(p) for p in params if p.requires_grad}
    seen: set[int] = set()
    for step in range(6):
        chosen = {policy.layers[i] for i in policy.selected}
        seen |= chosen
        opt.zero_grad(set_to_none=True)
        loss_of(tuned, batch()).backward()
        with_grad = {block_of(n) for n, p in named.items() if p.grad is not None}
        assert with_grad == chosen and len(chosen) == 2
        assert sum(p.grad is not None for p in named.values()) == 2 * 2 * 2  # 2 blocks x (q, v) x (A, B)
        assert all(p.grad is None for p in tuned.model.parameters()), "base weights never get gradients"
        before = {n: p.detach().clone() for n, p in named.items()}
        tuned.policy.before_optimizer_step(step, tuned, opt)
        opt.step()
        for n, p in named.items():
            assert torch.equal(p, before[n]) != (block_of(n) in chosen), n
        tuned.policy.after_optimizer_step(step, tuned, opt)
        trainable = sync_optimizer(opt, tuned, trainable)
    assert len(seen) > 2, "the blocks are drawn anew every step"


def test_the_score_update_follows_the_rule_on_a_stub_loss() -> None:
    tuned = ist(llama(8), rl_steps=3, rl_lr=10.0, rho=0.25)
    policy = tuned.policy
    policy.scores = torch.tensor([0.3, -0.8, 1.2, 0.0, -0.4, 0.9, -1.5, 0.5])
    s0 = policy.scores.clone()
    scales = [[f.scale for f in forms] for forms in policy.scaled]
    weight = torch.arange(8, dtype=torch.float64) * 0.1
    seen: list[tuple[list[int], float]] = []

    def stub(model, _batch) -> torch.Tensor:  # the loss is a known function of the suppressed set
        assert not model.training and not torch.is_grad_enabled()
        group = []
        for pos, forms in enumerate(policy.scaled):
            if all(f.scale == s * 0.25 for f, s in zip(forms, scales[pos], strict=True)):
                group.append(pos)
            else:
                assert all(f.scale == s for f, s in zip(forms, scales[pos], strict=True))
        loss = float(weight[group].sum())
        seen.append((group, loss))
        return torch.tensor(loss)

    policy.set_probe([batch()], stub)
    tuned.train()
    policy.probe(tuned)
    groups = [g for g, _ in seen]
    assert len(groups) == 3 and all(len(g) == 4 for g in groups)  # n_s = ⌊0.5·8⌋
    assert len({tuple(g) for g in groups}) == 3, "groups are redrawn until they differ"
    r = torch.exp(-torch.tensor([loss for _, loss in seen], dtype=torch.float64))
    a = r - r.mean()
    q = torch.sigmoid(s0.double())
    expected = s0.double().clone()
    for k, g in enumerate(groups):
        expected[g] += 10.0 * a[k] * q[g] * (1 - q[g])
    assert torch.allclose(policy.scores.double(), expected, atol=1e-6, rtol=0)
    untouched = [i for i in range(8) if not any(i in g for g in groups)]
    assert all(policy.scores[i] == s0[i] for i in untouched)
    assert not torch.equal(policy.scores, s0)
    assert policy.probes == 1


def test_probing_restores_every_scale_bit_for_bit_and_every_mode() -> None:
    tuned = ist(llama(8))
    tuned.train()
    tuned.model.model.layers[3].eval()  # a mixed state must come back as it was
    modes = {n: m.training for n, m in tuned.named_modules()}
    scales = {n: struct.pack("d", f.scale) for n, f in tuned.forms().items()}
    out = output_of(tuned, batch())
    tuned.policy.set_probe([batch(2), batch(3)], loss_of)
    for _ in range(3):
        tuned.policy.probe(tuned)
    assert {n: m.training for n, m in tuned.named_modules()} == modes
    assert {n: struct.pack("d", f.scale) for n, f in tuned.forms().items()} == scales
    assert torch.equal(output_of(tuned, batch()), out)
    assert tuned.policy.probes == 3 and bool(tuned.policy.scores.ne(0).any())


def _inclusion(w: torch.Tensor) -> torch.Tensor:
    """P(i is among 2 draws without replacement, each ∝ w): first, or second after some j."""
    total = w.sum()
    p = w / total
    return torch.stack([p[i] + sum(p[j] * w[i] / (total - w[j]) for j in range(len(w)) if j != i)
                        for i in range(len(w))])


@pytest.mark.parametrize("low", [True, False])
def test_blocks_with_low_scores_are_drawn_at_the_expected_rate(low: bool) -> None:
    policy = ist(llama(8)).policy
    s = torch.zeros(8)
    if low:
        s[:2] = -10.0  # important blocks: sigmoid(-s) ≈ 1 against 0.5
    policy.scores = s
    n = 4000
    counts = torch.zeros(8, dtype=torch.float64)
    for _ in range(n):
        counts[policy.draw_update()] += 1
    expected = _inclusion(torch.sigmoid(-s.double()))
    assert torch.allclose(counts / n, expected, atol=0.03, rtol=0), (counts / n, expected)
    if low:
        assert counts[:2].min() > 1.5 * counts[2:].max()
    else:
        assert torch.allclose(expected, torch.full((8,), 0.25, dtype=torch.float64))


def test_two_blocks_do_not_hang_the_group_draw() -> None:
    tuned = ist(llama(2), rl_steps=3)
    assert tuned.policy.n_update == 1 and tuned.policy.n_suppress == 1  # at least one block each
    calls = []
    tuned.policy.set_probe([batch()], lambda m, b: calls.append(1) or loss_of(m, b))
    groups = tuned.policy.draw_groups()
    assert sorted(groups[:2]) == [[0], [1]] and len(groups) == 3, "C(2, 1) = 2 < R: one repeat is accepted"
    tuned.policy.probe(tuned)
    assert len(calls) == 3


def test_without_probe_data_scores_stay_zero_and_the_draw_is_uniform() -> None:
    tuned = ist(llama(8), score_interval=1)
    opt = torch.optim.AdamW(list(tuned.deltas.parameters()), lr=1e-2)
    trainable = {id(p) for p in tuned.deltas.parameters() if p.requires_grad}
    for step in range(3):
        trainable = loop_step(tuned, opt, step, trainable)
    assert torch.equal(tuned.policy.scores, torch.zeros(8)) and tuned.policy.probes == 0


def test_deselected_blocks_keep_their_moments_like_adamw_skipping_missing_grads() -> None:
    """The reference is the official semantics: every LoRA parameter in one AdamW, the gradients of blocks
    not drawn set to None (AdamW skips them and keeps their moments). The loop drops the state of a parameter
    whose requires_grad flips; the policy must hand it back, or a re-drawn block restarts its moments."""
    tuned = ist(llama(8), seed=3)
    opt = torch.optim.AdamW(list(tuned.deltas.parameters()), lr=1e-2)
    trainable = {id(p) for p in tuned.deltas.parameters() if p.requires_grad}
    draws = []
    for step in range(10):
        draws.append({tuned.policy.layers[i] for i in tuned.policy.selected})
        trainable = loop_step(tuned, opt, step, trainable)
    assert any(draws[i] & draws[j] for i in range(10) for j in range(i + 2, 10)), "some block comes back"

    model = llama(8)
    torch.manual_seed(1)  # the same LoRA initialisation as ``ist``
    ref = dt.attach(model, "lora", r=2, init=False)
    named = dict(ref.deltas.named_parameters())
    ref_opt = torch.optim.AdamW(list(named.values()), lr=1e-2)
    for chosen in draws:
        ref_opt.zero_grad(set_to_none=True)
        loss_of(ref, batch()).backward()
        for n, p in named.items():
            if block_of(n) not in chosen:
                p.grad = None
        ref_opt.step()
    for n, p in tuned.deltas.named_parameters():
        assert torch.allclose(p, named[n], atol=1e-6, rtol=0), n


def test_saved_delta_reloads_and_merges_exactly(tmp_path) -> None:
    tuned = ist(llama(8), score_interval=1)
    tuned.policy.set_probe([batch(5)], loss_of)
    opt = torch.optim.AdamW(list(tuned.deltas.parameters()), lr=1e-2)
    trainable = {id(p) for p in tuned.deltas.parameters() if p.requires_grad}
    for step in range(3):
        trainable = loop_step(tuned, opt, step, trainable)
    x = batch()
    trained = output_of(tuned, x)
    tuned.save(tmp_path / "a")
    loaded = dt.load(llama(8), tmp_path / "a")
    assert torch.equal(output_of(loaded, x), trained)
    assert dt.inspect(tmp_path / "a")["config"]["base"] == "lora"
    plain = loaded.merge()
    assert torch.allclose(output_of(plain, x), trained, atol=1e-5, rtol=0)
    loaded.unmerge()
    assert torch.allclose(output_of(loaded, x), trained, atol=1e-5, rtol=0)


def test_other_per_layer_forms_conv1d_and_a_trained_head() -> None:
    tuned = dt.attach(tiny_gpt2(), "ist", base_options={"targets": ["c_attn"], "bias": "lora_only"},
                      update_fraction=0.5)
    policy = tuned.policy
    assert policy.layers == [0, 1, 2] and len(policy.selected) == 1
    assert all(len(forms) == 1 for forms in policy.scaled), "the bias deltas train with their block, unscaled"
    on = {policy.layers[i] for i in policy.selected}
    for name, form in tuned.forms().items():
        assert all(p.requires_grad == (block_of(name) in on) for p in form.parameters())
    head = dt.attach(tiny_llama(), "ist", base_options={"modules_to_save": ["lm_head"], "targets": ["q_proj"]})
    assert all(p.requires_grad for p in head.forms()["lm_head.weight"].parameters()), "outside the blocks: always"


def test_errors_name_the_fix() -> None:
    with pytest.raises(dt.DeltatuneError, match="own dynamic policy"):
        dt.attach(tiny_llama(), "ist", base="spiel", base_options={"density": 0.01})
    with pytest.raises(dt.DeltatuneError, match="without an output scale"):
        dt.attach(tiny_gpt2(), "ist", base="bitfit")
    with pytest.raises(dt.DeltatuneError, match="per-layer"):
        dt.attach(tiny_llama(), "ist", base="lightweight")
    with pytest.raises(dt.DeltatuneError, match="base_options.*unknown option 'rank'"):
        dt.attach(tiny_llama(), "ist", base_options={"rank": 4})
    with pytest.raises(dt.DeltatuneError, match="Did you mean 'lora'"):
        dt.attach(tiny_llama(), "ist", base="lorra")
    with pytest.raises(dt.DeltatuneError, match="another method"):
        dt.attach(tiny_llama(), "ist", base="ist")
    with pytest.raises(dt.DeltatuneError, match="data"):
        dt.attach(tiny_llama(), "ist", data={"nmae": "tweets"})


@pytest.fixture(scope="module")
def word_folder(tmp_path_factory):
    folder = save_word_llama(tmp_path_factory.mktemp("ist-llama"))
    write_sentiment_jsonl(folder / "sentiment.jsonl")
    return folder


def test_a_run_probes_its_data_and_resumes_with_the_same_choices(word_folder, tmp_path) -> None:
    data = {"path": str(word_folder / "sentiment.jsonl"), "task": "classification", "labels": ["negative", "positive"],
            "max_length": 16, "eval_fraction": 0.25}

    def run(out: str, steps: int, resume: bool = False) -> dict:
        return dt.train({
            "model": str(word_folder), "data": data, "output": str(tmp_path / out),
            "method": {"name": "ist", "base_options": {"r": 2, "alpha": 4}, "update_fraction": 0.5,
                       "score_interval": 2, "probe_batch": 4, "probe_batches": 2, "data": data},
            "train": {"steps": steps, "batch_size": 4, "lr": 1e-2, "schedule": "constant", "progress": False,
                      "save_every": 3},
        }, resume=resume)

    run("straight", 6)
    run("resumed", 3)
    assert run("resumed", 6, resume=True)["resumed_from"] == 3
    a = (tmp_path / "straight" / "delta.safetensors").read_bytes()
    assert a == (tmp_path / "resumed" / "delta.safetensors").read_bytes(), "resumed bit-identical to straight"
    states = [ckpt.load_checkpoint(tmp_path / d / "checkpoints" / "step-0000006")["policy"]
              for d in ("straight", "resumed")]
    assert states[0]["probes"] == 3 and bool(states[0]["scores"].ne(0).any()), "probes at t = 2, 4, 6"
    assert states[0]["selected"] == states[1]["selected"]
    assert torch.equal(states[0]["scores"], states[1]["scores"])
    assert torch.equal(states[0]["generator"], states[1]["generator"])
