"""LocFT-BF: the edit data format, exact layer targeting, breadth-first epochs, the threshold rules, the
layer search, the artifact, and breadth-first against depth-first editing on a tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import MODELS, batch, output_of
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune import api
from deltatune.data import tasks
from deltatune.errors import DeltatuneError
from deltatune.methods.locft import LocFTConfig, LocFTPolicy
from deltatune.train.loop import Batches

WORDS = ["[PAD]", "[UNK]", "[EOS]"] + [f"w{i}" for i in range(61)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add waits


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def edit_llama(layers: int = 2, hidden: int = 32, inner: int = 64) -> LlamaForCausalLM:
    # a wide initialisation so a tiny random model's logits can reach a low loss
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True, pad_token_id=0,
                      initializer_range=0.3)
    return LlamaForCausalLM(cfg).eval()


def random_facts(n: int = 20, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": " ".join(f"w{rng.randrange(61)}" for _ in range(4)), "target": f"w{rng.randrange(61)}"}
            for _ in range(n)]


@pytest.fixture(scope="module")
def edit_folder(tmp_path_factory) -> Path:
    """A tiny Llama + word tokenizer as a from_pretrained folder, and 20 random-token facts."""
    folder = tmp_path_factory.mktemp("edit-llama")
    edit_llama().save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    (folder / "edits.jsonl").write_text("".join(json.dumps(f) + "\n" for f in random_facts()))
    return folder


def run_config(folder: Path, out: Path, method: dict, **train) -> dict:
    settings = {"steps": 50, "batch_size": 10, "lr": 5e-2, "optimizer": "adam", "schedule": "constant",
                "max_grad_norm": None, "progress": False, "device": "cpu", **train}
    return {"model": str(folder), "data": {"path": str(folder / "edits.jsonl"), "task": "edit", "max_length": 16},
            "method": {"name": "locft", **method}, "output": str(out), "train": settings}


def edit_task(tokenizer, rows: list[dict]) -> tasks.EditTask:
    feats = [tasks.encode_edit(tokenizer, r["prompt"], r["target"], 16) for r in rows]
    return tasks.EditTask(tasks.DataConfig(path="x", task="edit"), tokenizer, feats, feats)


# 1 ---------------------------------------------------------------------------------------------------
def test_left_padded_labels_are_exactly_target_and_eos() -> None:
    tok = word_tokenizer()
    rows = [{"prompt": "w1 w2 w3 w4 w5", "target": "w7 w8"}, {"prompt": "w9", "target": " w10"}]
    task = edit_task(tok, rows)
    b = task.collate(task.train)
    assert len(tok) == len(WORDS), "no token is added"
    assert b["input_ids"].shape == (2, 8)
    eos = tok.eos_token_id
    for i, r in enumerate(rows):
        prompt = tok(r["prompt"], add_special_tokens=False)["input_ids"]
        answer = tok(" " + r["target"].lstrip(), add_special_tokens=False)["input_ids"] + [eos]
        n = len(prompt) + len(answer)
        real = b["attention_mask"][i].bool()
        assert real.sum() == n and not real[: 8 - n].any(), "padding is on the left"
        assert b["input_ids"][i, real].tolist() == prompt + answer
        assert (b["input_ids"][i, ~real] == tok.pad_token_id).all()
        masked = b["labels"][i] != -100
        assert masked.nonzero().flatten().tolist() == list(range(8 - len(answer), 8)), "the target + EOS only"
        assert b["labels"][i, masked].tolist() == answer
        assert b["position_ids"][i, real].tolist() == list(range(n))

    # the loss: each edit's mean target NLL (computed alone, unpadded), then the mean over the edits
    model = edit_llama()
    loss, _ = task.loss(model, b)
    alone = []
    for f in task.train:
        ids = torch.tensor([f["input_ids"]])
        logp = model(input_ids=ids).logits[0].log_softmax(-1)
        k = len(f["labels"])
        pos = range(ids.shape[1] - k - 1, ids.shape[1] - 1)
        alone.append(-torch.stack([logp[p, ids[0, p + 1]] for p in pos]).mean())
    assert torch.allclose(loss, torch.stack(alone).mean(), atol=1e-5)


def test_edit_rows_and_targets_are_checked(tmp_path) -> None:
    tok = word_tokenizer()
    assert tasks.encode_edit(tok, "w1", "w2", 16)["labels"] == tok(" w2", add_special_tokens=False)["input_ids"] + [2]
    assert tasks.encode_edit(tok, "w1 w2 w3 w4", "w5", 4)["input_ids"] == tok("w3 w4 w5")["input_ids"] + [2]
    assert tasks.encode_edit(tok, "w1", "w2 w3 w4", 3) is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "w1", "answer": "w2"}) + "\n")
    with pytest.raises(DeltatuneError, match="'prompt' and 'target'"):
        tasks.build_task(tasks.DataConfig(path=str(bad), task="edit"), tok, edit_llama())
    with pytest.raises(DeltatuneError, match="prompt/target"):
        tasks.DataConfig(name="tweets", task="edit")


# 2 + 6 --------------------------------------------------------------------------------------------------
def test_exact_layer_only_that_tensor_changes_and_the_artifact_reproduces_logits(tmp_path) -> None:
    def deep() -> LlamaForCausalLM:
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=21,
                                            num_attention_heads=2, num_key_value_heads=1)).eval()

    model = deep()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = dt.attach(model, "locft", layer=2)
    assert tuned.delta_names == ["model.layers.2.mlp.down_proj.weight"], "layer 2 must not match layer 20"
    x = {"input_ids": torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))}
    opt = torch.optim.Adam(tuned.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        tuned(**x).logits.logsumexp(-1).mean().backward()
        opt.step()
    edited = output_of(tuned, x)
    tuned.save(tmp_path / "a")
    loaded = dt.load(deep(), tmp_path / "a")
    assert list(loaded.delta_state_dict()) == ["model.layers.2.mlp.down_proj.weight.delta"], "one tensor stored"
    assert torch.equal(output_of(loaded, x), edited), "the artifact reproduces the edited logits"
    merged = tuned.merge().state_dict()
    changed = [k for k in w0 if not torch.equal(merged[k], w0[k])]
    assert changed == ["model.layers.2.mlp.down_proj.weight"], "every other tensor is bitwise the base's"
    assert torch.allclose(output_of(tuned.model, x), edited, atol=1e-5)
    assert dt.attach(deep(), "locft", layer=20).delta_names == ["model.layers.20.mlp.down_proj.weight"]


def test_module_per_architecture_is_the_mlp_output_projection() -> None:
    assert dt.attach(MODELS["gpt2"](), "locft", layer=1).delta_names == ["transformer.h.1.mlp.c_proj.weight",
                                                                          "transformer.h.1.mlp.c_proj.bias"]
    # BERT: the block's output.dense, not attention.output.dense (also a suffix "output.dense")
    assert dt.attach(MODELS["bert"](), "locft", layer=0).delta_names == ["bert.encoder.layer.0.output.dense.weight",
                                                                          "bert.encoder.layer.0.output.dense.bias"]
    assert dt.attach(MODELS["llama"](), "locft", layer=1, module="mlp").delta_names == [
        f"model.layers.1.mlp.{m}_proj.weight" for m in ("gate", "up", "down")]
    with pytest.raises(DeltatuneError, match="blocks 0..2"):
        dt.attach(MODELS["llama"](), "locft", layer=3)
    with pytest.raises(DeltatuneError, match="no path inside"):
        dt.attach(MODELS["llama"](), "locft", layer=0, module="mlp.nope")


# 3 ---------------------------------------------------------------------------------------------------
def test_every_epoch_visits_every_edit_once_shuffled() -> None:
    b = Batches(20, 5, seed=0)
    epochs = []
    for _ in range(3):
        seen = []
        for k in range(4):
            seen += b.next()
            assert b.epoch_done() == (k == 3)
        epochs.append(seen)
    assert all(sorted(e) == list(range(20)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3 and epochs[0] != list(range(20)), "each epoch reshuffles"


# 4 ---------------------------------------------------------------------------------------------------
def test_threshold_skips_batches_and_stops_epochs() -> None:
    policy = LocFTPolicy(LocFTConfig(layer=0, threshold=0.5, epochs=3), {0: []})
    assert [policy.skip_step(s, v) for s, v in enumerate([0.9, 0.1])] == [False, True]
    assert not policy.should_stop(1, epoch_end=True), "epoch mean 0.5 is not below 0.5"
    assert [policy.skip_step(s, v) for s, v in [(2, 0.6), (3, 0.3)]] == [False, True]
    assert not policy.should_stop(2, epoch_end=False), "only an epoch end can stop"
    assert policy.should_stop(3, epoch_end=True), "epoch mean 0.45 < 0.5"
    assert policy.skipped == [1, 3] and policy.epoch_means == pytest.approx([0.5, 0.45])
    capped = LocFTPolicy(LocFTConfig(layer=0, threshold=0.0, epochs=2), {0: []})
    assert [capped.should_stop(s, epoch_end=True) for s in range(2)] == [False, True], "at most `epochs` epochs"


def test_loop_skips_and_stops_early(edit_folder, tmp_path) -> None:
    # every batch below the threshold: nothing steps and the first epoch (2 batches of 10) ends the run
    summary = dt.train(run_config(edit_folder, tmp_path / "skip", {"layer": 1, "threshold": 100.0}))
    assert summary["steps"] == 2 and all(r.get("skipped") for r in summary["history"])
    assert summary["stored_bytes"] == 0, "no update: the delta is zero and nothing is stored"
    # threshold 0: every batch steps, the run ends after `epochs` epochs although train.steps is larger
    summary = dt.train(run_config(edit_folder, tmp_path / "cap", {"layer": 1, "threshold": 0.0, "epochs": 2}))
    assert summary["steps"] == 4 and not any(r.get("skipped") for r in summary["history"])
    assert "eval_edit_success" in summary["final"]


# 5 ---------------------------------------------------------------------------------------------------
def test_breadth_first_recalls_what_depth_first_overwrites(edit_folder, tmp_path) -> None:
    summary = dt.train(run_config(edit_folder, tmp_path / "bf", {"layer": 1}))  # 25 epochs x 2 batches of 10
    assert summary["steps"] == 50
    assert summary["final"]["eval_edit_success"] >= 0.95

    # depth-first: each edit to convergence (or 30 steps) in turn, same layer, optimizer and lr
    tok = word_tokenizer()
    facts = random_facts()
    tuned = dt.attach(dt.models.load(str(edit_folder)), "locft", layer=1)
    task = edit_task(tok, facts)
    opt = torch.optim.Adam(tuned.trainable_parameters(), lr=5e-2)
    for f in task.train:
        one = task.collate([f])
        for _ in range(30):
            loss, _ = task.loss(tuned, one)
            if loss.item() < 0.01:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    first = edit_task(tok, facts[:10]).evaluate(tuned)["edit_success"]
    assert first <= 0.8 < summary["final"]["eval_edit_success"], "later edits overwrite the first ones"

    # deltatune eval on the artifact reports edit success
    metrics = api.eval(tmp_path / "bf", {"path": str(edit_folder / "edits.jsonl"), "task": "edit", "max_length": 16})
    assert metrics["edit_success"] == summary["final"]["eval_edit_success"]


# the layer search --------------------------------------------------------------------------------------
def test_search_picks_the_largest_gradient_l1_and_keeps_one_layer(tmp_path) -> None:
    x = batch(n=2, length=7)
    x["labels"] = x["input_ids"]
    reference = MODELS["llama"]()  # the gradient of each block's down_proj weight, on the plain model
    loss = reference(**x).loss
    weights = [reference.model.layers[i].mlp.down_proj.weight for i in range(3)]
    l1 = [g.abs().sum().item() for g in torch.autograd.grad(loss, weights)]

    model = MODELS["llama"]()
    tuned = dt.attach(model, "locft")
    assert len(tuned.delta_names) == 3 and tuned.method_config.layer is None
    before = output_of(tuned, x)
    opt = torch.optim.Adam(tuned.trainable_parameters(), lr=1e-2)
    tuned(**x).loss.backward()
    tuned.policy.before_optimizer_step(0, tuned, opt)
    assert [tuned.policy.scores[i] for i in range(3)] == pytest.approx(l1, rel=1e-5)
    best = max(range(3), key=lambda i: l1[i])
    assert tuned.policy.layer == best
    opt.step()
    tuned.policy.after_optimizer_step(0, tuned, opt)
    assert tuned.delta_names == [f"model.layers.{best}.mlp.down_proj.weight"]
    assert tuned.method_config.layer == best and not torch.equal(output_of(tuned, x), before)
    tuned.save(tmp_path / "a")
    assert dt.inspect(tmp_path / "a")["config"]["layer"] == best
    assert torch.equal(output_of(dt.load(MODELS["llama"](), tmp_path / "a"), x), output_of(tuned, x))

    # resume: a fresh searching delta takes the chosen layer from the policy state before its tensors load
    again = dt.attach(MODELS["llama"](), "locft", search_layers=[(best + 1) % 3, best])
    assert len(again.delta_names) == 2
    again.policy.load_state_dict(tuned.policy.state_dict())
    assert again.delta_names == tuned.delta_names and again.method_config.layer == best


def test_searched_run_resumes_bit_identically(edit_folder, tmp_path) -> None:
    method = {"threshold": 0.0}  # layer: null -> searched at the first step
    straight = run_config(edit_folder, tmp_path / "straight", method, steps=6, lr=1e-2)
    dt.train(straight)
    first = run_config(edit_folder, tmp_path / "resumed", method, steps=3, lr=1e-2)
    dt.train(first)
    dt.train({**first, "train": {**first["train"], "steps": 6}}, resume=True)
    a, b = (dt.inspect(tmp_path / d) for d in ("straight", "resumed"))
    assert a["config"]["layer"] == b["config"]["layer"] is not None
    base = str(edit_folder)
    sa = dt.load(dt.models.load(base), tmp_path / "straight").delta_state_dict()
    sb = dt.load(dt.models.load(base), tmp_path / "resumed").delta_state_dict()
    assert list(sa) == list(sb) == [f"model.layers.{a['config']['layer']}.mlp.down_proj.weight.delta"]
    assert torch.equal(sa[next(iter(sa))], sb[next(iter(sb))])


def test_trainer_bridge_skips_and_stops() -> None:
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from deltatune.train.hf import DeltaTuneCallback

    tuned = dt.attach(MODELS["llama"](), "locft", layer=1, threshold=0.5, epochs=5)
    callback = DeltaTuneCallback(tuned)
    opt = torch.optim.Adam(tuned.trainable_parameters(), lr=1e-2)
    x = batch()
    x["labels"] = x["input_ids"]
    tuned(**x).loss.backward()
    callback.step_loss = torch.tensor(0.2)  # what DeltaTuneTrainer.training_step records
    callback.run_before(0, opt)
    assert all(p.grad is None for p in tuned.deltas.parameters()), "a skipped step drops the delta's gradients"
    args, control = TrainingArguments(output_dir="unused", report_to=[]), TrainerControl()
    callback.on_step_end(args, TrainerState(global_step=1, epoch=0.5), control)
    assert not control.should_training_stop
    callback.on_step_end(args, TrainerState(global_step=1, epoch=1.0), control)
    assert control.should_training_stop, "the epoch's mean loss 0.2 < 0.5 ends training"
