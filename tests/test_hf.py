"""deltatune inside a real ``transformers.Trainer``: the policy hooks, delta-only saving and resume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import assert_close_after_adam
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import deltatune as dt
from deltatune.core.policy import Policy
from deltatune.train.hf import POLICY_JSON, DeltaTuneCallback, DeltaTuneTrainer, trainer_kwargs

VOCAB = 128


def base(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def dataset(n: int = 16, length: int = 12) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (length,), generator=g)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def arguments(out: Path, **kw) -> TrainingArguments:
    options = {"max_steps": 3, "per_device_train_batch_size": 2, "report_to": [], "use_cpu": True,
               "save_strategy": "no", "learning_rate": 1e-2, "logging_steps": 1, "disable_tqdm": True,
               "seed": 0, "data_seed": 0, **kw}
    return TrainingArguments(output_dir=str(out), **options)


class Counting(Policy):
    """A toy dynamic policy: logs its hooks, checks gradients, keeps a tensor + JSON state."""

    name = "counting"

    def __init__(self, weight: float = 0.0) -> None:
        self.events: list[tuple[str, int]] = []
        self.weight = weight
        self.seen = torch.zeros(())
        self.grads_present: list[bool] = []

    def before_optimizer_step(self, step, tuned, optimizer) -> None:
        self.events.append(("before", step))
        self.grads_present.append(all(p.grad is not None for p in tuned.trainable_parameters()))
        assert isinstance(optimizer, torch.optim.Optimizer)

    def after_optimizer_step(self, step, tuned, optimizer) -> None:
        self.events.append(("after", step))
        self.seen = self.seen + 1

    def extra_loss(self, tuned):
        if not self.weight:
            return None
        return self.weight * sum(p.pow(2).sum() for p in tuned.trainable_parameters())

    def state_dict(self):
        return {"seen": self.seen, "events": [list(e) for e in self.events]}

    def load_state_dict(self, state) -> None:
        self.seen = state["seen"]
        self.events = [tuple(e) for e in state["events"]]


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_trainer_trains_only_the_delta_and_saves_an_artifact(tmp_path) -> None:
    tuned = dt.attach(base(), "lora", r=4)
    tuned.policy = Counting()
    base_before = snapshot(tuned.model)  # with hooks attached the model's own tensors are the base weights
    delta_before = {k: v.clone() for k, v in tuned.delta_state_dict().items()}
    trainer = DeltaTuneTrainer(model=tuned, args=arguments(tmp_path, save_strategy="steps", save_steps=2),
                               train_dataset=dataset())
    trainer.train()

    policy = tuned.policy
    assert policy.events == [("before", 0), ("after", 0), ("before", 1), ("after", 1), ("before", 2), ("after", 2)]
    assert policy.grads_present == [True, True, True]
    after = snapshot(tuned.model)
    assert after.keys() == base_before.keys()
    assert all(torch.equal(after[k], base_before[k]) for k in base_before), "the base weights must not change"
    delta_after = tuned.delta_state_dict()
    assert any(not torch.equal(delta_after[k], delta_before[k]) for k in delta_before), "LoRA must train"
    names = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("deltas.") for n in names)

    # the artifact at the end of training, and one per checkpoint, never the frozen base
    art = tmp_path / "deltatune"
    assert (art / "deltatune.json").is_file()
    ckpt = tmp_path / "checkpoint-2"
    assert (ckpt / "deltatune" / "deltatune.json").is_file() and (ckpt / POLICY_JSON).is_file()
    assert not (ckpt / "model.safetensors").exists()

    tuned.eval()
    loaded = dt.load(base(), art).eval()
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=x).logits, tuned(input_ids=x).logits, atol=1e-6)


def test_plain_trainer_with_the_callback(tmp_path) -> None:
    tuned = dt.attach(base(), "lora", r=4)
    tuned.policy = Counting()
    args = arguments(tmp_path, remove_unused_columns=False, label_names=["labels"])
    trainer = Trainer(**trainer_kwargs(tuned), args=args, train_dataset=dataset())
    assert any(isinstance(cb, DeltaTuneCallback) for cb in trainer.callback_handler.callbacks)
    trainer.train()
    assert [e for e, _ in tuned.policy.events] == ["before", "after"] * 3
    assert [s for _, s in tuned.policy.events] == [0, 0, 1, 1, 2, 2]
    assert tuned.policy.grads_present == [True, True, True]
    again = dt.load(base(), tmp_path / "deltatune")
    for k, v in tuned.delta_state_dict().items():
        assert torch.equal(again.delta_state_dict()[k], v)


def test_the_policy_extra_loss_is_added(tmp_path) -> None:
    tuned = dt.attach(base(), "lora", r=4)
    tuned.policy = Counting(weight=10.0)
    trainer = DeltaTuneTrainer(model=tuned, args=arguments(tmp_path), train_dataset=dataset())
    rows = dataset(2)
    inputs = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    tuned.train()
    with_extra = trainer.compute_loss(tuned, dict(inputs))
    plain = tuned(**inputs).loss
    expected = 10.0 * sum(p.pow(2).sum() for p in tuned.trainable_parameters())
    assert torch.allclose(with_extra, plain + expected)
    tuned.eval()
    assert torch.allclose(trainer.compute_loss(tuned, dict(inputs)), tuned(**inputs).loss), "no regulariser in eval"


def test_resume_restores_delta_and_policy_state(tmp_path) -> None:
    def run(out: Path, steps: int, resume: bool = False) -> dt.Tuned:
        tuned = dt.attach(base(), "lora", r=4)
        tuned.policy = Counting()
        args = arguments(out, max_steps=steps, save_strategy="steps", save_steps=2, lr_scheduler_type="constant")
        trainer = DeltaTuneTrainer(model=tuned, args=args, train_dataset=dataset())
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2") if resume else None)
        return tuned

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    resumed = run(tmp_path / "resumed", 4, resume=True)
    assert resumed.policy.events == straight.policy.events  # steps 0-1 came back from the checkpoint
    assert int(resumed.policy.seen) == 4
    a, b = straight.delta_state_dict(), resumed.delta_state_dict()
    for k in a:
        assert torch.equal(b[k], a[k]), k
    assert sorted(os.listdir(tmp_path / "resumed" / "checkpoint-4" / "deltatune")) == ["delta.safetensors",
                                                                                    "deltatune.json"]


def test_the_trainer_only_takes_a_tuned_model(tmp_path) -> None:
    with pytest.raises(dt.DeltatuneError, match="Tuned"):
        DeltaTuneTrainer(model=base(), args=arguments(tmp_path))


def test_gradient_checkpointing_still_trains_the_delta(tmp_path) -> None:
    tuned = dt.attach(base(), "lora", r=4)
    before = {k: v.clone() for k, v in tuned.delta_state_dict().items()}
    args = arguments(tmp_path, max_steps=2, activation_checkpointing=True)
    DeltaTuneTrainer(model=tuned, args=args, train_dataset=dataset()).train()
    after = tuned.delta_state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert tuned.model.is_activation_checkpointing


def test_a_skipped_step_changes_nothing_the_optimizer_holds(tmp_path) -> None:
    """skip_step drops every gradient the optimizer would apply, as in the native loop: the delta and a base
    tensor the user trains next to it both stay as they are."""

    class SkipAll(Policy):
        def skip_step(self, step, loss) -> bool:
            return True

    tuned = dt.attach(base(), "lora", r=4, init=False)
    tuned.policy = SkipAll()
    tuned.model.model.norm.weight.requires_grad_(True)
    before = snapshot(tuned)
    DeltaTuneTrainer(model=tuned, args=arguments(tmp_path), train_dataset=dataset()).train()
    after = snapshot(tuned)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert tuned.model.model.norm.weight.requires_grad, "the user's tensor still trains"


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_chunked_loss_trains_as_the_models_own_loss(tmp_path, accumulate: int) -> None:
    """chunked_loss (default): the Trainer's loss from deltatune.data.lm_loss equals the model's own causal-LM loss
    (its num_items_in_batch normalisation under gradient accumulation included): the same trained delta."""
    trained = {}
    for chunked in (True, False):
        tuned = dt.attach(base(), "lora", dropout=0.0)
        trainer = DeltaTuneTrainer(model=tuned, args=arguments(tmp_path / str(chunked),
                                                               gradient_accumulation_steps=accumulate),
                                   train_dataset=dataset(), chunked_loss=chunked)
        batch = {k: torch.stack([r[k] for r in dataset()[:2]]) for k in ("input_ids", "labels")}
        assert trainer._takes_chunked_loss(tuned, batch, False) == chunked
        for items in (None, torch.tensor(40)):  # Adam would hide a wrong scale: compare the loss itself
            loss = trainer.compute_loss(tuned, dict(batch), num_items_in_batch=items)
            own = tuned(**batch, **({} if items is None else {"num_items_in_batch": items})).loss
            assert float(loss) == pytest.approx(float(own), rel=1e-5)
        trainer.train()
        trained[chunked] = {k: v.clone() for k, v in tuned.deltas.state_dict().items()}
    for k, v in trained[True].items():  # Adam's normalisation amplifies summation-order noise on tiny gradients
        assert_close_after_adam(v, trained[False][k], 1e-4, msg=k)
