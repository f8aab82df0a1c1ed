"""Prefix tuning, prompt tuning and P-tuning v2 against the unified view's invariants
(He et al., ICLR 2022: the gated-adapter view, padding, generation with the KV cache), the reparametrisation's
folding and the parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    MODELS,
    VOCAB,
    batch,
    output_of,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    train_then_resume,
    word_run_config,
)
from safetensors.torch import load_file

import deltatune as dt
from deltatune.core import registry
from deltatune.core.forms.attention import prepend_keys
from deltatune.data.tasks import left_pad, right_pad
from deltatune.errors import DeltatuneError
from deltatune.methods._prefix import ENCODER_NAME, stored_count

# the tiny models: 3 layers; llama 2 key/value heads of 8 (GQA), gpt2 / bert 4 heads of 8
L, D_KV = 3, {"llama": 16, "gpt2": 32, "bert": 32}
METHODS = [("prefix", {"length": 3, "mid_dim": 8}), ("prompt", {"length": 3}), ("ptuning_v2", {"length": 3})]
IDS = [m for m, _ in METHODS]


def _seqs(seed: int = 3, lengths: tuple[int, ...] = (7, 4, 5)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


# ---------------------------------------------------------------- spec 2: the gated-adapter view

def test_prefix_equals_the_gated_formula() -> None:
    """Attention over [P_k; K], [P_v; V] == (1−λ)·Attn(q, K, V) + λ·softmax(q P_kᵀ)P_v, λ the prefix's share."""
    g = torch.Generator().manual_seed(0)
    b, h, n, m, n_prefix, d = 2, 3, 5, 6, 4, 8
    q, k, v = (torch.randn(b, h, s, d, generator=g, dtype=torch.float64) for s in (n, m, m))
    pk, pv = (torch.randn(1, h, n_prefix, d, generator=g, dtype=torch.float64) for _ in range(2))
    keys, values, mask = prepend_keys(q, k, v, None, pk, pv, causal=False)
    assert mask is None
    joint = F.scaled_dot_product_attention(q, keys, values)

    s_base, s_pre = q @ k.transpose(-1, -2) / math.sqrt(d), q @ pk.transpose(-1, -2) / math.sqrt(d)
    attn, prefix_attn = s_base.softmax(-1) @ v, s_pre.softmax(-1) @ pv
    e_pre, e_base = s_pre.exp().sum(-1, keepdim=True), s_base.exp().sum(-1, keepdim=True)
    lam = e_pre / (e_pre + e_base)
    gated = (1 - lam) * attn + lam * prefix_attn
    assert torch.allclose(joint, gated, atol=1e-6, rtol=0)
    assert 0.05 < float(lam.min()) and float(lam.max()) < 0.95  # both parts matter in this example


# ---------------------------------------------------------------- spec 3: padding

def _causal_padded_vs_alone(tuned: torch.nn.Module, seqs: list[list[int]]) -> None:
    padded = left_pad(seqs, 0)  # with explicit position ids, as the classification task sends them
    with torch.no_grad():
        together = tuned(**padded).logits
        for i, s in enumerate(seqs):
            alone = tuned(input_ids=torch.tensor([s])).logits[0]
            assert torch.allclose(together[i, -len(s):], alone, atol=1e-5, rtol=0), f"example {i}"


@pytest.mark.parametrize(("method", "options"), METHODS, ids=IDS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_batch_equals_examples_alone(arch: str, method: str, options: dict) -> None:
    tuned = dt.attach(MODELS[arch](), method, **options)
    _causal_padded_vs_alone(tuned, _seqs())


def test_padding_with_eager_attention() -> None:
    model = tiny_gpt2()
    model.config._attn_implementation = "eager"
    _causal_padded_vs_alone(dt.attach(model, "prefix", length=3, reparam=False), _seqs())
    assert model.config._attn_implementation == "deltatune_eager"


@pytest.mark.parametrize(("method", "options"), METHODS, ids=IDS)
def test_right_padded_bert_batch_equals_examples_alone(method: str, options: dict) -> None:
    tuned = dt.attach(tiny_bert(), method, **options)
    seqs = _seqs(lengths=(6, 3, 4))
    padded = right_pad(seqs, 0)
    with torch.no_grad():
        out = tuned(**padded, output_hidden_states=True)
        for i, s in enumerate(seqs):
            alone = tuned(input_ids=torch.tensor([s]), output_hidden_states=True)
            assert torch.allclose(out.logits[i], alone.logits[0], atol=1e-5, rtol=0)
            # hidden states come back at the caller's positions (a prompt's soft tokens removed)
            assert out.hidden_states[-1].shape[1] == padded["input_ids"].shape[1]
            assert torch.allclose(out.hidden_states[-1][i, :len(s)], alone.hidden_states[-1][0], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- spec 6: generation with the KV cache

@pytest.mark.parametrize(("method", "options"), METHODS, ids=IDS)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_with_cache_equals_full_recomputation(arch: str, method: str, options: dict) -> None:
    tuned = dt.attach(MODELS[arch](), method, **options)
    prompts = left_pad(_seqs(lengths=(5, 3)), 0)
    del prompts["position_ids"]  # generate derives them from the mask
    runs = {}
    for cache in (True, False):
        runs[cache] = tuned.generate(**prompts, max_new_tokens=6, do_sample=False, use_cache=cache, pad_token_id=0,
                                     return_dict_in_generate=True, output_logits=True)
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    for step, (a, b) in enumerate(zip(runs[True].logits, runs[False].logits, strict=True)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), f"step {step}"
    # and token by token, each step's logits are those of one forward over the whole sequence so far
    seq, width = runs[True].sequences, prompts["input_ids"].shape[1]
    mask = torch.cat([prompts["attention_mask"], torch.ones(2, seq.shape[1] - width, dtype=torch.long)], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = tuned(input_ids=seq, attention_mask=mask, position_ids=positions).logits
    for step, logits in enumerate(runs[True].logits):
        assert torch.allclose(full[:, width + step - 1], logits, atol=1e-5, rtol=0)
    # a plain forward in two chunks through the cache, positions left to the model, equals one forward
    ids = torch.tensor(_seqs(lengths=(8,)))
    with torch.no_grad():
        whole = tuned(input_ids=ids).logits
        first = tuned(input_ids=ids[:, :5], use_cache=True)
        assert first.past_key_values.get_seq_length() == 5, "the cache holds the real tokens only"
        rest = tuned(input_ids=ids[:, 5:], past_key_values=first.past_key_values, use_cache=True).logits
    assert torch.allclose(torch.cat([first.logits, rest], 1), whole, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- prompt tuning == literal prepending

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prompt_equals_prepending_the_embeddings(arch: str) -> None:
    model = MODELS[arch]()
    tuned = dt.attach(model, "prompt", length=4)
    prompt = tuned.forms()["prompt"].embedding.detach()
    seqs = _seqs()
    x = left_pad(seqs, 0)
    labels = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    b, k = len(seqs), 4
    with torch.no_grad():
        ours = tuned(**x, labels=labels)
        plain = ours.logits.shape
        tuned.detach()  # the reference: the base model fed cat(prompt, embeddings) by hand
        embeds = torch.cat([prompt.expand(b, -1, -1), model.get_input_embeddings()(x["input_ids"])], 1)
        ref = model(inputs_embeds=embeds, attention_mask=torch.cat([torch.ones(b, k, dtype=torch.long),
                                                                   x["attention_mask"]], 1),
                    position_ids=torch.cat([torch.arange(k).expand(b, -1), x["position_ids"] + k], 1),
                    # the loss is over the caller's own sequence: its first token is predicted by nothing (a
                    # literal concatenation, as PEFT's, would also score it from the last soft token)
                    labels=torch.cat([torch.full((b, k + 1), -100), labels[:, 1:]], 1))
    assert plain == (b, x["input_ids"].shape[1], VOCAB), "logits align with the caller's positions"
    real = x["attention_mask"].bool()
    assert torch.allclose(ours.logits[real], ref.logits[:, k:][real], atol=1e-5, rtol=0)
    assert torch.allclose(ours.loss, ref.loss, atol=1e-6, rtol=1e-5), "the loss of tuned(ids, mask, labels=...)"
    # without position ids or mask (positions 0.. as the model would number them)
    tuned = dt.attach(model, "prompt", length=4)
    tuned.forms()["prompt"].load_stored({"embedding": prompt})
    ids = torch.tensor([seqs[0]])
    with torch.no_grad():
        ours = tuned(input_ids=ids).logits
        tuned.detach()
        ref = model(inputs_embeds=torch.cat([prompt[None], model.get_input_embeddings()(ids)], 1)).logits[:, k:]
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)


def test_prompt_on_bert_goes_after_cls() -> None:
    model = tiny_bert()
    tuned = dt.attach(model, "prompt", length=4)
    prompt = tuned.forms()["prompt"].embedding.detach()
    x = right_pad(_seqs(lengths=(6, 3)), 0)
    y = torch.tensor([0, 2])
    with torch.no_grad():
        ours = tuned(**x, labels=y)
        tuned.detach()
        e = model.get_input_embeddings()(x["input_ids"])
        embeds = torch.cat([e[:, :1], prompt.expand(2, -1, -1), e[:, 1:]], 1)
        mask = torch.cat([x["attention_mask"][:, :1], torch.ones(2, 4, dtype=torch.long), x["attention_mask"][:, 1:]], 1)
        ref = model(inputs_embeds=embeds, attention_mask=mask, labels=y)
    assert torch.allclose(ours.logits, ref.logits, atol=1e-6, rtol=1e-5)
    assert torch.allclose(ours.loss, ref.loss, atol=1e-6, rtol=1e-5)


def test_prompt_init_from_vocabulary_or_uniform() -> None:
    model = tiny_llama()
    table = model.get_input_embeddings().weight.detach()
    prompt = dt.attach(model, "prompt", length=5).forms()["prompt"].embedding.detach()
    assert all(bool((table == row).all(-1).any()) for row in prompt), "each soft token is a vocabulary embedding"
    prompt = dt.attach(tiny_llama(), "prompt", length=50, init="random").forms()["prompt"].embedding.detach()
    assert float(prompt.abs().max()) <= 0.5 and float(prompt.std()) > 0.2


def test_prompt_beyond_the_position_table_says_so() -> None:
    tuned = dt.attach(tiny_gpt2(), "prompt", length=60)  # 64 positions
    with pytest.raises(DeltatuneError, match="positions"):
        tuned(**batch(length=9))


# ---------------------------------------------------------------- the reparametrisation, folded

def _train(tuned: torch.nn.Module, steps: int = 2, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=lr)
    x = batch()
    for _ in range(steps):
        opt.zero_grad()
        tuned(**x, labels=x["input_ids"]).loss.backward()
        opt.step()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reparam_is_folded_into_the_artifact(arch: str, tmp_path) -> None:
    k, mid, d = 3, 8, 32
    tuned = dt.attach(MODELS[arch](), "prefix", length=k, mid_dim=mid)
    mlp = k * d + d * mid + mid + mid * 2 * L * D_KV[arch] + 2 * L * D_KV[arch]
    stored = 2 * L * k * D_KV[arch]
    assert tuned.num_trainable() == mlp, "training counts the MLP"
    assert stored_count(tuned.forms()) == stored, "the artifact does not"
    assert tuned.forms()[ENCODER_NAME].mlp_parameters() == mlp
    _train(tuned)
    x = batch()
    trained = output_of(tuned, x)
    tuned.save(tmp_path / "a")
    keys = load_file(tmp_path / "a" / "delta.safetensors")
    assert not any(ENCODER_NAME in k for k in keys), "no MLP tensor in the artifact"
    assert {k.rsplit(".", 1)[1] for k in keys} == {"key", "value"} and len(keys) == 2 * L
    assert sum(t.numel() for t in keys.values()) == stored
    info = dt.inspect(tmp_path / "a")
    assert info["stored_values"] == stored and info["trainable"] == mlp
    loaded = dt.load(MODELS[arch](), tmp_path / "a")
    assert ENCODER_NAME not in loaded.forms() and loaded.num_trainable() == stored
    assert torch.equal(output_of(loaded, x), trained), "the folded P_k, P_v reproduce the trained model exactly"


def test_direct_prefix_counts_and_gqa_shapes() -> None:
    tuned = dt.attach(tiny_llama(), "prefix", length=5, reparam=False)
    assert tuned.num_trainable() == 2 * L * 5 * D_KV["llama"]
    form = tuned.forms()["model.layers.0.self_attn"]
    assert form.key.shape == (2, 5, 8)  # 2 key/value heads (of 4 query heads), 5 prefix vectors, head dim 8
    assert dt.attach(tiny_llama(), "prefix", length=5, reparam=False, layers="1:").num_trainable() == 2 * 2 * 5 * 16


def test_ptuning_v2_trains_the_classification_head(tmp_path) -> None:
    tuned = dt.attach(tiny_bert(), "ptuning_v2", length=4)
    forms = tuned.forms()
    assert {"classifier.weight", "classifier.bias"} <= set(forms)
    head = 3 * 32 + 3
    assert tuned.num_trainable() == 2 * L * 4 * D_KV["bert"] + head
    x = batch()
    F.cross_entropy(tuned(**x).logits, torch.tensor([0, 1])).backward()
    assert forms["classifier.weight"].delta.grad is not None and forms["bert.encoder.layer.0.attention.self"].key.grad \
        is not None
    assert "classifier.weight" not in dt.attach(tiny_bert(), "ptuning_v2", train_head=False).forms()
    assert not any(n.startswith(("lm_head", "score")) for n in dt.attach(tiny_llama(), "ptuning_v2").forms())
    reparam = dt.attach(tiny_bert(), "ptuning_v2", length=4, reparam=True, mid_dim=8)
    assert ENCODER_NAME in reparam.forms()


def test_reparam_state_travels_with_the_policy_for_the_trainer_bridge() -> None:
    """The Trainer bridge's checkpoint is the artifact (folded) + the policy state: loading the artifact into a
    training delta serves the folded P_k, P_v; the policy state then restores the MLP itself, exactly."""
    a = dt.attach(tiny_llama(), "prefix", length=3, mid_dim=8)
    _train(a)
    x = batch()
    trained = output_of(a, x)
    artifact, state = a.delta_state_dict(), a.policy.state_dict()
    b = dt.attach(tiny_llama(), "prefix", length=3, mid_dim=8)
    assert not torch.equal(output_of(b, x), trained)
    b.load_delta_state_dict(artifact)
    assert torch.equal(output_of(b, x), trained), "an artifact loaded into a training delta is served as saved"
    b.policy.load_state_dict(state)
    for (n, p), q in zip(b.forms()[ENCODER_NAME].named_parameters(), a.forms()[ENCODER_NAME].parameters(), strict=True):
        assert torch.equal(p, q), n
    assert torch.equal(output_of(b, x), trained)
    assert b.forms()[ENCODER_NAME]._pins == {}, "the restored MLP serves again"


def test_resume_through_dt_train_ends_bit_identical(word_run, tmp_path) -> None:
    cfg = word_run_config(word_run, {"name": "prefix", "length": 4, "mid_dim": 16}, tmp_path / "run", steps=4)
    _, resumed = train_then_resume(cfg, keep=1)  # the reparametrisation MLP travels in the checkpoint
    assert resumed["resumed_from"] == 2


# ---------------------------------------------------------------- serving: no merge, exact detach

@pytest.mark.parametrize(("method", "options"), METHODS, ids=IDS)
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_merge_refuses_and_detach_restores_the_base(arch: str, method: str, options: dict) -> None:
    model = MODELS[arch]()
    x = batch()
    base = output_of(model, x)
    tuned = dt.attach(model, method, **options)
    assert not torch.allclose(output_of(tuned, x), base), "a prefix changes attention from the start, by design"
    with pytest.raises(DeltatuneError, match="attached"):
        tuned.merge()
    assert not registry.get(method).mergeable
    plain = tuned.detach()
    assert torch.equal(output_of(plain, x), base)
    assert plain.config._attn_implementation == "sdpa", "the model's own attention is back"


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_gradient_checkpointing_gives_the_same_gradients(method: str) -> None:
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama()
        torch.manual_seed(0)
        tuned = dt.attach(model, method, length=3, **({"mid_dim": 8} if method == "prefix" else {}))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        tuned.train()
        x = batch()
        tuned(**x, labels=x["input_ids"]).loss.backward()
        grads.append([p.grad.clone() for p in tuned.trainable_parameters()])
        tuned.detach()
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("method", "options"), METHODS, ids=IDS)
def test_an_artifact_refuses_another_base(method: str, options: dict, tmp_path) -> None:
    tuned = dt.attach(tiny_llama(), method, **options)
    tuned.save(tmp_path / "a")
    with pytest.raises(DeltatuneError, match="another base model"):
        dt.load(tiny_llama(seed=1), tmp_path / "a")  # same architecture and shapes, other weights


def test_trainer_bridge_resume_restores_the_mlp(tmp_path) -> None:
    """transformers.Trainer checkpoints hold the artifact (folded) and the policy state (the MLP)."""
    from transformers import TrainingArguments

    from deltatune.train.hf import DeltaTuneTrainer

    g = torch.Generator().manual_seed(3)
    rows = [{"input_ids": ids, "labels": ids.clone()} for ids in torch.randint(0, VOCAB, (8, 10), generator=g)]

    def run(out, steps: int, resume: bool = False) -> dt.Tuned:
        torch.manual_seed(0)
        tuned = dt.attach(tiny_llama(), "prefix", length=3, mid_dim=8)
        args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2, report_to=[],
                                 use_cpu=True, save_strategy="steps", save_steps=2, learning_rate=1e-2,
                                 lr_scheduler_type="constant", disable_tqdm=True, seed=0, data_seed=0)
        DeltaTuneTrainer(model=tuned, args=args, train_dataset=rows).train(
            resume_from_checkpoint=str(out / "checkpoint-2") if resume else None)
        return tuned

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    resumed = run(tmp_path / "resumed", 4, resume=True)
    a, b = straight.forms()[ENCODER_NAME].state_dict(), resumed.forms()[ENCODER_NAME].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(output_of(resumed, batch()), output_of(straight, batch()))


@pytest.mark.parametrize(("method", "options"), [("prefix", {"length": 3, "mid_dim": 8}), ("prompt", {"length": 3})],
                         ids=["prefix", "prompt"])
def test_a_write_that_moves_no_version_counter_is_seen_by_the_next_forward(method: str, options: dict,
                                                                          tmp_path) -> None:
    """Fused optimizer kernels write parameters without moving their version counters (as ``.data`` does):
    whatever is reused between no-grad forwards (the prompt's keys/values) must notice the change all the same."""
    tuned = dt.attach(tiny_llama(), method, **options)
    x = batch()
    before = output_of(tuned, x)
    for p in tuned.trainable_parameters():
        version = p._version
        p.data.mul_(1.5)
        assert p._version == version
    after = output_of(tuned, x)
    assert not torch.equal(after, before)
    tuned.save(tmp_path / "a")
    assert torch.equal(output_of(dt.load(tiny_llama(), tmp_path / "a"), x), after)


def test_real_word_init_is_a_cache_prefilled_with_sampled_tokens() -> None:
    """init="vocab": P_k, P_v are the keys/values of l sampled tokens (Li & Liang's real-word init), so the model
    equals the base model with those tokens prefilled into its KV cache and the input at positions 0.. ."""
    model = tiny_llama()
    torch.manual_seed(5)
    tuned = dt.attach(model, "ptuning_v2", length=4, init="vocab")
    torch.manual_seed(5)
    ids = torch.randint(0, VOCAB, (1, 4))
    x = batch(n=1)["input_ids"]
    with torch.no_grad():
        ours = tuned(input_ids=x).logits
        tuned.detach()
        cache = model(input_ids=ids, use_cache=True).past_key_values
        ref = model(input_ids=x, past_key_values=cache, position_ids=torch.arange(x.shape[1])[None]).logits
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, output_of(model, {"input_ids": x}), atol=1e-3)
