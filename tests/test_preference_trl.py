"""Parity with TRL 1.16's DPOTrainer: the same pairs, the same LoRA weights, the same batch, loss and gradients.

TRL's side is its own pipeline: ``DPOTrainer`` tokenizes the rows, its collator builds the batch, ``compute_loss``
computes the loss with a PEFT LoRA model whose adapter is disabled for the reference (TRL's way with PEFT and no
``ref_model``). deltatune's side: the preference task's pairs and collate, ``dpo`` on a LoRA delta holding the
same factors, the reference the base with the delta taken off. TRL is a test dependency only.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import torch
from conftest import VOCAB, load_smol_tokenizer  # noqa: F401  (the shared fixtures: one thread, the session cache)
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.data.config import DataConfig
from deltatune.data.preference import DPO, live_reference
from deltatune.data.tasks import build_task

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

pytestmark = pytest.mark.usefixtures("one_thread")
ROWS = [{"prompt": f"Review {i}: the film was", "chosen": c, "rejected": r} for i, (c, r) in enumerate([
    (" wonderful, moving and funny.", " bad."), (" a delight from start to end.", " boring, long and loud."),
    (" great.", " awful, I left early."), (" worth every minute.", " not good at all."),
    (" the best of the year.", " a mess."), (" charming.", " dull and far too long."),
])]




def tiny_base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def randomize_lora(model: Any) -> None:
    """Random non-zero LoRA factors (a fresh LoRA has B = 0): the policy is then not the reference."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g))


def same_lora(model: Any) -> Any:
    """A deltatune LoRA delta on a fresh copy of the base holding the PEFT model's factors."""
    tuned = dt.attach(tiny_base(), "lora", r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj"])
    weights = dict(model.named_parameters())
    with torch.no_grad():
        for name, form in tuned.forms().items():
            module = name.removesuffix(".weight")
            form.A.copy_(weights[f"base_model.model.{module}.lora_A.default.weight"])
            form.B.copy_(weights[f"base_model.model.{module}.lora_B.default.weight"])
    return tuned


@pytest.mark.slow  # importing TRL's DPOTrainer (accelerate, datasets) alone takes 5-15 s
def test_dpo_loss_and_gradients_equal_trls(tmp_path) -> None:
    tokenizer = load_smol_tokenizer()
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, max_length=64, per_device_train_batch_size=6,
                         report_to=[], use_cpu=True, gradient_checkpointing=False, bf16=False, seed=0)
    # TRL wraps the base with the LoRA itself (given a PEFT model, it would take a copy of its adapter as the
    # reference); its reference is then the PEFT model with the adapter disabled
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    trainer = trl.DPOTrainer(model=tiny_base(), args=args, train_dataset=datasets.Dataset.from_list(ROWS),
                             processing_class=tokenizer, peft_config=lora)
    model = trainer.model
    assert "ref" not in model.peft_config
    randomize_lora(model)
    prepared = [trainer.train_dataset[i] for i in range(len(ROWS))]
    trl_batch = trainer.data_collator([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                       for r in prepared])

    # deltatune reads the same rows into the same pairs and the same batch
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    tuned = same_lora(model)
    task = build_task(DataConfig(path=str(path), task="preference", max_length=64, eval_fraction=0.2), tokenizer,
                      tuned)
    ours = {tuple(f["prompt_ids"]): f for f in task.train + task.eval}
    pairs = [ours[tuple(r["prompt_ids"])] for r in prepared]
    for f, r in zip(pairs, prepared, strict=True):
        assert (f["chosen_ids"], f["rejected_ids"]) == (r["chosen_ids"], r["rejected_ids"])
    batch = task.collate(pairs)
    assert torch.equal(batch["input_ids"], trl_batch["input_ids"])
    assert torch.equal(batch["attention_mask"], trl_batch["attention_mask"])
    assert torch.equal(batch["labels"] != -100, trl_batch["completion_mask"].bool())

    # the reference: TRL's adapter-disabled PEFT model, deltatune's delta taken off
    trl_ref = trainer.compute_ref_log_probs(trainer.model, trl_batch)
    our_ref = live_reference(tuned, batch)
    for a, b in zip(our_ref, trl_ref, strict=True):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5)

    trainer.model.train()
    trl_loss = trainer.compute_loss(trainer.model, trl_batch)
    trl_loss.backward()
    tuned.train()
    task.use_objective(DPO(beta=0.1))
    our_loss, _ = task.loss(tuned, batch)
    our_loss.backward()
    margins = task.take_metrics()
    assert abs(margins["rewards/chosen"]) > 1e-2, "the LoRA moves the policy away from the reference"
    assert abs(float(our_loss.detach()) - float(trl_loss.detach())) < 1e-5

    grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
    compared = 0
    for name, form in tuned.forms().items():
        module = name.removesuffix(".weight")
        for ours_p, peft_name in ((form.A, "lora_A"), (form.B, "lora_B")):
            theirs = grads[f"base_model.model.{module}.{peft_name}.default.weight"]
            scale = max(1.0, float(theirs.abs().max()))
            assert float((ours_p.grad - theirs).abs().max()) < 1e-5 * scale, f"{module} {peft_name}"
            compared += 1
    assert compared == 8 and all(re.search(r"lora_[AB]", n) for n in grads)
