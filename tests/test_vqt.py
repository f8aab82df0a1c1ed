"""VQT: query tokens that read a frozen classifier; the cached two-pass forward against a naive reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_bert, tiny_llama, tiny_llama_cls

import deltatune as dt
from deltatune.core.forms.attention import clear_kv_hook, set_kv_hook
from deltatune.core.forms.module import blocks
from deltatune.methods.vqt import QueryTokens, Reading, _attention_per_block, vpt_range

N = 11  # sequence length: a size no other axis of the tiny models has (batch 2, T ≤ 2, D 32, heads 4/2, hd 8)


MAKE = {"bert": tiny_bert, "llama": tiny_llama_cls}


def padded_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """Two right-padded sequences (the second with 3 pads), no pad id inside the real tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, N), generator=g)
    mask = torch.ones(2, N, dtype=torch.long)
    ids[1, 8:], mask[1, 8:] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def form_of(tuned) -> QueryTokens:
    return tuned.forms()["vqt"]


def block_outputs(model, run) -> tuple[list[torch.Tensor], object]:
    """Every block's output on the real tokens (calls with N rows) while ``run()`` runs, and its result."""
    seen: list[torch.Tensor] = []

    def hook(module, args, output) -> None:
        h = output[0] if isinstance(output, tuple) else output
        if h.shape[1] == N:
            seen.append(h.detach().clone())

    handles = [b.register_forward_hook(hook) for _, b in blocks(model)]
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    return seen, result


def final_hidden(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.base_model(**inputs).last_hidden_state


def pooled(arch: str, final: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if arch == "bert":
        return final[:, 0]
    last = mask.sum(-1) - 1  # right padding
    return final[torch.arange(final.shape[0]), last]


# ---------------------------------------------------------------- a naive reference: queries inside the model


def naive_reading(model, form: QueryTokens, inputs: dict[str, torch.Tensor]) -> Reading:
    """VQT as the paper draws it: [Q_l; Z_{l-1}] through block l with full autograd, keys/values restricted
    to the real rows, queries stripped after the block. No caching, no no_grad. ``form`` must be detached."""
    t = form.tokens
    bl = [b for _, b in blocks(model)]
    attns = _attention_per_block(model, bl)
    visible = inputs["attention_mask"].bool()
    causal = attns[0].is_causal
    outs: list[torch.Tensor] = []

    def pre(i, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        joint = torch.cat([form.queries[i].to(x.dtype).expand(x.shape[0], -1, -1), x], 1)
        pe = kwargs.get("position_embeddings")
        if pe is not None:
            cos, sin = pe
            shape = (cos.shape[0], t, cos.shape[-1])
            kwargs["position_embeddings"] = (torch.cat([cos.new_ones(shape), cos], 1),
                                             torch.cat([sin.new_zeros(shape), sin], 1))
        if args:
            return (joint, *args[1:]), kwargs
        kwargs["hidden_states"] = joint
        return args, kwargs

    def post(i, module, args, kwargs, output):
        h = output[0] if isinstance(output, tuple) else output
        outs.append(h[:, :t])
        return (h[:, t:], *output[1:]) if isinstance(output, tuple) else h[:, t:]

    def kv(module, query, key, value, mask):
        key, value = key[:, :, t:], value[:, :, t:]
        b, n = key.shape[0], key.shape[2]
        sees = visible[:, None, None, :]
        rows = sees.expand(b, 1, n, n) & (torch.ones(n, n, dtype=torch.bool).tril() if causal else True)
        full = torch.cat([sees.expand(b, 1, t, n), rows], 2)
        if model.config._attn_implementation.endswith("eager"):
            full = torch.zeros(full.shape, dtype=query.dtype).masked_fill(~full, torch.finfo(query.dtype).min)
        return key, value, full

    handles = []
    for i, (block, attn) in enumerate(zip(bl, attns, strict=True)):
        handles.append(block.register_forward_pre_hook(lambda m, a, k, i=i: pre(i, m, a, k), with_kwargs=True))
        handles.append(block.register_forward_hook(lambda m, a, k, o, i=i: post(i, m, a, k, o), with_kwargs=True))
        set_kv_hook(model, attn, kv)
    try:
        final = model.base_model(**inputs).last_hidden_state
    finally:
        for h in handles:
            h.remove()
        for attn in attns:
            clear_kv_hook(model, attn)
    mask = inputs["attention_mask"]
    cls = final[:, 0] if not causal else final[torch.arange(final.shape[0]), mask.sum(-1) - 1]
    return Reading(None, cls, outs)


def head_loss(form: QueryTokens, reading: Reading, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(form.head(form.features(reading)), labels)


# ---------------------------------------------------------------- spec tests


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_backbone_is_bit_identical_to_the_frozen_model(arch: str, impl: str) -> None:
    """Spec 1 (the base tokens' hidden states stay bit-identical): with any Q, every block's output
    on the real tokens and the pooled final representation equal the frozen model's exactly; detaching
    gives the model's own logits back exactly."""
    model = MAKE[arch]()
    model.config._attn_implementation = impl
    x = padded_batch()
    ref_blocks, ref_logits = block_outputs(model, lambda: model(**x).logits.detach())
    ref_cls = pooled(arch, final_hidden(model, x), x["attention_mask"])

    tuned = dt.attach(model, "vqt", tokens=2)
    with torch.no_grad():
        form_of(tuned).queries.normal_(0, 3.0)  # any Q
    tuned.train()  # dropout on Q active; the backbone still runs as the frozen eval model
    got_blocks, reading = block_outputs(model, lambda: form_of(tuned).read(**x))
    assert len(got_blocks) == len(ref_blocks) == 3
    for got, ref in zip(got_blocks, ref_blocks, strict=True):
        assert torch.equal(got, ref)
    assert torch.equal(reading.cls, ref_cls)
    assert torch.equal(reading.output.logits, ref_logits), "the frozen classifier's own output is untouched"
    assert not torch.allclose(tuned(**x).logits, ref_logits, atol=1e-3), "attached, the head's logits replace them"

    tuned.detach()
    assert model.config._attn_implementation == impl
    with torch.no_grad():
        assert torch.equal(model(**x).logits, ref_logits), "detached, the model is the base model again"


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_a_query_changes_only_its_own_output(arch: str) -> None:
    """Spec 2: perturbing Q_l[j] changes O_l[j] and nothing else (other queries, other layers, CLS)."""
    tuned = dt.attach(MAKE[arch](), "vqt", tokens=2)
    tuned.eval()
    form, x = form_of(tuned), padded_batch()
    with torch.no_grad():
        before = form.read(**x)
        form.queries[1, 0] += 0.5
        after = form.read(**x)
    assert torch.equal(after.cls, before.cls)
    for layer in range(3):
        for j in range(2):
            same = torch.equal(after.queries[layer][:, j], before.queries[layer][:, j])
            assert same == ((layer, j) != (1, 0)), (layer, j)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_gradients_equal_full_autograd_with_queries_inside_the_model(arch: str, impl: str) -> None:
    """Spec 3: the cached no-grad pipeline's gradients w.r.t. Q and the head equal those of the naive
    implementation (queries appended inside every block, full autograd), and so do the features."""
    model = MAKE[arch]()
    model.config._attn_implementation = impl
    tuned = dt.attach(model, "vqt", tokens=2)
    tuned.eval()  # no dropout: both paths see the same Q
    form, x, y = form_of(tuned), padded_batch(), torch.tensor([0, 2])
    with torch.no_grad():
        form.queries.normal_(0, 1.0)

    ours = form.read(**x)
    head_loss(form, ours, y).backward()
    grads = {n: p.grad.clone() for n, p in form.named_parameters()}
    form.zero_grad()

    form.detach()
    naive = naive_reading(model, form, x)
    head_loss(form, naive, y).backward()
    for o, r in zip(ours.queries, naive.queries, strict=True):
        torch.testing.assert_close(o, r, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.cls, naive.cls, atol=1e-6, rtol=1e-5)
    for n, p in form.named_parameters():
        assert grads[n].abs().sum() > 0, n
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_feature_dimension_and_unit_norm_chunks(arch: str) -> None:
    """Spec 4: dim f = D(1 + L·T) and each of the 1 + L chunks has unit norm; the parameter count is
    L·T·D + D(1 + L·T)·C + C."""
    t, d, n_layers, c = 2, 32, 3, 3
    tuned = dt.attach(MAKE[arch](), "vqt", tokens=t)
    form = form_of(tuned)
    with torch.no_grad():
        f = form.features(form.read(**padded_batch()))
    assert f.shape == (2, d * (1 + n_layers * t))
    chunks = [f[:, :d]] + list(f[:, d:].split(t * d, dim=1))
    assert len(chunks) == 1 + n_layers
    for chunk in chunks:
        torch.testing.assert_close(chunk.norm(dim=-1), torch.ones(2), atol=1e-6, rtol=1e-5)
    assert tuned.num_trainable() == n_layers * t * d + d * (1 + n_layers * t) * c + c
    assert not form.training, "attached to a model in eval mode, the form starts in eval mode (no Q dropout)"
    assert form.queries.abs().max() <= vpt_range(d) and form.queries.std() > vpt_range(d) / 4
    assert form.dropout.p == 0.1


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_no_query_tokens_is_linear_probing_on_the_normalised_final_token(arch: str) -> None:
    """Spec 5: T = 0 gives logits = head(norm(CLS_L)), CLS_L as the model's own classifier pools it (token 0
    for BERT, the last real token of a right-padded row for Llama)."""
    model = MAKE[arch]()
    x = padded_batch()
    cls = pooled(arch, final_hidden(model, x), x["attention_mask"])
    tuned = dt.attach(model, "vqt", tokens=0)
    head = form_of(tuned).head
    assert head.in_features == 32 and tuned.num_trainable() == 32 * 3 + 3
    with torch.no_grad():
        assert torch.equal(tuned(**x).logits, head(F.normalize(cls, dim=-1)))


# ---------------------------------------------------------------- end to end


def saved_by_forward(run) -> tuple[list[torch.Tensor], object]:
    """The tensors autograd saves for backward while ``run()`` builds the graph."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = run()
    return saved, result


def graph_leaves(loss: torch.Tensor) -> set[int]:
    seen, stack, leaves = set(), [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.add(id(fn.variable))
        stack.extend(f for f, _ in fn.next_functions)
    return leaves


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_backward_stays_inside_each_layer_and_never_reaches_the_backbone(arch: str) -> None:
    """No backbone parameter gets a gradient; the graph's leaves are Q and the head; the block inputs of
    the real tokens carry no autograd history; and no saved-for-backward tensor that needs a gradient has
    the real tokens' rows (N), so the graph holds the query path only. The naive reference fails the last
    two checks (it backpropagates through every layer's token rows), so they can fail."""
    model = MAKE[arch]()
    tuned = dt.attach(model, "vqt", tokens=1)
    tuned.train()
    form, x, y = form_of(tuned), padded_batch(), torch.tensor([1, 0])

    inputs: list[torch.Tensor] = []
    probes = [b.register_forward_pre_hook(lambda m, a, k: inputs.append(a[0] if a else k["hidden_states"]),
                                          with_kwargs=True) for _, b in blocks(model)]
    saved, out = saved_by_forward(lambda: tuned(**x, labels=y))
    for p in probes:
        p.remove()
    token_inputs = [h for h in inputs if h.shape[1] == N]
    assert len(token_inputs) == 3 and not any(h.requires_grad or h.grad_fn is not None for h in token_inputs)
    assert [h.shape[1] for h in inputs if h.shape[1] != N] == [1, 1, 1], "one query call per block"
    assert not [tuple(t.shape) for t in saved if t.requires_grad and t.dim() >= 2 and t.shape[-2] in (N, N + 1)]
    assert graph_leaves(out.loss) == {id(p) for p in form.parameters()}
    out.loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in form.parameters())

    form.detach()  # the reference does keep token rows for backward
    saved, naive = saved_by_forward(lambda: naive_reading(model, form, x))
    assert [t for t in saved if t.requires_grad and t.dim() >= 2 and t.shape[-2] in (N, N + 1)]


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_save_load_reproduces_logits_and_merge_refuses(arch: str, tmp_path) -> None:
    tuned = dt.attach(MAKE[arch](), "vqt", tokens=2, dropout=0.0)
    form, x = form_of(tuned), padded_batch()
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        tuned(**x, labels=torch.tensor([0, 2])).loss.backward()
        opt.step()
    tuned.eval()
    with torch.no_grad():
        trained = tuned(**x).logits
    tuned.save(tmp_path / "a")
    loaded = dt.load(MAKE[arch](seed=0), tmp_path / "a")
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, trained)
    assert loaded.num_trainable() == tuned.num_trainable()
    assert sorted(form.stored_tensors()) == ["head.bias", "head.weight", "queries"]
    with pytest.raises(dt.DeltatuneError, match="cannot be merged .*query tokens"):
        tuned.merge()


def test_zero_query_tokens_save_and_load(tmp_path) -> None:
    tuned = dt.attach(tiny_bert(), "vqt", tokens=0)
    tuned.save(tmp_path / "a")
    loaded = dt.load(tiny_bert(), tmp_path / "a")
    x = padded_batch()
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, tuned(**x).logits)


def test_labels_give_the_heads_loss_and_bad_models_are_refused() -> None:
    tuned = dt.attach(tiny_llama_cls(), "vqt")
    tuned.eval()
    x, y = padded_batch(), torch.tensor([2, 1])
    with torch.no_grad():
        out = tuned(**x, labels=y)
        torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, y))
    with pytest.raises(dt.DeltatuneError, match="task='classification'"):
        dt.attach(tiny_llama(), "vqt")
    with pytest.raises(dt.DeltatuneError, match="tokens"):
        dt.attach(tiny_bert(), "vqt", tokens=-1)


def test_trains_from_a_config_with_a_classification_head(word_run, tmp_path) -> None:
    """dt.train on a decoder loaded as LlamaForSequenceClassification (data.head: true); the artifact loads
    onto the same base and gives the trained model's eval accuracy."""
    folder, path = word_run
    cfg = {
        "model": folder,
        "data": {"path": path, "task": "classification", "head": True, "max_length": 16, "eval_fraction": 0.25,
                 "labels": ["negative", "positive"]},
        "method": {"name": "vqt"},
        "train": {"steps": 20, "batch_size": 8, "lr": 1e-2, "eval_every": 0, "save_every": 0, "progress": False},
        "output": str(tmp_path / "run"),
    }
    summary = dt.train(cfg)
    losses = [h["loss"] for h in summary["history"]]
    assert sum(losses[-5:]) < sum(losses[:5])
    base = dt.models.load(folder, task="classification", num_labels=2)
    loaded = dt.load(base, tmp_path / "run")
    assert type(loaded.model).__name__ == "LlamaForSequenceClassification"


def test_reads_a_label_that_only_an_intermediate_layer_holds() -> None:
    """Spec 6 (toy): the label is whether a marker token occurs; the last block's output LayerNorm has
    weight 0, so the final representation is the same for every input and linear probing on it (T = 0)
    stays at chance, while VQT reads the marker from the earlier layers' query outputs."""

    def blind_bert():
        model = tiny_bert()
        with torch.no_grad():
            model.bert.encoder.layer[2].output.LayerNorm.weight.zero_()
        return model

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(8, VOCAB, (192, 8), generator=g)
    labels = torch.arange(192) % 2
    ids[(torch.rand(192, 8, generator=g) < 0.4) & (labels[:, None] == 1)] = 7  # the marker
    train, test = slice(0, 128), slice(128, 192)

    def accuracy(tokens: int) -> float:
        torch.manual_seed(0)
        tuned = dt.attach(blind_bert(), "vqt", tokens=tokens, dropout=0.0)
        opt = torch.optim.Adam(tuned.trainable_parameters(), lr=2e-2)
        for _ in range(30):
            opt.zero_grad()
            tuned(input_ids=ids[train], labels=labels[train]).loss.backward()
            opt.step()
        with torch.no_grad():
            return float((tuned(input_ids=ids[test]).logits.argmax(-1) == labels[test]).float().mean())

    probe, vqt = accuracy(0), accuracy(1)
    assert probe == 0.5 and vqt >= 0.85, (probe, vqt)
