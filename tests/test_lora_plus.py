"""LoRA+ (``train.loraplus_ratio``): the B factors of low-rank deltas train at λ·lr, in PEFT's
``create_loraplus_optimizer`` groups (peft 0.21.2 is the reference), in the native loop and the Trainer bridge."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import batch, loss_of, tiny_gpt2, tiny_llama, word_run_config

import deltatune as dt
from deltatune.core.forms.lowrank import LowRank
from deltatune.core.optim import LORAPLUS_GROUPS, loraplus_optimizer, loraplus_param_groups
from deltatune.train.config import TrainSettings
from deltatune.train.loop import make_optimizer
from deltatune.train.step import sync_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

peft = pytest.importorskip("peft")

LR, RATIO, WD = 1e-3, 16.0, 0.01
# GPT-2: LoRA on the fused qkv Conv1D and on the (tied) input embedding, LoRA's own biases trained, and a LayerNorm
# trained fully: every one of PEFT's four groups is populated
TARGETS, SAVED = ["c_attn", "wte"], ["ln_f"]


def peft_name_to_ours(name: str) -> str:
    """PEFT's parameter name -> ``<form>:<tensor>`` (a low-rank factor) or ``<form>`` (a fully trained tensor)."""
    name = name.removeprefix("base_model.model.")
    name = re.sub(r"\.lora_(?:embedding_)?([AB])(?:\.default)(?:\.weight)?$", r".weight:\1", name)
    return name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


def our_names(tuned: dt.Tuned) -> dict[int, str]:
    names = {}
    for form_name, form in tuned.forms().items():
        for local, p in form.named_parameters():
            names[id(p)] = f"{form_name}:{local}" if isinstance(form, LowRank) else form_name
    return names


def twins(seed: int = 3) -> tuple[torch.nn.Module, dt.Tuned]:
    """The same model as a PEFT LoRA and a deltatune LoRA, with equal random (non-zero) factors."""
    from peft import LoraConfig, get_peft_model

    base = tiny_gpt2()
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                           bias="lora_only", modules_to_save=SAVED,
                                                           fan_in_fan_out=True))
    tuned = dt.attach(base, "lora", r=4, alpha=8, targets=TARGETS, bias="lora_only", modules_to_save=SAVED)
    ours = {v: p for p in tuned.deltas.parameters() for k, v in our_names(tuned).items() if k == id(p)}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_" in name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                ours[peft_name_to_ours(name)].copy_(p)
    return model, tuned


def test_groups_and_learning_rates_are_peft_create_loraplus_optimizers() -> None:
    from peft.optimizers import create_loraplus_optimizer

    model, tuned = twins()
    theirs = create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                       loraplus_weight_decay=WD)
    ours = loraplus_optimizer(torch.optim.AdamW, tuned.forms, list(tuned.deltas.parameters()), lr=LR, ratio=RATIO,
                              weight_decay=WD)
    peft_names = {id(p): peft_name_to_ours(n) for n, p in model.named_parameters()}
    names = our_names(tuned)
    assert len(theirs.param_groups) == len(ours.param_groups) == len(LORAPLUS_GROUPS)
    for group, a, b in zip(LORAPLUS_GROUPS, theirs.param_groups, ours.param_groups, strict=True):
        assert a["lr"] == b["lr"] and a["weight_decay"] == b["weight_decay"], group
        assert sorted(peft_names[id(p)] for p in a["params"]) == sorted(names[id(p)] for p in b["params"]), group
        assert b["params"], f"the test model must populate group {group}"
    lrs = dict(zip(LORAPLUS_GROUPS, (g["lr"] for g in ours.param_groups), strict=True))
    assert lrs == {"A": LR, "embedding": 1e-6, "B": LR * RATIO, "B_no_decay": LR * RATIO}


def test_one_step_moves_every_tensor_as_peft() -> None:
    from peft.optimizers import create_loraplus_optimizer

    model, tuned = twins()
    theirs = create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                       loraplus_weight_decay=WD)
    ours = loraplus_optimizer(torch.optim.AdamW, tuned.forms, list(tuned.deltas.parameters()), lr=LR, ratio=RATIO,
                              weight_decay=WD)
    inputs = batch()
    for m, opt in ((model, theirs), (tuned, ours)):
        loss_of(m, inputs).backward()
        opt.step()
    values = {}  # our tensors as PEFT holds them: factors as they are, fully trained tensors as W0 + Δ
    for form_name, form in tuned.forms().items():
        if isinstance(form, LowRank):
            values.update({f"{form_name}:A": form.A, f"{form_name}:B": form.B})
        else:
            values[form_name] = form.base + form.delta
    moved = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mine = values[peft_name_to_ours(name)].detach()
        scale = p.detach().abs().max().item()
        torch.testing.assert_close(mine, p.detach(), rtol=1e-5, atol=1e-6 * scale + 1e-9, msg=name)
        moved += 1
    assert moved == len(values)


def test_without_b_factors_it_is_refused_with_what_to_do() -> None:
    tuned = dt.attach(tiny_llama(bias=True), "bitfit")
    with pytest.raises(dt.DeltatuneError, match=r"loraplus_ratio.*method 'bitfit' has none.*remove"):
        make_optimizer(list(tuned.deltas.parameters()), TrainSettings(loraplus_ratio=16.0), tuned)
    embedding_only = dt.attach(tiny_llama(), "lora", r=2, targets=["embed_tokens"])
    with pytest.raises(dt.DeltatuneError, match="none outside embeddings"):
        loraplus_param_groups(embedding_only.forms(), embedding_only.deltas.parameters(), lr=1.0, ratio=16.0)


def test_every_low_rank_form_finds_its_b_factors() -> None:
    """LoRA's relatives name their B factor B (DoRA's magnitude, a 1-dim tensor, goes with B as in PEFT)."""
    for method, options in (("dora", {"r": 2}), ("adalora", {"init_r": 2, "target_r": 1, "total_step": 10}),
                            ("lora", {"r": 2, "init": "pissa"}), ("kasa", {"r": 2}),
                            ("corda", {"r": 2, "data": "random", "samples": 2})):
        tuned = dt.attach(tiny_llama(), method, **options)
        groups = loraplus_param_groups(tuned.forms(), tuned.deltas.parameters(), lr=1.0, ratio=4.0)
        b = {id(p) for g in groups[2:] for p in g["params"]}
        for form in tuned.forms().values():
            assert id(form.B) in b and id(form.A) not in b, method
            if hasattr(form, "magnitude"):
                assert id(form.magnitude) in b


def test_native_loop_optimizer_and_a_tensor_joining_later() -> None:
    tuned = dt.attach(tiny_llama(), "lora", r=2, alpha=4)
    s = TrainSettings(lr=LR, loraplus_ratio=RATIO, optimizer="sgd")
    opt = make_optimizer(list(tuned.deltas.parameters()), s, tuned)
    assert isinstance(opt, torch.optim.SGD) and [g["lr"] for g in opt.param_groups] == [LR, 1e-6, LR * RATIO,
                                                                                          LR * RATIO]
    plain = make_optimizer(list(tuned.deltas.parameters()), TrainSettings(lr=LR), tuned)
    assert len(plain.param_groups) == 1, "off by default"
    # a policy that rebuilds a form (DSEE's head pruning, LT-SFT's phases): its new B joins the B group
    name, old = next(iter(tuned.forms().items()))
    new = LowRank(old.sites[0][0], old.r, old.alpha)
    before = {id(p) for p in tuned.deltas.parameters() if p.requires_grad}
    tuned.replace_forms({name: new})
    sync_optimizer(opt, tuned, before)
    assert any(p is new.B for p in opt.param_groups[2]["params"])
    assert any(p is new.A for p in opt.param_groups[0]["params"])


def test_a_run_with_ratio_one_is_the_plain_run_and_sixteen_is_not(word_run, tmp_path) -> None:
    """LoRA on q/v of a Llama has only factors: with λ = 1 the groups change nothing, bit for bit."""
    method = {"name": "lora", "r": 2, "alpha": 4}

    def run(name: str, **train) -> bytes:
        cfg = word_run_config(word_run, method, tmp_path / name, steps=3, save_every=0, **train)
        dt.train(cfg)
        return (tmp_path / name / "delta.safetensors").read_bytes()

    plain = run("plain")
    assert run("one", loraplus_ratio=1.0) == plain
    assert run("sixteen", loraplus_ratio=16.0) != plain


def test_config_values_and_methods_are_checked(word_run, tmp_path) -> None:
    from deltatune.train import load_config

    def problems(method: dict, **train) -> str:
        with pytest.raises(dt.DeltatuneError) as err:
            load_config(word_run_config(word_run, method, tmp_path / "run", **train))
        return str(err.value)

    assert "train.loraplus_ratio=0.0: must be > 0" in problems({"name": "lora"}, loraplus_ratio=0)
    assert "train.loraplus_ratio=nan: must be a finite number" in problems({"name": "lora"},
                                                                          loraplus_ratio=float("nan"))
    assert "train.loraplus_lr_embedding=-1" in problems({"name": "lora"}, loraplus_ratio=16, loraplus_lr_embedding=-1)
    assert "'mezo' trains from forward passes" in problems({"name": "mezo"}, loraplus_ratio=16)
    load_config(word_run_config(word_run, {"name": "lora"}, tmp_path / "run", loraplus_ratio=16))


def test_the_trainer_bridge_builds_the_same_groups(tmp_path) -> None:
    from transformers import TrainingArguments

    from deltatune.hf import DeltaTuneTrainer

    tuned = dt.attach(tiny_llama(), "lora", r=2, alpha=4)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, learning_rate=LR,
                             weight_decay=WD, max_steps=1)
    trainer = DeltaTuneTrainer(model=tuned, args=args, loraplus_ratio=RATIO)
    opt = trainer.create_optimizer()
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(LR, WD), (1e-6, WD), (LR * RATIO, WD),
                                                                         (LR * RATIO, 0.0)]
    b = {id(f.B) for f in tuned.forms().values()}
    assert {id(p) for p in opt.param_groups[2]["params"]} == b
