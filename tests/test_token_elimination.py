"""LeMo token elimination (train.token_elimination): the sparse layer against the dense one, memory, the labelled
span, the pattern predictor, exact resume, and a LoRA run that learns with it (docs/lemo.md)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.errors import DeltatuneError
from deltatune.train import token_elimination as te
from deltatune.train.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

T, SEG = 256, 32


def model(layers: int = 4, attn: str = "sdpa", seed: int = 0, **extra) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, **extra)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).float()


def lora(m: torch.nn.Module, seed: int = 1):
    tuned = dt.attach(m, "lora", r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.deltas.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return tuned


def batch(seed: int = 0, b: int = 2, labelled_from: int = T - 20) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (b, T), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, labelled_from:] = ids[:, labelled_from:]
    return {"input_ids": ids, "labels": labels}


def layer_inputs(m: LlamaForCausalLM, seed: int = 0, b: int = 1) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, T, 64, generator=g)
    pos = torch.arange(T)[None]
    return hidden, {"attention_mask": None, "position_ids": pos,
                    "position_embeddings": m.model.rotary_emb(hidden, pos)}


def half_segments(b: int = 1) -> torch.Tensor:
    segs = [0, 2, 3, 6, 7]  # of 8
    return torch.cat([torch.arange(s * SEG, (s + 1) * SEG) for s in segs])[None].expand(b, -1)


def grads(tuned) -> list[torch.Tensor]:
    return [p.grad.clone() for p in tuned.deltas.parameters()]


def forward_backward(tuned, inputs, elim=None):
    tuned.zero_grad(set_to_none=True)
    ctx = elim.batch(inputs) if elim is not None else torch.enable_grad()
    with ctx:
        out = tuned(input_ids=inputs["input_ids"], use_cache=False).logits
    out.square().mean().backward()
    return out.detach(), grads(tuned)


def test_sparsity_zero_is_the_plain_model() -> None:
    tuned = lora(model()).train()
    x = batch()
    ref_logits, ref_grads = forward_backward(tuned, x)
    elim = te.install(tuned, te.TokenEliminationSettings(sparsity=0.0, segment=SEG, exempt_layers=[]))
    logits, got = forward_backward(tuned, x, elim)
    assert torch.equal(logits, ref_logits)
    assert all(torch.equal(a, b) for a, b in zip(got, ref_grads, strict=True))


def test_gather_path_with_everything_kept_equals_the_dense_layer() -> None:
    m = model().train()
    layer = m.model.layers[1]
    hidden, kw = layer_inputs(m, b=2)
    hidden.requires_grad_(True)
    dense = layer(hidden, **kw)
    kept = te.run_on_kept(layer.forward, hidden, torch.arange(T).expand(2, T), kw)
    torch.testing.assert_close(kept, dense, rtol=1e-6, atol=1e-6 * dense.abs().max().item())


def test_eliminated_rows_pass_through_and_kept_rows_are_the_dense_subsequence() -> None:
    m = model().train()
    layer = m.model.layers[2]
    hidden, kw = layer_inputs(m)
    keep = half_segments()
    out = te.run_on_kept(layer.forward, hidden, keep, kw)
    dropped = torch.ones(T, dtype=torch.bool)
    dropped[keep[0]] = False
    assert torch.equal(out[:, dropped], hidden[:, dropped]), "eliminated rows must be the input, bit for bit"
    sub = hidden[:, keep[0]]
    pos = keep[0][None]  # the original position ids
    reference = layer(sub, attention_mask=None, position_ids=pos, position_embeddings=m.model.rotary_emb(sub, pos))
    torch.testing.assert_close(out[:, keep[0]], reference, rtol=1e-6, atol=1e-6 * reference.abs().max().item())


def test_a_gathered_eager_mask_is_the_causal_mask_of_the_original_order() -> None:
    eager, sdpa = model(attn="eager"), model(attn="sdpa")
    hidden, kw = layer_inputs(sdpa)
    causal = torch.full((T, T), float("-inf")).triu(1)[None, None]
    keep = half_segments()
    a = te.run_on_kept(eager.model.layers[1].forward, hidden, keep, {**kw, "attention_mask": causal})
    b = te.run_on_kept(sdpa.model.layers[1].forward, hidden, keep, kw)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_a_changed_future_token_never_changes_earlier_kept_outputs() -> None:
    m = model().train()
    layer = m.model.layers[1]
    hidden, kw = layer_inputs(m)
    keep = half_segments()
    changed = hidden.clone()
    cut = 5 * SEG + 7
    changed[:, cut:] = torch.randn(1, T - cut, 64)
    a = te.run_on_kept(layer.forward, hidden, keep, kw)
    b = te.run_on_kept(layer.forward, changed, keep, kw)
    assert torch.equal(a[:, :cut], b[:, :cut])
    assert not torch.equal(a[:, cut:], b[:, cut:])


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn`` runs (each storage once, parameters left out)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            seen[(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_saved_tensor_bytes_fall_with_the_share_kept() -> None:
    tuned = lora(model()).train()
    layer = tuned.model.model.layers[1]
    hidden, kw = layer_inputs(tuned.model)
    hidden.requires_grad_(True)
    keep = half_segments()
    dense = saved_bytes(lambda: layer(hidden, **kw))
    sparse = saved_bytes(lambda: te.run_on_kept(layer.forward, hidden, keep, kw))
    share = keep.shape[1] / T
    assert abs(sparse / dense - share) <= 0.1 * share, (sparse / dense, share)
    # the whole model: 3 of 4 layers eliminate half of the 8 segments (at most the 6 of them not kept by rule)
    x = batch(b=1)
    plain = saved_bytes(lambda: tuned(input_ids=x["input_ids"], use_cache=False))
    elim = te.install(tuned, te.TokenEliminationSettings(sparsity=0.5, segment=SEG, exempt_layers=[0]))
    with elim.batch(x):
        thinned = saved_bytes(lambda: tuned(input_ids=x["input_ids"], use_cache=False))
    assert thinned < 0.75 * plain, thinned / plain


def test_labelled_positions_and_the_first_segment_are_never_eliminated() -> None:
    tuned = lora(model()).train()
    x = batch(b=2, labelled_from=100)
    x["labels"][:, 180:] = -100  # labels on 100..179: segments 3..5 (and position 99, which predicts 100)
    elim = te.install(tuned, te.TokenEliminationSettings(sparsity=0.9, segment=SEG, exempt_layers=[0],
                                                         predictor_every=1))
    with elim.batch(x):
        tuned(input_ids=x["input_ids"], use_cache=False).logits.sum().backward()
    must = set(range(0, SEG)) | set(range(99, 180)) | set(range(T - SEG, T))
    for layer in elim.active_layers:
        for row in elim.kept[layer]:
            kept = set(row.tolist())
            assert must <= kept
            assert len(kept) == len(must | set(range(96, 192)))  # whole segments, nothing else left


def test_eval_mode_and_forwards_outside_a_batch_are_dense() -> None:
    tuned = lora(model())
    x = batch()
    tuned.eval()
    with torch.no_grad():
        ref = tuned(input_ids=x["input_ids"]).logits
        elim = te.install(tuned, te.TokenEliminationSettings(sparsity=0.5, segment=SEG, exempt_layers=[0]))
        with elim.batch(x):
            assert torch.equal(tuned(input_ids=x["input_ids"]).logits, ref)
        tuned.train()
        assert torch.equal(tuned(input_ids=x["input_ids"]).logits, ref)


# -- scores and the pattern predictor on a synthetic input: a layer whose keys attend to a marker direction


def marked_layer() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, LlamaForCausalLM]:
    """A layer whose attention goes to tokens along ``w`` (q ∝ (u·x), k ∝ (w·x) on RoPE's slowest pair)."""
    m = model(layers=2, rope_theta=1e6)
    layer = m.model.layers[1]
    g = torch.Generator().manual_seed(3)
    u, w = torch.linalg.qr(torch.randn(64, 2, generator=g))[0].T
    hd, heads, kv = 16, 4, 2
    with torch.no_grad():
        layer.input_layernorm.weight.fill_(1.0)
        layer.self_attn.q_proj.weight.zero_()
        layer.self_attn.k_proj.weight.zero_()
        for h in range(heads):
            layer.self_attn.q_proj.weight[h * hd + hd // 2 - 1] = u
        for h in range(kv):
            layer.self_attn.k_proj.weight[h * hd + hd // 2 - 1] = w
    return layer, u, w, m


def marked_inputs(u: torch.Tensor, w: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states with two marker segments per row (among segments 1..6): their tokens carry w."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, T, 64, generator=g) * 0.3 + u
    marked = torch.stack([torch.randperm(6, generator=g)[:2] + 1 for _ in range(n)])
    for i in range(n):
        for s in marked[i]:
            hidden[i, s * SEG:(s + 1) * SEG] += 1.5 * w
    return hidden, marked


def test_true_scores_put_the_attended_segments_on_top() -> None:
    layer, u, w, m = marked_layer()
    hidden, marked = marked_inputs(u, w, 8, seed=0)
    pos = torch.arange(T)[None]
    kw = {"position_embeddings": m.model.rotary_emb(hidden, pos)}
    seg = te.predictor_target(te.true_scores(layer, hidden, kw, None), SEG)[:, 1:7]  # the eliminable segments
    top = seg.topk(2, -1).indices + 1
    assert torch.equal(top.sort(-1).values, marked.sort(-1).values)


def test_the_predictor_trained_online_reaches_high_top_k_recall() -> None:
    layer, u, w, m = marked_layer()
    elim = te.Eliminator(m, te.TokenEliminationSettings(sparsity=0.5, segment=SEG, exempt_layers=[0],
                                                        predictor_lr=1e-2))
    pos = torch.arange(T)[None]
    for i in range(50):  # 50 samples, one online update each, as true-score forwards give them
        hidden, _ = marked_inputs(u, w, 1, seed=100 + i)
        target = te.predictor_target(te.true_scores(layer, hidden, {"position_embeddings": m.model.rotary_emb(
            hidden, pos)}, None), SEG)
        elim.train_predictors(te.segment_means(hidden, SEG), target, 1, 2)
    hidden, marked = marked_inputs(u, w, 20, seed=7)
    with torch.no_grad():
        predicted = elim.predictors["1"](te.segment_means(hidden, SEG))[..., 0]
    truth = torch.zeros(20, T // SEG)
    truth.scatter_(1, marked, 1.0)
    assert te.top_recall(predicted[:, 1:7], truth[:, 1:7], 2) >= 0.9


# -- the training loop: exact resume, a run that learns, refusals

WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def copy_run(tmp_path_factory) -> tuple[str, str]:
    """A tiny word-level Llama (hidden 64, 4 layers) and a copy task: a 200-word prompt, the completion three fixed
    words and the prompt's word 100 (the context it needs sits in segment 3 of 32-token segments)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("lemo")
    vocab = ["[PAD]", "[UNK]", "[EOS]", *WORDS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                            eos_token="[EOS]").save_pretrained(root / "model")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    LlamaForCausalLM(cfg).save_pretrained(root / "model")
    rng = random.Random(0)
    with (root / "copy.jsonl").open("w") as f:
        for _ in range(64):
            words = [rng.choice(WORDS) for _ in range(200)]
            f.write(json.dumps({"prompt": " ".join(words), "completion": f"w1 w2 w3 {words[100]}"}) + "\n")
    return str(root / "model"), str(root / "copy.jsonl")


def copy_config(copy_run, out: Path, elimination: dict | None, **train) -> dict:
    folder, path = copy_run
    return {
        "model": folder,
        "data": {"path": path, "task": "chat", "max_length": 256, "eval_fraction": 0.125},
        "method": {"name": "lora", "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "up_proj", "down_proj"]},
        "train": {"steps": 6, "batch_size": 4, "lr": 1e-2, "save_every": 2, "keep_last": 4, "eval_every": 0,
                  "progress": False, "token_elimination": elimination, **train},
        "output": str(out),
    }


ELIMINATION = {"sparsity": 0.5, "segment": 32, "exempt_layers": [0], "predictor_every": 2}


def test_predictor_state_is_checkpointed_and_resume_is_exact(copy_run, tmp_path) -> None:
    from conftest import train_then_resume

    from deltatune.train.state import load_checkpoint

    def inspect(folders: list[Path]) -> None:
        state = load_checkpoint(folders[0])["token_elimination"]
        assert state["forwards"] == 2
        assert set(state["predictors"]) >= {"1.0.weight", "3.2.bias"}
        assert state["optimizer"]["state"], "the predictors trained at the first forward"

    train_then_resume(copy_config(copy_run, tmp_path / "run", ELIMINATION), keep=1, inspect=inspect)


def test_lora_with_elimination_lowers_the_loss(copy_run, tmp_path, monkeypatch) -> None:
    made: list[te.Eliminator] = []
    install = te.install

    def spy(*args, **kwargs):
        made.append(install(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(te, "install", spy)
    finals = {}
    for name, elimination in (("dense", None), ("lemo", {**ELIMINATION, "predictor_every": 4})):
        summary = dt.train(copy_config(copy_run, tmp_path / name, elimination, steps=30, save_every=0, lr=3e-2))
        losses = [h["loss"] for h in summary["history"]]
        assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4, (name, losses)
        finals[name] = summary["final"]["eval_loss"]
    assert finals["lemo"] < 1.2 * finals["dense"], finals
    kept = made[-1].kept[1]
    assert kept.shape[1] < 256 * 0.75, "the eliminating layers ran on fewer rows"


def test_unsupported_models_and_settings_are_refused(copy_run, tmp_path) -> None:
    settings = te.TokenEliminationSettings(sparsity=0.5)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(DeltatuneError, match="supports Llama-style decoders"):
        te.install(gpt2, settings)
    with pytest.raises(DeltatuneError, match="attn_implementation"):
        te.install(model(attn="flex_attention"), settings)
    with pytest.raises(DeltatuneError, match="task 'text' labels every token"):
        te.install(model(), settings, task=type("Task", (), {"kind": "text"})())
    with pytest.raises(DeltatuneError, match="data.packing"):
        te.install(model(), settings, task=type("Task", (), {"kind": "chat"})(), data=type("D", (), {"packing": True}))
    with pytest.raises(DeltatuneError, match="exempt_layers: 9"):
        te.install(model(), te.TokenEliminationSettings(exempt_layers=[9]))
    with pytest.raises(DeltatuneError, match="sparsity=1.5"):
        load_config(copy_config(copy_run, tmp_path / "bad", {"sparsity": 1.5}))
    with pytest.raises(DeltatuneError, match="token_elimination.segmnt"):
        load_config(copy_config(copy_run, tmp_path / "bad", {"segmnt": 4}))


def test_long_document_rows_are_written_whole_and_never_over_a_file(tmp_path) -> None:
    import json

    from deltatune.data.long_documents import LongDocument, write_jsonl
    from deltatune.errors import DeltatuneError

    class Words:  # decode: ids as words
        def decode(self, ids: list[int]) -> str:
            return " ".join(f"w{i}" for i in ids)

    docs = [LongDocument("tech", [1, 2, 3], [4, 5]), LongDocument("sport", [6], [7])]
    path = write_jsonl(tmp_path / "sub" / "long.jsonl", docs, Words())
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"prompt": "w1 w2 w3", "completion": "w4 w5", "topic": "tech"},
                    {"prompt": "w6", "completion": "w7", "topic": "sport"}]
    assert sorted(p.name for p in path.parent.iterdir()) == ["long.jsonl"], "no temporary left behind"
    with pytest.raises(DeltatuneError, match="never replaces a file"):
        write_jsonl(path, docs[:1], Words())
    assert path.read_text().count("\n") == 2, "the existing file is untouched"
    (tmp_path / "file").write_text("x")
    with pytest.raises(DeltatuneError, match="cannot write"):
        write_jsonl(tmp_path / "file" / "long.jsonl", docs, Words())  # a file where the folder should be
