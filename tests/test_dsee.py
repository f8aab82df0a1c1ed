"""DSEE: the decomposition that picks Ω, the (α/r)(BA + S) update, pruning masks and head pruning."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import batch, loss_of, output_of, tiny_bert, tiny_llama

import deltatune as dt
from deltatune.methods import dsee
from deltatune.methods._attention_heads import attention_blocks
from deltatune.methods._masked_sparse import MaskedSparse
from deltatune.methods.dsee import DseeConfig, parts_of

FAST = {"r": 4, "alpha": 8, "num_sparse": 8, "outer_iters": 3}  # a short decomposition: tests stay fast


def _train(tuned, steps: int = 3, lr: float = 1e-2, seed: int = 1) -> None:
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=lr)
    for i in range(steps):
        opt.zero_grad()
        loss_of(tuned, batch(seed + i)).backward()
        opt.step()


def _base(model) -> dict[str, torch.Tensor]:
    """The base tensors by their plain names (a parametrised head shows W0 as ``...original``)."""
    return {re.sub(r"\.parametrizations\.(\w+)\.original$", r".\1", n): p for n, p in model.named_parameters()}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add waits


def _spiky(seed: int, m: int = 48, n: int = 40) -> tuple[torch.Tensor, set[int]]:
    """W = L (rank 3) + 20 spikes of magnitude 1 at random positions."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, 3, generator=g) @ torch.randn(3, n, generator=g) * 0.1
    pos = torch.randperm(m * n, generator=g)[:20]
    sign = torch.randint(0, 2, (20,), generator=g).float() * 2 - 1
    w.view(-1)[pos] += sign
    return w, set(pos.tolist())


# -- 1. the decomposition ---------------------------------------------------------------------------------
def test_decomposition_recovers_spikes_of_a_low_rank_matrix() -> None:
    # GreBsmo's regime: the threshold lies between L's misfit and the spikes, the rank reaches L's (1 -> 3)
    for seed in range(5):
        w, spikes = _spiky(seed)
        dec = dsee.decompose(w, outer_iters=2, rank_step=2, threshold=0.3, generator=torch.Generator().manual_seed(0))
        omega = set(dsee.top_entries(dec.S.abs(), 20).tolist())
        assert dec.V.shape[0] == 3
        assert len(omega & spikes) >= 18, f"seed {seed}: {len(omega & spikes)} of 20 spikes found"


def test_leading_rows_equal_the_full_qr() -> None:
    e = torch.randn(30, 20, dtype=torch.float64)
    assert torch.allclose(dsee._leading_r_rows(e, 5), torch.linalg.qr(e).R[:5], atol=1e-12)


def test_default_decomposition_on_a_small_matrix_keeps_a_sparse_part() -> None:
    # the paper's 100 rounds of +5 rank would reach full rank on a 24-wide matrix (S = 0, Ω arbitrary;
    # the official QR shapes break there): the rank stops at max_rank_fraction·min(d)
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0)) * 0.05
    cfg = DseeConfig()
    dec = dsee.decompose(w, max_rank=int(cfg.max_rank_fraction * 24), generator=torch.Generator().manual_seed(0))
    assert dec.V.shape[0] == 15 and dec.U.shape == (24, 15)
    assert int((dec.S != 0).sum()) > cfg.num_sparse
    omega = dsee.sparse_support(w, 16, cfg, torch.Generator().manual_seed(0))  # the same seeded run
    assert omega.numel() == 16 and torch.unique(omega).numel() == 16
    assert set(omega.tolist()) == set(dsee.top_entries(dec.S.abs(), 16).tolist())


# -- 2-5. the update ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
def test_starts_exactly_at_the_base_model(make) -> None:
    model, x = make(), batch()
    before = output_of(model, x)
    tuned = dt.attach(model, "dsee", **FAST)
    assert torch.equal(output_of(tuned, x), before)


def test_training_reaches_only_a_b_s_on_its_support_and_the_head() -> None:
    model = tiny_bert()
    w0 = {n: p.detach().clone() for n, p in _base(model).items()}
    tuned = dt.attach(model, "dsee", **FAST)
    expected = {id(p) for f in tuned.forms().values() for p in f.parameters() if p.requires_grad}
    _train(tuned)
    with_grad = {id(p) for p in tuned.parameters() if p.grad is not None}
    assert with_grad == expected
    parts = parts_of(tuned)
    adapted = [p for p in parts.values() if p.sparse is not None]
    assert len(adapted) == 6
    wanted = {"A", "B", "values"}
    for p in adapted:
        assert {n for n, q in p.lowrank.named_parameters() if q.grad is not None} | \
            {n for n, q in p.sparse.named_parameters() if q.grad is not None} == wanted
        s = p.sparse.support_delta().view(-1)
        outside = torch.ones_like(s, dtype=torch.bool)
        outside[p.sparse.indices.long()] = False
        assert torch.equal(s[outside], torch.zeros_like(s[outside])) and bool((s[~outside] != 0).all())
    assert {n.rsplit(".", 1)[0] for n, f in tuned.forms().items() if f.num_trainable() and "classifier" in n} == \
        {"classifier"}
    assert all(torch.equal(p, w0[n]) for n, p in _base(model).items()), "the base is never written"
    # the forward is W0 x + (α/r)(B A x + S x)
    q = adapted[0]
    x = torch.randn(5, 32)
    w = q.module.weight + dsee.update_of(q)
    assert torch.allclose(q.module(x), F.linear(x, w, q.module.bias), atol=1e-6)


def test_trainable_count_is_layers_times_two_times_2dr_plus_n_plus_head() -> None:
    tuned = dt.attach(tiny_bert(), "dsee", **FAST)
    layers, d, r, n = 3, 32, FAST["r"], FAST["num_sparse"]
    head = 32 * 3 + 3  # classifier Linear(32 -> 3 labels), trained densely
    assert tuned.num_trainable() == layers * 2 * (2 * d * r + n) + head
    llama = dt.attach(tiny_llama(), "dsee", **FAST)  # a causal LM has no head to train
    assert not any("lm_head" in n or "score" in n for n in llama.forms())


def test_merged_equals_unmerged_and_unmerge_restores_the_base() -> None:
    model = tiny_bert()
    w0 = {n: p.detach().clone() for n, p in _base(model).items()}
    tuned = dt.attach(model, "dsee", **FAST, prune_ratio=0.3, prune_ratio_qv=0.3)
    _train(tuned)
    dsee.prune(tuned)
    _train(tuned, 2, seed=7)
    x = batch()
    trained = output_of(tuned, x)
    parts = parts_of(tuned)
    expected = {name: dsee.masked_base(p) + dsee.update_of(p) for name, p in parts.items()}  # W' = M⊙W + ΔW
    plain = tuned.merge()
    assert torch.allclose(output_of(plain, x), trained, atol=1e-5, rtol=0)
    for name, p in parts.items():
        assert torch.allclose(p.module.weight, expected[name], atol=1e-6, rtol=0), name
    tuned.unmerge()
    assert torch.allclose(output_of(tuned, x), trained, atol=1e-5, rtol=0)
    for n, p in _base(model).items():
        assert torch.allclose(p, w0[n], atol=1e-6, rtol=0), n


# -- 6. unstructured pruning ------------------------------------------------------------------------------
def test_unstructured_pruning_hits_the_ratio_and_stays_through_training_and_save(tmp_path) -> None:
    tuned = dt.attach(tiny_bert(), "dsee", **FAST, prune_ratio=0.3, prune_ratio_qv=0.25)
    _train(tuned)
    dsee.prune_unstructured(tuned, 0.3, 0.25, "abs")
    parts = parts_of(tuned)
    others = [p for p in parts.values() if p.pruned is not None]
    adapted = [p for p in parts.values() if p.sparse is not None]

    def zero_fraction(group) -> float:
        zeros = sum(int((dsee.masked_base(p) == 0).sum()) for p in group)
        return zeros / sum(p.module.weight.numel() for p in group)

    total_other = sum(p.module.weight.numel() for p in others)
    assert zero_fraction(others) == round(0.3 * total_other) / total_other
    assert abs(zero_fraction(adapted) - 0.25) < 1e-3
    # ABS: the adapted matrices lose the entries where |ΔW| is smallest, globally over all of them
    kept_min = min(float(dsee.update_of(p).abs().view(-1)[_kept(p.sparse)].min()) for p in adapted)
    pruned_max = max(float(dsee.update_of(p).abs().view(-1)[p.sparse.pruned.long()].max()) for p in adapted)
    assert pruned_max <= kept_min

    _train(tuned, 3, seed=11)
    for p in others:  # the effective weight of a pruned matrix is exactly zero there, after more training
        eff = p.pruned.effective_weight(torch.float32)
        assert bool((eff.view(-1)[p.pruned.pruned.long()] == 0).all())
        x = torch.randn(4, p.module.in_features)
        assert torch.allclose(p.module(x), F.linear(x, eff, p.module.bias), atol=1e-6)
    for p in adapted:  # the adapted ones: M⊙W is zero there, the update still adds on top (step 8)
        eff = p.sparse.effective_weight(torch.float32) - p.sparse.support_delta()
        assert bool((eff.view(-1)[p.sparse.pruned.long()] == 0).all())
    for p in others + adapted:  # the dense form of the delta (parametrisation path) says the same
        assert torch.allclose(p.module.weight + p.masked.delta_weight(), p.masked.effective_weight(torch.float32))

    tuned.save(tmp_path / "a")
    loaded = dt.load(tiny_bert(), tmp_path / "a")
    assert torch.equal(output_of(loaded, batch()), output_of(tuned, batch()))
    for name, p in parts_of(loaded).items():
        assert torch.equal(p.masked.pruned, parts[name].masked.pruned), name
    assert loaded.num_trainable() == tuned.num_trainable()


def _kept(form: MaskedSparse) -> torch.Tensor:
    keep = torch.ones(form.numel_base, dtype=torch.bool)
    keep[form.pruned.long()] = False
    return keep


def test_abs_and_wabs_masks_differ_when_w_dominates_the_update() -> None:
    tuned = dt.attach(tiny_bert(), "dsee", **FAST, prune_ratio=0.0)
    _train(tuned, 2, lr=1e-3)  # a small update: |W| >> |ΔW|
    adapted = [p for p in parts_of(tuned).values() if p.sparse is not None]
    assert max(float(dsee.update_of(p).abs().max()) for p in adapted) < 0.2 * min(
        float(p.module.weight.abs().max()) for p in adapted)
    masks = {}
    for mode in ("abs", "wabs"):
        dsee.prune_unstructured(tuned, 0.0, 0.3, mode)
        masks[mode] = [set(p.sparse.pruned.tolist()) for p in adapted]
        for p in adapted:
            p.sparse.set_pruned(p.sparse.pruned[:0])  # back to unpruned before the other score
    by_w = dsee.global_smallest([p.module.weight.abs() for p in adapted], 0.3)
    by_w_sets = [set(i.tolist()) for i in by_w]

    def overlap(a, b) -> float:
        return sum(len(x & y) for x, y in zip(a, b, strict=True)) / sum(len(x) for x in a)

    assert masks["abs"] != masks["wabs"]
    assert overlap(masks["wabs"], by_w_sets) > 0.8  # W dominates: WABS is nearly magnitude pruning of W
    assert overlap(masks["abs"], by_w_sets) < 0.6  # ABS follows the update alone (chance is 0.3)


# -- 7. head pruning ------------------------------------------------------------------------------------------
def _reference_head_scores(tuned) -> dict[int, torch.Tensor]:
    """Σ |ΔW_q| + |ΔW_v| over each head's rows, from the raw tensors: (α/r)(B A + scatter(S))."""
    out = {}
    for name, form in tuned.forms().items():
        if not name.endswith(".weight.lowrank"):
            continue
        sparse = tuned.forms()[name.replace(".lowrank", ".sparse")]
        delta = form.scale * (form.B @ form.A)
        delta.view(-1).index_add_(0, sparse.indices.long(), sparse.scale * sparse.values)
        layer = int(name.split(".")[3])
        out[layer] = out.get(layer, 0) + delta.detach().abs().view(4, 8, 32).sum((1, 2))
    return out


def test_head_pruning_removes_the_lowest_heads_and_matches_masking_them(tmp_path) -> None:
    model = tiny_bert()
    tuned = dt.attach(model, "dsee", **FAST, prune_ratio=0.0, prune_ratio_qv=0.0, prune_heads=2)
    _train(tuned)
    scores = _reference_head_scores(tuned)
    assert all(torch.allclose(dsee.head_scores(tuned)[k], scores[k], rtol=1e-5) for k in scores)
    lowest = {k: sorted(torch.argsort(v)[:2].tolist()) for k, v in scores.items()}  # h = 2 of 4 heads
    # reference: the same model with those heads' contributions cut before the output projection
    x = batch()
    hooks = []
    for att in attention_blocks(model):
        def cut(module, args, heads=lowest[att.layer]):
            y = args[0].clone()
            for h in heads:
                y[..., h * 8:(h + 1) * 8] = 0
            return (y,)
        hooks.append(att.out.dense.register_forward_pre_hook(cut))
    expected = output_of(tuned, x)
    for hk in hooks:
        hk.remove()

    n_trainable = tuned.num_trainable()
    removed = dsee.prune_heads(tuned, 2)
    assert removed == lowest and tuned.method_config.pruned_heads == {str(k): v for k, v in lowest.items()}
    for att in attention_blocks(model):
        assert att.core.num_attention_heads == 2  # q/k/v lose h·d_head = 16 outputs, the output projection its inputs
        assert all(getattr(att.core, a).weight.shape == (16, 32) for a in ("query", "key", "value"))
        assert att.out.dense.weight.shape == (32, 16)
    assert torch.allclose(output_of(tuned, x), expected, atol=1e-5)
    assert tuned.num_trainable() < n_trainable  # B lost the removed heads' rows, Ω its entries there
    assert not any(p.requires_grad for p in model.parameters() if all(p is not q for q in tuned.deltas.parameters()))

    _train(tuned, 2, seed=5)  # stage 2 trains on the smaller model
    tuned.save(tmp_path / "h")
    loaded = dt.load(tiny_bert(), tmp_path / "h")  # the artifact rebuilds the pruned model
    assert torch.equal(output_of(loaded, x), output_of(tuned, x))
    plain = tuned.merge()
    assert torch.allclose(output_of(plain, x), output_of(loaded, x), atol=1e-5)


def test_head_pruning_needs_bert_style_attention() -> None:
    with pytest.raises(dt.DeltatuneError, match="BERT-style attention"):  # at attach, not after stage 1
        dt.attach(tiny_llama(), "dsee", **FAST, prune_heads=1)
    tuned = dt.attach(tiny_llama(), "dsee", **FAST)
    with pytest.raises(dt.DeltatuneError, match="BERT-style attention"):
        dsee.prune_heads(tuned, 1)
    with pytest.raises(dt.DeltatuneError, match="no head"):
        dt.attach(tiny_bert(), "dsee", **FAST, prune_heads=4)


# -- the policy: stage 1, prune, stage 2 -----------------------------------------------------------------------
def test_policy_prunes_once_at_the_stage_boundary_and_restarts_the_schedule() -> None:
    tuned = dt.attach(tiny_bert(), "dsee", **FAST, prune_heads=1, prune_at=0.5)
    policy = tuned.policy
    policy.plan(total_steps=4, grad_accum=1)
    assert policy.lr_restarts(4) == [2] and policy.lr_restarts(1) == [1]  # a 1-step run prunes at its end
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
    for step in range(4):
        opt.zero_grad()
        loss_of(tuned, batch(step)).backward()
        opt.step()
        policy.after_optimizer_step(step, tuned, opt)
        pruned = any(p.masked is not None and p.masked.num_pruned for p in parts_of(tuned).values())
        assert pruned == (step >= 1)
        if step == 1:
            assert not opt.state, "stage 2 starts with fresh optimizer moments"
            opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)  # the loop re-syncs; here by hand
    assert policy.done and policy.state_dict()["pruned_heads"] == tuned.method_config.pruned_heads


def test_resume_rebuilds_the_pruned_structure_before_the_tensors_load() -> None:
    tuned = dt.attach(tiny_bert(), "dsee", **FAST, prune_heads=2, prune_ratio=0.2)
    tuned.policy.plan(total_steps=4, grad_accum=1)
    for step in range(3):  # prunes after step 1 (2 of 4 steps done)
        opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
        loss_of(tuned, batch(step)).backward()
        opt.step()
        tuned.policy.after_optimizer_step(step, tuned, opt)
    state, policy_state = tuned.deltas.state_dict(), tuned.policy.state_dict()

    fresh = dt.attach(tiny_bert(), "dsee", **FAST, prune_heads=2, prune_ratio=0.2)
    fresh.policy.load_state_dict(policy_state)  # as the loop does: policy first, then the delta's tensors
    fresh.deltas.load_state_dict(state)
    assert fresh.policy.done and fresh.method_config.pruned_heads == tuned.method_config.pruned_heads
    assert torch.equal(output_of(fresh, batch()), output_of(tuned, batch()))


# -- loading and config -----------------------------------------------------------------------------------------
def test_loading_skips_the_decomposition(tmp_path, monkeypatch) -> None:
    tuned = dt.attach(tiny_llama(), "dsee", **FAST)
    _train(tuned)
    tuned.save(tmp_path / "a")

    def forbidden(*args, **kwargs):
        raise AssertionError("a load must take Ω from the artifact")

    monkeypatch.setattr(dsee, "decompose", forbidden)
    loaded = dt.load(tiny_llama(), tmp_path / "a")
    assert torch.equal(output_of(loaded, batch()), output_of(tuned, batch()))


def test_bad_config_is_a_clear_error() -> None:
    with pytest.raises(dt.DeltatuneError, match="prune_at"):
        dt.attach(tiny_bert(), "dsee", prune_at=0.0)
    with pytest.raises(dt.DeltatuneError, match="num_sparse"):
        dt.attach(tiny_bert(), "dsee", **{**FAST, "num_sparse": 5000})
    with pytest.raises(dt.DeltatuneError, match="modules_to_save"):
        dt.attach(tiny_bert(), "dsee", **FAST, modules_to_save=["query"])


# -- the training loop: stage 2 inside one run, resumed from a checkpoint taken after pruning ------------------
@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """A tiny BERT classifier with a word-level tokenizer of the data's words, and the labelled data."""
    from conftest import write_sentiment_jsonl
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("dsee-bert")
    write_sentiment_jsonl(folder / "data.jsonl")
    words = sorted({w for line in (folder / "data.jsonl").read_text().splitlines()
                    for w in json.loads(line)["text"].split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(folder / "model")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2, pad_token_id=0)
    BertForSequenceClassification(cfg).save_pretrained(folder / "model")
    return folder


def test_the_loop_prunes_mid_run_and_resumes_bit_identically(bert_folder, tmp_path) -> None:
    import shutil

    def run_config(out) -> dict:
        return {"model": str(bert_folder / "model"),
                "data": {"path": str(bert_folder / "data.jsonl"), "task": "classification", "max_length": 32,
                         "eval_fraction": 0.25, "labels": ["negative", "positive"]},
                "method": {"name": "dsee", **FAST, "prune_heads": 1, "prune_ratio": 0.2, "prune_ratio_qv": 0.2,
                           "prune_at": 0.25},
                "train": {"steps": 4, "batch_size": 4, "lr": 1e-2, "save_every": 2, "eval_every": 0,
                          "progress": False},
                "output": str(out)}

    summary = dt.train(run_config(tmp_path / "a"))
    heads = dt.inspect(tmp_path / "a")["config"]["pruned_heads"]  # the artifact says which heads are gone
    assert sorted(heads) == ["0", "1"] and all(len(v) == 1 for v in heads.values())
    # resume from the checkpoint after step 2 (stage 2 already running on the pruned model)
    first = (tmp_path / "a" / "delta.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "a" / "checkpoints" / "step-0000004")
    resumed = dt.train(run_config(tmp_path / "a"), resume=True)
    assert resumed["resumed_from"] == 2
    assert (tmp_path / "a" / "delta.safetensors").read_bytes() == first
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in summary["history"]]
    from transformers import AutoModelForSequenceClassification

    loaded = dt.load(AutoModelForSequenceClassification.from_pretrained(bert_folder / "model"), tmp_path / "a")
    assert loaded.model.bert.encoder.layer[0].attention.self.query.weight.shape == (24, 32)
