"""The training-time loss terms of issue 20 (shared/methods/augmentation.md, tests 5-7): ``train.mixup`` (the
sentence representation the classifier reads, mixed within the batch, and the λ-weighted cross-entropy) and
``train.contrastive`` (SupCon over the batch's L2-normalised representations, CE + w·SCL), for head models and
label-word classification, in ``deltatune train`` and in ``DeltaTuneTrainer``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import save_word_llama, train_then_resume, word_run_config, write_sentiment_jsonl
from test_head_artifacts import LABELS, run_config, save_tiny_encoder

import deltatune as dt
from deltatune.data.config import DataConfig
from deltatune.data.tasks import (
    LossTerms,
    classification_head,
    load_for_task,
    mixup_cross_entropy,
    supervised_contrastive,
)
from deltatune.errors import DeltatuneError
from deltatune.train import loop
from deltatune.train.config import config_differences, load_config

pytestmark = pytest.mark.usefixtures("one_thread")

LORA_BERT = {"name": "lora", "r": 4, "alpha": 8, "targets": ["query", "value"]}
LORA_LLAMA = {"name": "lora", "r": 4, "alpha": 8}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loss-terms")
    encoder = save_tiny_encoder(root / "encoder", root / "data.jsonl")
    llama = save_word_llama(root / "llama")
    return {"root": root, "encoder": encoder, "llama": llama, "data": root / "data.jsonl"}


def loaded(files: dict[str, Path], kind: str):
    """(model in train mode, task) of one kind: an encoder with a head, a decoder with a ``score`` head
    (pooling the last non-pad token), or a causal LM scoring label words."""
    model = str(files["encoder"] if kind == "bert-head" else files["llama"])
    head = {"bert-head": None, "llama-head": True, "label-words": False}[kind]
    cfg = DataConfig(path=str(files["data"]), task="classification", labels=LABELS, max_length=16,
                     eval_fraction=0.25, head=head)
    model, _, task = load_for_task(cfg, model, seed=0)
    return model.train(), task


KINDS = ["bert-head", "llama-head", "label-words"]


class Fixed(LossTerms):
    """Loss terms with a chosen λ and partner permutation (the draw is what the test fixes)."""

    def __init__(self, lam: float, perm: list[int], **terms: float) -> None:
        super().__init__(**{"mixup": 0.4, **terms})
        object.__setattr__(self, "fixed", (lam, torch.tensor(perm)))

    def draw(self, n: int):
        return self.fixed


def batch_of(task, rows: list[int], ragged: bool = False) -> dict[str, torch.Tensor]:
    """The collated training examples ``rows``; ``ragged``: each cut by 0, 1 or 2 tokens, so the batch is
    padded (the sentiment texts all have the same length)."""
    features = [task.train[i] for i in rows]
    if ragged:
        features = [{**f, "input_ids": f["input_ids"][:len(f["input_ids"]) - k % 3]}
                    for k, f in enumerate(features)]
    return task.collate(features)


def plain_loss(task, model, batch) -> torch.Tensor:
    task.use_loss_terms(None)
    return task.loss(model, batch)[0]


# ---------------------------------------------------------------- spec test 5: mixup


@pytest.mark.parametrize("kind", KINDS)
def test_mixup_at_lambda_one_is_plain_cross_entropy_exactly(files, kind) -> None:
    model, task = loaded(files, kind)
    batch = batch_of(task, list(range(8)))
    plain = plain_loss(task, model, batch)
    task.use_loss_terms(Fixed(1.0, [3, 2, 1, 0, 7, 6, 5, 4]))
    assert torch.equal(task.loss(model, batch)[0], plain)


@pytest.mark.parametrize("kind", KINDS)
def test_mixup_of_identical_pairs_is_plain_cross_entropy(files, kind) -> None:
    model, task = loaded(files, kind)
    batch = batch_of(task, [0, 1, 2, 0, 1, 2])  # row i and row i + 3 are the same example
    plain = plain_loss(task, model, batch)
    task.use_loss_terms(Fixed(0.5, [3, 4, 5, 0, 1, 2]))
    torch.testing.assert_close(task.loss(model, batch)[0], plain, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("kind", KINDS)
def test_mixup_mixes_the_representation_the_head_reads(files, kind) -> None:
    """Under mixup the class scores are the head applied to λ·h_i + (1−λ)·h_π(i), h the representation at the
    position the model pools (the pooled output, a decoder's last non-pad token, the prompt's last token)."""
    model, task = loaded(files, kind)
    model.eval()  # no dropout: the two forward passes see the same h
    batch = batch_of(task, list(range(6)), ragged=True)
    assert (batch["attention_mask"] == 0).any(), "padded rows: the pooled position differs between rows"
    lam, perm = 0.3, [5, 0, 1, 2, 3, 4]
    task.use_loss_terms(Fixed(lam, perm))
    head, positions = task.representation_site(model, batch)
    with task.loss_terms.around(head, positions, 6) as seen, torch.no_grad():
        mixed_scores = task.scores(model, batch)
    h = seen.features
    mixed = lam * h + (1 - lam) * h[perm]
    with torch.no_grad():
        expected = head(mixed).float()
    if kind == "label-words":
        expected = expected[:, task.label_token_ids]
    torch.testing.assert_close(mixed_scores, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        plain = task.scores(model, batch)
    assert not torch.allclose(plain, mixed_scores, atol=1e-4), "mixing changes the scores"


def test_mixup_loss_is_the_soft_label_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(7, 4, generator=g) * 3
    y, y2 = torch.randint(0, 4, (7,), generator=g), torch.randint(0, 4, (7,), generator=g)
    for lam in (0.0, 0.27, 0.5, 1.0):
        soft = lam * F.one_hot(y, 4).float() + (1 - lam) * F.one_hot(y2, 4).float()
        torch.testing.assert_close(mixup_cross_entropy(scores, y, y2, lam), F.cross_entropy(scores, soft))


def test_lambda_is_drawn_from_beta_and_the_partners_are_a_permutation() -> None:
    torch.manual_seed(0)
    terms = LossTerms(mixup=0.4)
    draws = [terms.draw(8) for _ in range(2000)]
    lams = torch.tensor([lam for lam, _ in draws])
    assert abs(float(lams.mean()) - 0.5) < 0.03, "Beta(α, α) has mean 1/2"
    expected_var = 1 / (4 * (2 * 0.4 + 1))  # Beta(α, α): 1 / (4(2α + 1))
    assert abs(float(lams.var()) - expected_var) / expected_var < 0.1
    assert all(sorted(p.tolist()) == list(range(8)) for _, p in draws)
    assert LossTerms(contrastive=0.5).draw(8) is None


# ---------------------------------------------------------------- spec test 6: SupCon


def supcon_reference(z: torch.Tensor, labels: list[int], tau: float) -> float:
    """Khosla et al.'s L_out written out with loops, over the anchors that have a positive."""
    z = F.normalize(z.double(), dim=-1)
    terms = []
    for i in range(len(labels)):
        positives = [p for p in range(len(labels)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(torch.exp(z[i] @ z[a] / tau) for a in range(len(labels)) if a != i)
        logs = [torch.log(torch.exp(z[i] @ z[p] / tau) / denominator) for p in positives]
        terms.append(-sum(logs) / len(positives))
    return float(sum(terms) / len(terms)) if terms else 0.0


def test_supcon_matches_a_loop_reference() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(9, 5, generator=g)
    labels = [0, 1, 0, 2, 1, 0, 3, 2, 4]  # classes 3 and 4 have one example: anchors without positives
    for tau in (0.1, 0.5):
        got = supervised_contrastive(z, torch.tensor(labels), tau)
        assert got.item() == pytest.approx(supcon_reference(z, labels, tau), rel=1e-5)


def test_supcon_is_lower_when_same_class_vectors_coincide() -> None:
    basis = torch.eye(3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    scale = torch.tensor([1.0, 2.0, 1.0, 3.0, 0.5, 1.0]).unsqueeze(1)
    z = basis[labels] * scale  # same-class vectors coincide once normalised; classes are orthogonal
    aligned = supervised_contrastive(z, labels, 0.1)
    shuffled = supervised_contrastive(z, torch.tensor([0, 1, 2, 0, 1, 2]), 0.1)
    assert aligned.item() < 0.1 * shuffled.item()
    # each anchor: its twin (z·z/τ = 10) against 4 orthogonal vectors (0): log(1 + 4e^-10), in float32 (its
    # logits are of order 10, so the absolute error is of order 10 · 2^-23)
    assert aligned.item() == pytest.approx(math.log1p(4 * math.exp(-10.0)), abs=4 * 10 * 2**-23)


def test_supcon_gradient_pulls_a_positive_pair_together() -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 8, generator=g, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 2, 3, 4])

    def cos01(v: torch.Tensor) -> float:
        return float(F.cosine_similarity(v[0], v[1], dim=0))

    supervised_contrastive(z, labels, 0.2).backward()
    moved = (z - 0.05 * z.grad).detach()
    assert cos01(moved) > cos01(z.detach()) + 1e-4


def test_anchors_without_positives_contribute_nothing() -> None:
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, 4, generator=g, requires_grad=True)
    alone = supervised_contrastive(z, torch.arange(5), 0.1)
    assert alone.item() == 0.0
    alone.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))
    # with one pair, the loss is the mean of the pair's two anchors only
    labels = torch.tensor([0, 1, 2, 0, 3])
    both = supervised_contrastive(z.detach(), labels, 0.1).item()
    assert both == pytest.approx(supcon_reference(z.detach(), labels.tolist(), 0.1), rel=1e-5)


def test_contrastive_term_is_added_with_its_weight(files) -> None:
    model, task = loaded(files, "bert-head")
    batch = batch_of(task, list(range(8)))
    plain = plain_loss(task, model, batch)
    task.use_loss_terms(LossTerms(contrastive=0.5, temperature=0.2))
    head, positions = task.representation_site(model, batch)
    with task.loss_terms.around(head, positions, 8) as seen:
        task.scores(model, batch)
    scl = supervised_contrastive(seen.features, batch["labels"], 0.2)
    torch.testing.assert_close(task.loss(model, batch)[0], plain + 0.5 * scl, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- spec test 7: end to end through dt.train


def losses(summary: dict) -> list[float]:
    return [h["loss"] for h in summary["history"]]


@pytest.mark.parametrize(("method", "train"), [
    (LORA_BERT, {"mixup": 0.4}),
    ({"name": "prefix", "length": 4}, {"contrastive": 0.5}),
    (LORA_BERT, {"mixup": 0.4, "contrastive": 0.5, "contrastive_temperature": 0.2}),
    ({"name": "prefix", "length": 4}, {"mixup": 0.4, "contrastive": 0.5, "precision": "bf16"}),
], ids=["lora-mixup", "prefix-contrastive", "lora-both", "prefix-both-bf16"])
def test_a_tiny_bert_trains_with_the_terms(files, tmp_path, method, train) -> None:
    def run(name: str, **extra) -> dict:
        cfg = run_config(files["encoder"], files["data"], method, tmp_path / name, steps=4)
        cfg["train"].update({"precision": train.get("precision", "auto"), **extra})
        return dt.train(cfg)

    off, on, again = run("off"), run("on", **train), run("again", **train)
    assert all(torch.isfinite(torch.tensor(losses(on))))
    assert losses(on) != losses(off), "the terms change the training loss"
    assert losses(on) == losses(again), "the same seed draws the same λ and partners"
    assert (tmp_path / "on" / "delta.safetensors").is_file()
    assert "eval_accuracy" in on["final"]


def test_label_word_classification_with_mixup_resumes_bit_exactly(word_run, tmp_path) -> None:
    """λ and the partners come from torch's generator, which checkpoints save: a resumed run draws the
    same."""
    cfg = word_run_config(word_run, LORA_LLAMA, tmp_path / "run", mixup=0.4, contrastive=0.3)
    straight, _ = train_then_resume(cfg, keep=2)
    plain = dt.train(word_run_config(word_run, LORA_LLAMA, tmp_path / "plain"))
    assert losses(straight) != losses(plain)


def test_a_checkpoint_written_before_the_terms_existed_still_resumes(word_run, tmp_path) -> None:
    config = load_config(word_run_config(word_run, LORA_LLAMA, tmp_path / "run"))
    saved = config.identity()
    for key in ("mixup", "contrastive", "contrastive_temperature"):
        del saved["train"][key]
    assert config_differences(saved, config) == []
    turned_on = load_config(word_run_config(word_run, LORA_LLAMA, tmp_path / "run", mixup=0.2))
    assert config_differences(saved, turned_on) == ["train.mixup: 0.0 -> 0.2"]


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize(("data", "train", "needle"), [
    ({"task": "text"}, {"mixup": 0.2}, "are classification losses, but the task is 'text'"),
    ({"packing": True}, {"contrastive": 0.1}, "read one example per row; set data.packing: false"),
    ({}, {"mixup": -0.1}, "train.mixup=-0.1: must be >= 0"),
    ({}, {"contrastive_temperature": 0.0}, "train.contrastive_temperature=0.0: must be > 0"),
], ids=["text-task", "packing", "negative-mixup", "zero-temperature"])
def test_config_refuses_terms_that_cannot_apply(word_run, tmp_path, data, train, needle) -> None:
    cfg = word_run_config(word_run, LORA_LLAMA, tmp_path / "run", **train)
    cfg["data"].update(data)
    if data.get("task") == "text":
        for key in ("labels",):
            cfg["data"].pop(key)
    with pytest.raises(DeltatuneError, match="bad run config") as e:
        load_config(cfg)
    assert needle in str(e.value)


def test_a_gradient_free_method_is_refused(word_run, tmp_path) -> None:
    cfg = word_run_config(word_run, {"name": "mezo", "eps": 1e-3}, tmp_path / "run", mixup=0.2)
    with pytest.raises(DeltatuneError, match="need gradients, but mezo trains from forward passes"):
        loop.build(load_config(cfg))


def test_a_task_object_refuses_terms_it_cannot_take(files, tmp_path) -> None:
    path = tmp_path / "texts.jsonl"
    write_sentiment_jsonl(path)
    cfg = DataConfig(path=str(path), task="text", max_length=16, eval_fraction=0.25)
    _, _, task = load_for_task(cfg, str(files["llama"]))
    with pytest.raises(DeltatuneError, match="the task is 'text'"):
        task.use_loss_terms(LossTerms(mixup=0.2))
    task.use_loss_terms(LossTerms())  # all off: nothing to refuse


def test_a_model_without_a_head_module_is_named(files) -> None:
    from transformers import BertModel

    with pytest.raises(DeltatuneError, match="BertModel has neither"):
        classification_head(BertModel.from_pretrained(files["encoder"]))


# ---------------------------------------------------------------- the Trainer bridge


def encoder_rows(files: dict[str, Path], n: int = 16) -> list[dict[str, torch.Tensor]]:
    _, task = loaded(files, "bert-head")
    out = []
    for f in task.train[:n]:
        ids = torch.tensor(f["input_ids"])
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "labels": torch.tensor(f["label"])})
    return out


def bert_tuned(files: dict[str, Path]) -> dt.Tuned:
    model, _ = loaded(files, "bert-head")
    torch.manual_seed(0)
    return dt.attach(model, "lora", r=4, alpha=8, targets=["query", "value"])


def test_trainer_bridge_computes_the_same_loss_as_the_task(files, tmp_path) -> None:
    from test_hf import arguments

    from deltatune.train.hf import DeltaTuneTrainer

    tuned = bert_tuned(files).train()
    trainer = DeltaTuneTrainer(model=tuned, args=arguments(tmp_path), train_dataset=encoder_rows(files),
                               mixup=0.4)
    rows = encoder_rows(files, 6)
    inputs = {key: torch.stack([r[key] for r in rows]) for key in ("input_ids", "attention_mask", "labels")}
    plain = tuned(**inputs).loss
    trainer.loss_terms = Fixed(1.0, [1, 0, 3, 2, 5, 4])
    torch.testing.assert_close(trainer.compute_loss(tuned, dict(inputs)), plain, rtol=1e-6, atol=0.0)
    trainer.loss_terms = Fixed(0.3, [1, 0, 3, 2, 5, 4], contrastive=0.5)
    _, task = loaded(files, "bert-head")
    task.use_loss_terms(trainer.loss_terms)
    expected = task.loss(tuned, dict(inputs))[0]  # no dropout in the tiny encoder: the same forward
    torch.testing.assert_close(trainer.compute_loss(tuned, dict(inputs)), expected, rtol=1e-6, atol=1e-7)


def test_trainer_bridge_trains_with_the_terms(files, tmp_path) -> None:
    from test_hf import arguments

    from deltatune.train.hf import DeltaTuneTrainer

    logs = {}
    for name, terms in (("off", {}), ("on", {"mixup": 0.4, "contrastive": 0.5})):
        tuned = bert_tuned(files)
        args = arguments(tmp_path / name, per_device_train_batch_size=8)
        trainer = DeltaTuneTrainer(model=tuned, args=args, train_dataset=encoder_rows(files), **terms)
        trainer.train()
        logs[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logs["on"]) == 3 and all(torch.isfinite(torch.tensor(logs["on"])))
    assert logs["on"] != logs["off"]


def test_trainer_bridge_refuses_terms_it_cannot_apply(files, tmp_path) -> None:
    from test_hf import arguments, base

    from deltatune.train.hf import DeltaTuneTrainer

    causal = dt.attach(base(), "lora", r=4)
    with pytest.raises(DeltatuneError, match="sequence-classification model, but this is a LlamaForCausalLM"):
        DeltaTuneTrainer(model=causal, args=arguments(tmp_path), mixup=0.2)
    with pytest.raises(DeltatuneError, match="mixup=-1 must be a number >= 0"):
        DeltaTuneTrainer(model=bert_tuned(files), args=arguments(tmp_path), mixup=-1)
    plain = DeltaTuneTrainer(model=causal, args=arguments(tmp_path))
    assert plain.loss_terms is None
