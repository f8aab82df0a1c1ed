"""LISA and HFT: which tensors train at which step, frozen tensors bitwise still, bounded optimizer
state, resume, and the reductions (LISA with γ = every block is full fine-tuning)."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    VOCAB,
    batch,
    loss_of,
    output_of,
    tiny_gpt2,
    tiny_llama,
    train_then_resume,
    word_run_config,
)
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.core.targeting import layer_index
from deltatune.methods.lisa import LisaConfig, LisaPolicy


def llama8(seed: int = 0, tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=8,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


def run(tuned, steps: int, lr: float = 1e-2, weight_decay: float = 0.0, on_grads=None, start: int = 0,
        optimizer=None) -> torch.optim.Optimizer:
    """The native loop's order of calls, on one fixed batch."""
    params = list(tuned.deltas.parameters())
    opt = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    x = batch()
    for step in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        loss_of(tuned, x).backward()
        if on_grads is not None:
            on_grads(step)
        tuned.policy.before_optimizer_step(step, tuned, opt)
        opt.step()
        tuned.policy.after_optimizer_step(step, tuned, opt)
    return opt


def blocks_with_grad(model) -> set[int]:
    return {layer_index(n) for n, p in model.named_parameters() if p.grad is not None and layer_index(n) is not None}


# -- LISA ------------------------------------------------------------------------------------------
def test_lisa_grads_only_on_outside_parts_and_gamma_blocks() -> None:
    model = llama8()
    tuned = dt.attach(model, "lisa", activated_layers=2, interval_steps=3)
    seen = []

    def check(step: int) -> None:
        active = set(tuned.policy.active)
        assert blocks_with_grad(model) == active and len(active) == 2
        outside = {n for n, p in model.named_parameters() if layer_index(n) is None}
        assert all(p.grad is not None for n, p in model.named_parameters() if n in outside)
        assert all(p.grad is None for n, p in model.named_parameters()
                   if layer_index(n) is not None and layer_index(n) not in active)
        seen.append(tuple(sorted(active)))

    run(tuned, 9, on_grads=check)
    # the set is constant within an interval and drawn again at steps 0, K, 2K
    assert seen[0] == seen[1] == seen[2] and seen[3] == seen[4] == seen[5] and seen[6] == seen[7] == seen[8]
    assert tuned.policy.draws == 4  # setup (step 0), after steps 3, 6, 9


def test_lisa_frozen_blocks_are_bitwise_unchanged_within_an_interval() -> None:
    model = llama8()
    tuned = dt.attach(model, "lisa", activated_layers=2, interval_steps=50)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run(tuned, 4, weight_decay=0.1)  # decay must not reach frozen blocks either
    active = set(tuned.policy.active)
    for n, p in model.named_parameters():
        i = layer_index(n)
        if i is not None and i not in active:
            assert torch.equal(p, before[n]), n
        elif "norm" not in n:
            assert not torch.equal(p, before[n]), n


def test_lisa_draws_are_uniform() -> None:
    policy = LisaPolicy(LisaConfig(activated_layers=2, seed=3))
    policy.blocks = {i: [] for i in range(8)}
    counts = torch.zeros(8)
    for _ in range(2000):
        picks = policy.draw()
        assert len(set(picks)) == 2
        counts[picks] += 1
    expected = 4000 / 8
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 18.475  # the χ² critical value for 7 degrees of freedom at p = 0.01
    assert abs(counts.sum().item() - 4000) < 1e-9


def test_lisa_optimizer_state_stays_bounded_over_many_switches() -> None:
    model = llama8()
    tuned = dt.attach(model, "lisa", activated_layers=2, interval_steps=1)
    sizes: list[int] = []
    opt = None
    for _ in range(12):
        opt = run(tuned, 1, optimizer=opt, start=len(sizes))
        held = {id(p) for p in opt.state}
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        # state only for what trains now (the new blocks have none yet: they start fresh)
        assert held <= trainable
        sizes.append(sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)))
    outside = sum(p.numel() for n, p in model.named_parameters() if layer_index(n) is None)
    block = sum(p.numel() for n, p in model.named_parameters() if layer_index(n) == 0)
    assert max(sizes) <= 2 * (outside + 2 * block) + 100  # two moments (+ step counters) of E, H, norm, γ blocks


def test_lisa_with_every_block_is_full_fine_tuning() -> None:
    a, b = llama8(), llama8()
    lisa = dt.attach(a, "lisa", activated_layers=8, interval_steps=2)
    full = dt.attach(b, "full")
    run(lisa, 5, weight_decay=0.01)
    run(full, 5, weight_decay=0.01)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_lisa_tied_and_untied_embeddings_train_and_reload() -> None:
    for tied in (True, False):
        model = llama8(tied=tied)
        tuned = dt.attach(model, "lisa", activated_layers=1)
        run(tuned, 2)
        assert model.get_input_embeddings().weight.grad is not None
        assert model.get_output_embeddings().weight.grad is not None


def test_lisa_artifact_holds_only_the_tensors_that_trained(tmp_path) -> None:
    model = llama8()
    tuned = dt.attach(model, "lisa", activated_layers=2, interval_steps=100)
    run(tuned, 3)
    tuned.save(tmp_path / "a")
    info = dt.inspect(tmp_path / "a")
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert info["stored_tensors"] == len(trained)
    loaded = dt.load(llama8(), tmp_path / "a")
    x = batch()
    assert torch.equal(output_of(loaded, x), output_of(tuned, x))


def test_lisa_resume_mid_interval_keeps_the_active_set() -> None:
    straight = dt.attach(llama8(), "lisa", activated_layers=2, interval_steps=3)
    opt = run(straight, 4)
    state = straight.policy.state_dict()
    opt = run(straight, 4, start=4, optimizer=opt)

    resumed = dt.attach(llama8(), "lisa", activated_layers=2, interval_steps=3)
    first = run(resumed, 4)
    # a resume: a fresh model and policy take the checkpoint's policy state, delta and optimizer state
    again = dt.attach(llama8(), "lisa", activated_layers=2, interval_steps=3)
    again.policy.load_state_dict(state)
    again.deltas.load_state_dict(resumed.deltas.state_dict())
    opt2 = torch.optim.AdamW(list(again.deltas.parameters()), lr=1e-2, weight_decay=0.0)
    opt2.load_state_dict(first.state_dict())
    assert again.policy.active == straight.policy.active or again.policy.draws < straight.policy.draws
    run(again, 4, start=4, optimizer=opt2)
    assert again.policy.active == straight.policy.active
    for (n, p), (_, q) in zip(again.model.named_parameters(), straight.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n


def test_lisa_refuses_more_blocks_than_the_model_has() -> None:
    with pytest.raises(dt.DeltatuneError, match="at most 3"):
        dt.attach(tiny_llama(), "lisa", activated_layers=4)


# -- HFT -------------------------------------------------------------------------------------------
def llama4(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=16, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def test_hft_selects_half_of_each_category_per_block() -> None:
    model = llama4()
    dt.attach(model, "hft", seed=1)
    ffn_counts = []
    for i in range(4):
        on = {n.split(f"layers.{i}.")[1] for n, p in model.named_parameters() if p.requires_grad and f"layers.{i}." in n}
        assert sum(k.startswith("self_attn.") for k in on) == 2
        assert sum("layernorm" in k for k in on) == 1
        ffn_counts.append(sum(k.startswith("mlp.") for k in on))
    assert sorted(ffn_counts) == [1, 1, 2, 2]  # half of the blocks get 2 of 3 FFN matrices
    assert model.get_input_embeddings().weight.requires_grad and model.model.norm.weight.requires_grad
    # every matrix has the same size here, so exactly half of the block matrices train
    mats = [p for n, p in model.named_parameters() if layer_index(n) is not None and p.dim() == 2]
    assert sum(p.numel() for p in mats if p.requires_grad) / sum(p.numel() for p in mats) == 0.5


def test_hft_frozen_half_is_bitwise_still_even_with_weight_decay() -> None:
    model = llama4()
    tuned = dt.attach(model, "hft")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}

    def check(step: int) -> None:
        assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)

    run(tuned, 3, weight_decay=0.1, on_grads=check)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n in frozen), n


def test_hft_rounds_redraw_with_fresh_state_and_the_same_seed_draws_the_same() -> None:
    a = dt.attach(llama4(), "hft", rounds=2, seed=5)
    b = dt.attach(llama4(), "hft", rounds=2, seed=5)
    assert a.policy.selected == b.policy.selected
    assert a.policy.lr_restarts(6) == [3]
    first = list(a.policy.selected)
    opt = run(a, 3)
    assert a.policy.selected != first and a.policy.rounds_drawn == 2
    assert len(opt.state) == 0  # a new round: a new optimizer
    # the logged selection reproduces the mask on resume
    c = dt.attach(llama4(), "hft", rounds=2, seed=5)
    c.policy.load_state_dict(a.policy.state_dict())
    mask = {n: p.requires_grad for n, p in a.model.named_parameters()}
    assert {n: p.requires_grad for n, p in c.model.named_parameters()} == mask


def test_hft_on_gpt2_fused_attention() -> None:
    model = tiny_gpt2()
    tuned = dt.attach(model, "hft")
    for i in range(3):
        attn = [n for n, p in model.named_parameters() if p.requires_grad and f"h.{i}.attn." in n and n.endswith("weight")]
        assert len(attn) == 1  # c_attn or c_proj
    run(tuned, 2)


def test_lisa_under_transformers_trainer(tmp_path) -> None:
    from transformers import TrainingArguments

    from deltatune.train.hf import DeltaTuneTrainer

    model = llama8()
    tuned = dt.attach(model, "lisa", activated_layers=2, interval_steps=2)
    g = torch.Generator().manual_seed(3)
    rows = [{"input_ids": (ids := torch.randint(0, VOCAB, (12,), generator=g)), "labels": ids.clone()} for _ in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", learning_rate=1e-3, disable_tqdm=True, seed=0)
    trainer = DeltaTuneTrainer(model=tuned, args=args, train_dataset=rows)
    trainer.train()
    assert tuned.policy.draws == 4  # at attach, then after steps 2, 4 and 6
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in trainer.optimizer.state} <= trainable  # no stale moments of earlier blocks
    tuned.eval()
    loaded = dt.load(llama8(), tmp_path / "deltatune").eval()
    x = batch()
    assert torch.equal(output_of(loaded, x), output_of(tuned, x))


@pytest.mark.parametrize("method", [{"name": "lisa", "activated_layers": 1, "interval_steps": 3},
                                    {"name": "hft", "rounds": 2}], ids=["lisa", "hft"])
def test_resume_through_dt_train_ends_bit_identical(word_run, method: dict, tmp_path) -> None:
    cfg = word_run_config(word_run, method, tmp_path / "run", lr=1e-3)
    _, resumed = train_then_resume(cfg, keep=2)  # died after step 4: mid-interval for LISA, mid-round for HFT
    assert resumed["resumed_from"] == 4
