"""VQT on ViT and AST classifiers (the paper's setting: a frozen vision transformer read by query tokens), the
invariants tests/test_vqt.py checks on text against a naive reference here on pixels and spectrograms, training on
the shipped digits, and image / audio classifiers reloaded from an artifact alone (the head record)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

import deltatune as dt
from deltatune.core import artifact
from deltatune.core.forms.attention import clear_kv_hook, set_kv_hook
from deltatune.core.forms.module import blocks
from deltatune.data import models
from deltatune.methods.vqt import QueryTokens, Reading, _attention_per_block, vpt_range

pytestmark = pytest.mark.usefixtures("one_thread")

N = 10  # tokens: CLS + 9 patches (ViT, 12×12 / 4), CLS + distillation + 2×4 patches (AST): no other axis has 10
D, LAYERS, LABELS = 32, 3, 3
VISION = dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64,
              num_labels=LABELS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def tiny_vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return tf.ViTForImageClassification(tf.ViTConfig(**VISION, image_size=12, patch_size=4, num_channels=1)).eval()


def tiny_ast(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return tf.ASTForAudioClassification(tf.ASTConfig(**VISION, num_mel_bins=16, max_length=32, patch_size=8,
                                                     frequency_stride=8, time_stride=8)).eval()


MAKE = {"vit": tiny_vit, "ast": tiny_ast}


def batch(arch: str, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if arch == "vit":
        return {"pixel_values": torch.randn(2, 1, 12, 12, generator=g)}
    return {"input_values": torch.randn(2, 32, 16, generator=g)}


def pooled(arch: str, final: torch.Tensor) -> torch.Tensor:
    """What the model's own classifier reads: ViT's CLS, AST's mean of CLS and distillation token."""
    return final[:, 0] if arch == "vit" else (final[:, 0] + final[:, 1]) / 2


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


def naive_reading(arch: str, model, form: QueryTokens, inputs: dict[str, torch.Tensor]) -> Reading:
    """VQT as the paper draws it: [Q_l; Z_{l-1}] through block l with full autograd, keys/values of the real rows
    only, queries stripped after the block; no caching, no no_grad. ``form`` must be detached."""
    t = form.tokens
    bl = [b for _, b in blocks(model)]
    outs: list[torch.Tensor] = []

    def pre(i, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        joint = torch.cat([form.queries[i].to(x.dtype).expand(x.shape[0], -1, -1), x], 1)
        if args:
            return (joint, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": joint}

    def post(i, module, args, kwargs, output):
        h = output[0] if isinstance(output, tuple) else output
        outs.append(h[:, :t])
        return (h[:, t:], *output[1:]) if isinstance(output, tuple) else h[:, t:]

    def kv(module, query, key, value, mask):
        return key[:, :, t:], value[:, :, t:], mask  # no padding: every row sees every real token

    attns = _attention_per_block(model, bl)
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
    return Reading(None, pooled(arch, final), outs)


# ---------------------------------------------------------------- the paper's invariants, on ViT and AST


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["vit", "ast"])
def test_backbone_is_bit_identical_to_the_frozen_model(arch: str, impl: str) -> None:
    model = MAKE[arch]()
    model.config._attn_implementation = impl
    x = batch(arch)
    ref_blocks, ref_logits = block_outputs(model, lambda: model(**x).logits.detach())
    with torch.no_grad():
        ref_cls = pooled(arch, model.base_model(**x).last_hidden_state)

    tuned = dt.attach(model, "vqt", tokens=2)
    with torch.no_grad():
        form_of(tuned).queries.normal_(0, 3.0)
    tuned.train()  # dropout on Q active; the backbone still runs as the frozen eval model
    got_blocks, reading = block_outputs(model, lambda: form_of(tuned).read(**x))
    assert len(got_blocks) == len(ref_blocks) == LAYERS
    for got, ref in zip(got_blocks, ref_blocks, strict=True):
        assert torch.equal(got, ref)
    assert torch.equal(reading.cls, ref_cls)
    assert torch.equal(reading.output.logits, ref_logits)
    assert tuned(**x).logits.shape == (2, LABELS)

    tuned.detach()
    with torch.no_grad():
        assert torch.equal(model(**x).logits, ref_logits), "detached, the model is the base model again"


@pytest.mark.parametrize("arch", ["vit", "ast"])
def test_a_query_changes_only_its_own_output(arch: str) -> None:
    tuned = dt.attach(MAKE[arch](), "vqt", tokens=2)
    tuned.eval()
    form, x = form_of(tuned), batch(arch)
    with torch.no_grad():
        before = form.read(**x)
        form.queries[1, 0] += 0.5
        after = form.read(**x)
    assert torch.equal(after.cls, before.cls)
    for layer in range(LAYERS):
        for j in range(2):
            same = torch.equal(after.queries[layer][:, j], before.queries[layer][:, j])
            assert same == ((layer, j) != (1, 0)), (layer, j)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["vit", "ast"])
def test_gradients_equal_full_autograd_with_queries_inside_the_model(arch: str, impl: str) -> None:
    model = MAKE[arch]()
    model.config._attn_implementation = impl
    tuned = dt.attach(model, "vqt", tokens=2)
    tuned.eval()
    form, x, y = form_of(tuned), batch(arch), torch.tensor([0, 2])
    with torch.no_grad():
        form.queries.normal_(0, 1.0)

    ours = form.read(**x)
    F.cross_entropy(form.head(form.features(ours)), y).backward()
    grads = {n: p.grad.clone() for n, p in form.named_parameters()}
    form.zero_grad()

    form.detach()
    naive = naive_reading(arch, model, form, x)
    F.cross_entropy(form.head(form.features(naive)), y).backward()
    for o, r in zip(ours.queries, naive.queries, strict=True):
        torch.testing.assert_close(o, r, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.cls, naive.cls, atol=1e-6, rtol=1e-5)
    for n, p in form.named_parameters():
        assert grads[n].abs().sum() > 0, n
        torch.testing.assert_close(grads[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)
    assert all(p.grad is None for p in model.parameters()), "no gradient reaches the backbone"


@pytest.mark.parametrize("arch", ["vit", "ast"])
def test_feature_dimension_unit_chunks_and_the_patch_sized_init(arch: str) -> None:
    """dim f = D(1 + L·T), unit-norm chunks, L·T·D + D(1 + L·T)·C + C parameters, and Q ~ U(-v, v) with VPT's
    v for the model's own patch size (ViT 4, AST 8)."""
    t = 2
    tuned = dt.attach(MAKE[arch](), "vqt", tokens=t)
    form = form_of(tuned)
    with torch.no_grad():
        f = form.features(form.read(**batch(arch)))
    assert f.shape == (2, D * (1 + LAYERS * t))
    for chunk in [f[:, :D], *f[:, D:].split(t * D, dim=1)]:
        torch.testing.assert_close(chunk.norm(dim=-1), torch.ones(2), atol=1e-6, rtol=1e-5)
    assert tuned.num_trainable() == LAYERS * t * D + D * (1 + LAYERS * t) * LABELS + LABELS
    v = vpt_range(D, 4 if arch == "vit" else 8)
    assert form.queries.abs().max() <= v and form.queries.std() > v / 4


@pytest.mark.parametrize("arch", ["vit", "ast"])
def test_no_query_tokens_is_linear_probing_on_what_the_classifier_pools(arch: str) -> None:
    model = MAKE[arch]()
    x = batch(arch)
    with torch.no_grad():
        cls = pooled(arch, model.base_model(**x).last_hidden_state)
    tuned = dt.attach(model, "vqt", tokens=0)
    head = form_of(tuned).head
    assert head.in_features == D and tuned.num_trainable() == D * LABELS + LABELS
    with torch.no_grad():
        assert torch.equal(tuned(**x).logits, head(F.normalize(cls, dim=-1)))


@pytest.mark.parametrize("arch", ["vit", "ast"])
def test_save_load_reproduces_logits_and_merge_refuses(arch: str, tmp_path) -> None:
    tuned = dt.attach(MAKE[arch](), "vqt", tokens=2, dropout=0.0)
    x, y = batch(arch), torch.tensor([0, 2])
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        tuned(**x, labels=y).loss.backward()
        opt.step()
    tuned.eval()
    with torch.no_grad():
        trained = tuned(**x).logits
        torch.testing.assert_close(tuned(**x, labels=y).loss, F.cross_entropy(trained, y))
    tuned.save(tmp_path / "a")
    loaded = dt.load(MAKE[arch](seed=0), tmp_path / "a")
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, trained)
    with pytest.raises(dt.DeltatuneError, match="cannot be merged .*query tokens"):
        tuned.merge()


def test_swin_and_a_bare_vit_are_refused_in_one_line() -> None:
    from conftest import tiny_architecture

    for model, match in ((tiny_architecture("swin"), "vqt cannot be used on swin: .*shifted windows"),
                         (tf.ViTModel(tf.ViTConfig(**VISION, image_size=12, patch_size=4, num_channels=1)),
                          "ForImageClassification")):
        with pytest.raises(dt.DeltatuneError, match=match) as err:
            dt.attach(model, "vqt")
        assert "\n" not in str(err.value)
        assert not any(p.requires_grad is False for p in model.parameters()), "nothing was attached or frozen"


# ---------------------------------------------------------------- training on digits, reloading from the artifact

IMAGE = {"name": "digits", "task": "image-classification", "max_train": 240, "max_eval": 60}
TRAIN = {"batch_size": 16, "progress": False, "eval_every": 0, "save_every": 0}


@pytest.fixture(scope="module")
def vit_body(tmp_path_factory) -> str:
    """A tiny ViT body on 8×8 grey images (the loader adds a fresh 10-class head)."""
    folder = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    tf.ViTModel(tf.ViTConfig(**{**VISION, "num_hidden_layers": 2}, image_size=8, patch_size=4, num_channels=1),
                add_pooling_layer=False).save_pretrained(folder)
    return str(folder)


def test_vqt_trains_on_digits_and_the_artifact_loads_without_a_model(vit_body: str, tmp_path) -> None:
    """dt.train with VQT on the digits lowers the loss; the artifact records the image classifier, so its base
    loads from the artifact alone (models.load_base(*models.base_of(meta))) as the 10-label ViT classifier, and
    gives the trained model's evaluation."""
    run = tmp_path / "run"
    summary = dt.train({"model": vit_body, "data": IMAGE, "method": {"name": "vqt", "tokens": 2},
                        "output": str(run), "train": {**TRAIN, "steps": 60, "batch_size": 32, "lr": 0.1}})
    # a random backbone's unit-norm features barely differ between digits, so the head needs a large step size
    losses = [h["loss"] for h in summary["history"]]
    assert sum(losses[-10:]) < 0.9 * sum(losses[:10]), losses
    assert summary["final"]["eval_loss"] < 0.95 * math.log(10) and summary["final"]["eval_accuracy"] > 0.3
    head = artifact.read_meta(run)["fingerprint"]["head"]
    assert head["task"] == "image_classification" and head["num_labels"] == 10
    assert head["id2label"] == {str(i): str(i) for i in range(10)}
    model = models.load_base(*models.base_of(artifact.read_meta(run)))
    assert type(model).__name__ == "ViTForImageClassification" and model.config.num_labels == 10
    loaded = dt.load(model, run)
    assert dt.eval(run, IMAGE)["accuracy"] == pytest.approx(summary["final"]["eval_accuracy"], rel=1e-6)
    x = {"pixel_values": torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))}
    from deltatune.data.tasks import DataConfig, load_for_task

    trained = dt.load(load_for_task(DataConfig(**IMAGE), vit_body).model, run)
    with torch.no_grad():
        assert torch.equal(loaded(**x).logits, trained(**x).logits)


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_a_lora_classifier_reloads_and_merges_from_the_artifact_alone(kind: str, tmp_path) -> None:
    """A LoRA + fresh-head delta on an image / audio classifier made from a body folder: save → load its base from
    the artifact alone → equal logits; `deltatune merge` writes the trained classifier (its natural class is the
    image / audio classifier again), with the same logits."""
    torch.manual_seed(0)
    if kind == "image":
        tf.ViTModel(tf.ViTConfig(**VISION, image_size=12, patch_size=4, num_channels=1),
                    add_pooling_layer=False).save_pretrained(tmp_path / "body")
        task, cls, arch = "image_classification", "ViTForImageClassification", "vit"
    else:
        tf.ASTModel(tf.ASTConfig(**VISION, num_mel_bins=16, max_length=32, patch_size=8, frequency_stride=8,
                                 time_stride=8)).save_pretrained(tmp_path / "body")
        task, cls, arch = "audio_classification", "ASTForAudioClassification", "ast"
    names = {0: "a", 1: "b", 2: "c", 3: "d"}
    base = models.load(tmp_path / "body", task=task, id2label=names, label2id={v: k for k, v in names.items()})
    assert type(base).__name__ == cls
    tuned = dt.attach(base, "lora", r=2)
    x, y = batch(arch), torch.tensor([1, 3])
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        tuned(**x, labels=y).loss.backward()
        opt.step()
    tuned.eval()
    with torch.no_grad():
        trained = tuned(**x).logits
    tuned.save(tmp_path / "a")
    assert tuned.delta.fresh_head, "the fresh head trained next to LoRA"

    meta = artifact.read_meta(tmp_path / "a")
    assert meta["fingerprint"]["head"]["task"] == task and meta["fingerprint"]["head"]["num_labels"] == 4
    alone = models.load_base(*models.base_of(meta))
    assert type(alone).__name__ == cls and alone.config.id2label == names
    with torch.no_grad():
        assert torch.equal(dt.load(alone, tmp_path / "a")(**x).logits, trained)

    dt.merge(tmp_path / "a", out=tmp_path / "merged")
    assert models.natural_task(tmp_path / "merged") == task
    merged = models.load(tmp_path / "merged")
    assert type(merged).__name__ == cls
    with torch.no_grad():
        torch.testing.assert_close(merged(**x).logits, trained, rtol=1e-5, atol=1e-6 * trained.abs().max().item())
