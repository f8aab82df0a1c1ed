"""Polyhistor / Polyhistor-Lite (deltatune/methods/polyhistor.py) and multi-task training (deltatune/data/multitask.py)
on a tiny BERT and a tiny Swin built from transformers configs: the generated adapter weights against a hand
computation of the hypernetworks and Kronecker scaling kernels, the base model at init, the parameter count's closed
form, task selection, the refusal, and a two-task run through ``dt.train`` (both losses fall, per-task heads and
metrics, save / load exact)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import architecture_batch, output_of, tiny_architecture

import deltatune as dt
from deltatune.data.multitask import MultiTask, TaskHeads, active_task, cross_entropy_by_task
from deltatune.data.tasks import DataConfig, load_for_task
from deltatune.methods._adapters import site_width
from deltatune.methods.polyhistor import Polyhistor, parameter_count

pytestmark = pytest.mark.usefixtures("one_thread")

SENTIMENT = {"negative": ["awful", "sad", "terrible", "bad"], "positive": ["great", "lovely", "happy", "superb"]}
TOPIC = {"sport": ["goal", "match", "team", "coach"], "food": ["bread", "soup", "cheese", "salad"],
         "music": ["song", "band", "guitar", "album"]}


def polyhistor_of(tuned: dt.Tuned) -> Polyhistor:
    return next(f for f in tuned.forms().values() if isinstance(f, Polyhistor))


def widths_of(model: torch.nn.Module, form: Polyhistor) -> list[int]:
    return [site_width(model, s) for s in form._sites]


# -- the generated weights against a hand computation --------------------------------------------------------------
def hand_weights(form: Polyhistor, task: int, site: int) -> tuple[torch.Tensor, torch.Tensor]:
    """D and U from the module docstring's formulas, element by element (no kron, no view of the hypernetworks)."""
    cfg, d0 = form.cfg, form.d0
    z = form.task_embedding[task].detach().double()
    norm = 1.0 / math.sqrt(cfg.k * d0)
    out = {}
    for p in ("down", "up"):
        th = form.task_hyper[p]
        a_flat = th.weight.detach().double() @ z + th.bias.detach().double()
        a = torch.stack([a_flat[i * cfg.k:(i + 1) * cfg.k] for i in range(cfg.r)])  # r × k, row-major
        if cfg.lite:
            b = form.shared_b[p].detach().double()
        else:
            lh, ell = form.layer_hyper[p], form.layer_embedding[site].detach().double()
            b_flat = lh.weight.detach().double() @ ell + lh.bias.detach().double()
            b = torch.stack([b_flat[i * d0:(i + 1) * d0] for i in range(cfg.k)])  # k × d0
        template = (a @ b) * norm
        if p == "up":
            template = template.T  # d0 × r
        s = form.kernels[f"{site}_{p}"].detach().double()
        rows, cols = template.shape
        big = torch.zeros(s.shape[0] * rows, s.shape[1] * cols, dtype=torch.float64)
        for i in range(s.shape[0]):
            for j in range(s.shape[1]):
                big[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols] = s[i, j] * template
        out[p] = big
    return out["down"], out["up"]


def perturb(form: Polyhistor, seed: int = 3) -> None:
    """Move every tensor off its initialisation (the up path starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in form.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize(("arch", "options"), [
    ("bert", {"tasks": 2}),
    ("bert", {"tasks": 3, "lite": True, "placement": "houlsby"}),
    ("swin", {"tasks": 2}),
    ("swin", {"tasks": 2, "lite": True, "rank_scaling": True}),
])
def test_generated_weights_match_a_hand_computation(arch: str, options: dict) -> None:
    model = tiny_architecture(arch)
    tuned = dt.attach(model, "polyhistor", r=4, k=2, embedding=6, **options)
    form = polyhistor_of(tuned)
    perturb(form)
    widths = widths_of(model, form)
    for site, width in enumerate(widths):
        sb, sr = form.scale[site]
        for task in range(form.tasks):
            down, up = form.weights(task, site)
            want_down, want_up = hand_weights(form, task, site)
            assert down.shape == (sr * 4, width) and up.shape == (width, sr * 4)
            torch.testing.assert_close(down.double(), want_down, rtol=1e-5, atol=1e-6 * float(want_down.abs().max()))
            torch.testing.assert_close(up.double(), want_up, rtol=1e-5, atol=1e-6 * float(want_up.abs().max()))
    # the adapter the hook adds is U act(D h) with the selected task's weights
    h = torch.randn(3, widths[-1], dtype=torch.float32)
    with active_task(tuned, form.tasks - 1):
        got = form.adapt(len(widths) - 1, h)
    down, up = hand_weights(form, form.tasks - 1, len(widths) - 1)
    want = (torch.relu(h.double() @ down.T) @ up.T).float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_swin_stages_get_their_width_from_the_scaling_kernels() -> None:
    model = tiny_architecture("swin")  # stages of width 16 and 32
    form = polyhistor_of(dt.attach(model, "polyhistor", tasks=1, r=4, k=2, embedding=6))
    assert form.d0 == 16 and [s for s, _ in form.scale] == [1, 1, 2, 2]
    perturb(form)
    wide = len(form.scale) - 1
    before = form.weights(0, wide)[0].detach().clone()
    with torch.no_grad():
        form.kernels[f"{wide}_down"].mul_(2.0)
    # a stage's weights scale with its own kernel only, and the narrow stage's do not move
    torch.testing.assert_close(form.weights(0, wide)[0], 2 * before, rtol=1e-6, atol=0)
    narrow = form.weights(0, 0)[0].detach().clone()
    with torch.no_grad():
        form.kernels[f"{wide}_up"].mul_(3.0)
    assert torch.equal(form.weights(0, 0)[0], narrow)


# -- init, count, tasks, refusal -------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "swin", "llama"])
@pytest.mark.parametrize("lite", [False, True])
def test_a_fresh_delta_is_the_base_model_and_the_count_is_the_closed_form(arch: str, lite: bool) -> None:
    model = tiny_architecture(arch)
    x = architecture_batch(model)
    base = output_of(model, x)
    tuned = dt.attach(model, "polyhistor", tasks=2, lite=lite, placement="houlsby")
    assert torch.equal(output_of(model, x), base), "the up path's task hypernetwork starts at zero: U = 0"
    form = polyhistor_of(tuned)
    assert tuned.num_trainable() == parameter_count(form.cfg, widths_of(model, form), 2) == form.num_trainable()
    # the up path's gradient is not zero at init, so training can leave the base
    logits = model(**x).logits
    logits.float().pow(2).mean().backward()
    assert float(form.task_hyper["up"].weight.grad.abs().max()) > 0


def test_the_decomposition_is_smaller_than_a_monolithic_hypernetwork() -> None:
    from deltatune.methods.polyhistor import PolyhistorConfig

    cfg = PolyhistorConfig(r=8, k=4, embedding=32)
    widths = [384] * 6
    monolithic = 2 * (32 + 1) * 8 * 384 + 6 * 32 + 2 * 32  # one hypernetwork per path emitting all r·d numbers
    assert parameter_count(cfg, widths, 2) < monolithic
    assert parameter_count(PolyhistorConfig(r=8, k=4, embedding=32, lite=True), widths, 2) < parameter_count(
        cfg, widths, 2)


def test_changing_a_task_embedding_changes_only_that_tasks_output() -> None:
    model = tiny_architecture("bert")
    x = architecture_batch(model)
    tuned = dt.attach(model, "polyhistor", tasks=2)
    form = polyhistor_of(tuned)
    perturb(form)
    outs = []
    for t in (0, 1):
        with active_task(tuned, t):
            outs.append(output_of(tuned, x))
    assert not torch.equal(outs[0], outs[1]), "two tasks get two adapters"
    with torch.no_grad():
        form.task_embedding[1].add_(1.0)
    with active_task(tuned, 0):
        assert torch.equal(output_of(tuned, x), outs[0])
    with active_task(tuned, 1):
        assert not torch.equal(output_of(tuned, x), outs[1])
    assert form.task == 0, "active_task puts the previous task back"
    with pytest.raises(dt.DeltatuneError, match="task 2 does not exist"), active_task(tuned, 2):
        pass


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_encoder_decoder_models_are_refused_in_one_line(arch: str) -> None:
    model = tiny_architecture(arch)
    x = architecture_batch(model)
    base = output_of(model, x)
    with pytest.raises(dt.DeltatuneError) as err:
        dt.attach(model, "polyhistor")
    assert "polyhistor cannot be used on" in str(err.value) and "\n" not in str(err.value)
    assert torch.equal(output_of(model, x), base)


# -- multi-task training ---------------------------------------------------------------------------------------------
def write_jsonl(path: Path, words: dict[str, list[str]]) -> None:
    # the label word first: a random tiny BERT pools position 0, which barely reads the other tokens
    rows = [{"text": f"{w} said the day {i}", "label": lab} for i in range(10) for lab, ws in words.items()
            for w in ws[i % 2::2]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny bare BERT with a word-level tokenizer, and two tasks: sentiment (2 classes) and topic (3 classes)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("polyhistor")
    write_jsonl(root / "sentiment.jsonl", SENTIMENT)
    write_jsonl(root / "topic.jsonl", TOPIC)
    words = sorted({w for f in ("sentiment", "topic") for line in (root / f"{f}.jsonl").read_text().splitlines()
                    for w in json.loads(line)["text"].split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = root / "model"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]").save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, pad_token_id=0, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)).save_pretrained(folder)
    data = {"multitask": [{"path": str(root / "sentiment.jsonl")}, {"path": str(root / "topic.jsonl")}],
            "max_length": 12, "eval_fraction": 0.25}
    return {"root": root, "model": str(folder), "data": data}


def run_config(two_tasks: dict, method: dict, out: Path, steps: int = 60) -> dict:
    return {"model": two_tasks["model"], "data": json.loads(json.dumps(two_tasks["data"])), "method": method,
            "train": {"steps": steps, "batch_size": 8, "lr": 3e-2, "warmup": 0, "eval_every": 0, "save_every": 0,
                      "schedule": "constant", "progress": False},
            "output": str(out)}


def test_the_multitask_section_gives_each_task_its_head(two_tasks: dict) -> None:
    cfg = DataConfig(**two_tasks["data"])
    assert [p.max_length for p in cfg.parts()] == [12, 12], "keys beside the list are every item's default"
    model, _, task = load_for_task(cfg, two_tasks["model"], seed=0)
    assert isinstance(task, MultiTask) and task.names == ["sentiment", "topic"]
    heads = model.classifier
    assert isinstance(heads, TaskHeads) and [h.out_features for h in heads.heads] == [2, 3]
    assert {f["task"] for f in task.train} == {0, 1}
    tuned = dt.attach(model, "polyhistor")
    assert polyhistor_of(tuned).tasks == 2 and tuned.method_config.tasks == 2, "tasks: null reads the model's heads"
    assert set(tuned.delta.fresh_head) == {f"classifier.{n}" for n, _ in heads.named_parameters()}
    batch = task.collate(task.train[:8])
    for t, sub in task.split(batch).items():
        with active_task(tuned, t):
            assert output_of(tuned, {k: v for k, v in sub.items() if k != "labels"}).shape[-1] == [2, 3][t]


def test_a_bad_multitask_section_is_refused_in_one_line() -> None:
    with pytest.raises(dt.DeltatuneError, match="at least two"):
        DataConfig(multitask=[{"name": "tweets"}])
    with pytest.raises(dt.DeltatuneError, match=r"data.multitask\[1\].*classification"):
        DataConfig(multitask=[{"name": "tweets"}, {"name": "bbc", "task": "text"}])


@pytest.mark.parametrize("lite", [False, True])
def test_two_tasks_train_their_losses_fall_and_the_artifact_loads_exactly(two_tasks: dict, tmp_path: Path,
                                                                          lite: bool) -> None:
    cfg = run_config(two_tasks, {"name": "polyhistor", "r": 4, "k": 2, "embedding": 8, "lite": lite},
                     tmp_path / "run")
    model, _, task = load_for_task(DataConfig(**cfg["data"]), two_tasks["model"], seed=0)
    torch.manual_seed(0)
    before = cross_entropy_by_task(task, model, task.collate(task.eval))
    summary = dt.train(cfg)
    history = summary["history"]
    assert {"loss/sentiment", "loss/topic"} <= set(history[0])
    final = summary["final"]
    assert {"eval_sentiment/accuracy", "eval_topic/accuracy", "eval_accuracy"} <= set(final)

    loaded = dt.load(load_for_task(DataConfig(**cfg["data"]), two_tasks["model"], seed=0).model, tmp_path / "run")
    assert loaded.method_config.tasks == 2
    after = cross_entropy_by_task(task, loaded, task.collate(task.eval))
    for name in ("sentiment", "topic"):
        assert after[name] < 0.7 * before[name], (name, before[name], after[name])
    # the loaded artifact evaluates as the run did (its per-task heads and adapters)
    evaluated = {f"eval_{k}": v for k, v in task.evaluate(loaded, 8).items()}
    assert evaluated == pytest.approx({k: v for k, v in final.items() if k.startswith("eval_")}, rel=1e-6)
    loaded.save(tmp_path / "again")
    assert (tmp_path / "again" / "delta.safetensors").read_bytes() == \
        (tmp_path / "run" / "delta.safetensors").read_bytes()


def test_another_method_trains_one_shared_delta_with_a_head_per_task(two_tasks: dict, tmp_path: Path) -> None:
    cfg = run_config(two_tasks, {"name": "adapter", "r": 4, "placement": "pfeiffer"}, tmp_path / "run", steps=4)
    summary = dt.train(cfg)
    assert {"eval_sentiment/accuracy", "eval_topic/accuracy"} <= set(summary["final"])
    fresh = dt.inspect(tmp_path / "run")["fresh_head"]
    assert any(n.startswith("classifier.heads.0.") for n in fresh) and any(n.startswith("classifier.heads.1.")
                                                                           for n in fresh)


def test_a_multitask_run_resumes_bit_identical_and_evaluates_through_dt_eval(two_tasks: dict, tmp_path: Path) -> None:
    method = {"name": "polyhistor", "r": 4, "k": 2, "embedding": 8}
    straight = run_config(two_tasks, method, tmp_path / "straight", steps=6)
    summary = dt.train(straight)
    cut = run_config(two_tasks, method, tmp_path / "cut", steps=3)
    dt.train(cut)
    cut["train"]["steps"] = 6
    dt.train(cut, resume=True)
    assert (tmp_path / "cut" / "delta.safetensors").read_bytes() == \
        (tmp_path / "straight" / "delta.safetensors").read_bytes()
    # `deltatune eval` loads the model with the same task heads (seeded) and reports each task
    metrics = dt.eval(tmp_path / "straight", straight["data"], batch_size=8)
    assert {f"eval_{k}": v for k, v in metrics.items()} == pytest.approx(
        {k: v for k, v in summary["final"].items() if k.startswith("eval_")}, rel=1e-6)
