"""SPT: gradient sensitivity, the structured / unstructured decision, the budget search, and the stage-2 delta."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    batch,
    loss_of,
    output_of,
    save_word_llama,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    write_sentiment_jsonl,
)
from torch.utils._python_dispatch import TorchDispatchMode

import deltatune as dt
from deltatune.methods import spt
from deltatune.methods._calibration import task_batches
from deltatune.methods.spt import Candidate, SptConfig, allocate, structured_params


def _plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base tensors, under their plain names even while parametrisations are attached."""
    return {k.replace("parametrizations.", "").replace(".original", ""): v.detach().clone()
            for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- 1. sensitivity


def test_sensitivity_is_the_sum_of_squared_gradients() -> None:
    model = tiny_llama(bias=True)
    ref = tiny_llama(bias=True)
    params = [(c.name, c.param) for c in spt.candidates(model)]
    assert any(n.endswith("bias") for n, _ in params) and any(n.endswith("norm.weight") for n, _ in params)
    assert not any("embed" in n or "lm_head" in n for n, _ in params), "embeddings and head are no candidates"
    batches = [batch(seed=s) for s in (1, 2, 3)]

    def loss_fn(m, b):
        # the previous batch's gradients were folded into the scores and freed layer by layer
        assert all(p.grad is None for _, p in params)
        assert m.training, "the pass runs in train mode, as the official one"
        return loss_of(m, b)

    scores = spt.sensitivity(model, batches, loss_fn, params)
    ref_params = dict(ref.named_parameters())
    expected = {n: torch.zeros_like(p) for n, p in params}
    for b in batches:
        grads = torch.autograd.grad(loss_of(ref, b), [ref_params[n] for n, _ in params])
        for (n, _), g in zip(params, grads, strict=True):
            expected[n] += g.float() ** 2
    for n, _ in params:
        torch.testing.assert_close(scores[n], expected[n], rtol=1e-5, atol=1e-12)
    assert all(p.requires_grad for p in model.parameters()), "requires_grad flags are restored"
    assert all(p.grad is None for p in model.parameters()) and not model.training, "no grads left, mode restored"


# ---------------------------------------------------------------- 2. the decision rule


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_decision_rule_boundary(kind: str) -> None:
    d, r, alpha = 32, 8, 8.0
    p = structured_params(d, d, r, kind)
    assert p == (r * 2 * d if kind == "lora" else 2 * r * d + r + d)  # the paper's formulas (square W)
    edge = int(p / alpha)
    assert edge == p / alpha, "alpha chosen so that P/alpha is a whole count"
    w = Candidate("w", (d, d), p, alpha)
    assert not w.structured(edge - 1) and w.structured(edge)
    for n, structured in ((edge - 1, False), (edge, True)):
        scores = torch.zeros(d, d)
        scores.view(-1)[torch.randperm(d * d, generator=torch.Generator().manual_seed(n))[:n]] = 1.0
        plan, idx = allocate([w], {"w": scores}, budget=p if structured else n)
        if structured:
            assert plan["structured"] == ["w"] and plan["unstructured"] == {} and plan["cost"] == p
        else:
            assert plan["unstructured"] == {"w": n} and plan["cost"] == n
            assert torch.equal(idx["w"], scores.view(-1).nonzero().view(-1))


def test_vector_rule_and_non_square_adapter_count() -> None:
    v = Candidate("b", (32,), 32, 4.0)  # beta = 4: fully tuned from 8 marked entries on
    assert not v.structured(7) and v.structured(8) and v.cost(7) == 7 and v.cost(8) == 32
    # the adapter on a non-square matrix counts what trains: W_down (r, in) + b (r) + W_up (out, r) + b (out)
    model = tiny_llama()
    gate = model.model.layers[0].mlp.gate_proj  # 32 -> 64
    form = spt.ParallelAdapter(gate, 8)
    assert form.num_trainable() == structured_params(32, 64, 8, "adapter") == 8 * 32 + 8 + 64 * 8 + 64


# ---------------------------------------------------------------- 3. the budget


def _brute_force_closest(cands: list[Candidate], scores: dict[str, torch.Tensor], budget: int) -> int:
    """The cost of marking {s >= t} for every distinct t (and none), by sorting: the closest to the budget."""
    thresholds = torch.cat([scores[c.name].view(-1) for c in cands]).unique()
    thresholds = torch.cat([thresholds, torch.tensor([float("inf")])])
    total = torch.zeros(thresholds.numel(), dtype=torch.long)
    for c in cands:
        ordered = scores[c.name].view(-1).sort().values
        n = ordered.numel() - torch.searchsorted(ordered, thresholds)  # entries >= t
        total += torch.where((n > 0) & (n * c.divisor >= c.full_cost), c.full_cost, n)
    return min(total.tolist(), key=lambda c: (abs(c - budget), c))


@pytest.mark.parametrize("kind", ["ties", "continuous"])
@pytest.mark.parametrize("budget", [900, 3000, 7000])
def test_reported_budget_is_the_real_count_and_the_closest(budget: int, kind: str) -> None:
    model = tiny_bert()
    cands = spt.candidates(model, SptConfig(modules_to_save=["classifier"]))
    g = torch.Generator().manual_seed(budget)
    if kind == "ties":  # whole numbers: many equal scores, each in its own coarse bin
        scores = {c.name: torch.randint(0, 40, c.shape, generator=g).float() for c in cands}
    else:  # many distinct scores per coarse bin: the crossing is found in the low 16 bits
        scores = {c.name: torch.rand(c.shape, generator=g) for c in cands}
    best = _brute_force_closest(cands, scores, budget)
    tuned = dt.attach(model, "spt", sensitivity=scores, budget=budget, modules_to_save=["classifier"])
    plan = tuned.method_config.allocation
    head = sum(p.numel() for p in model.classifier.parameters())
    assert plan["cost"] == best, "the search finds the achievable cost closest to the budget"
    assert tuned.num_trainable() == plan["cost"] + head, "the recorded cost is what trains (head on top)"
    assert tuned.method_config.sensitivity is None, "a dict of scores is consumed; the config stays JSON"
    json.dumps(tuned.describe()["config"])


def test_default_budget_is_a_density_of_the_model() -> None:
    model = tiny_llama()
    tuned = dt.attach(model, "spt", sensitivity="random", density=0.05)
    plan = tuned.method_config.allocation
    assert plan["budget"] == int(0.05 * sum(p.numel() for p in model.parameters()))
    assert abs(plan["cost"] - plan["budget"]) <= 0.3 * plan["budget"] and tuned.num_trainable() == plan["cost"]


# ---------------------------------------------------------------- 4. the sparse delta's gradient


class _LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_sparse_gradient_is_the_dense_gradient_gathered_without_a_k_by_k_matrix() -> None:
    model, ref = tiny_llama(), tiny_llama()
    gate = "model.layers.1.mlp.gate_proj.weight"
    cands = spt.candidates(model)
    scores = {c.name: torch.zeros(c.shape) for c in cands}
    scores[gate] = torch.rand(64, 32, generator=torch.Generator().manual_seed(0)) + 0.1
    k = 64 * 32
    # alpha = 0.1: P/alpha exceeds the matrix, so all k entries stay unstructured
    tuned = dt.attach(model, "spt", sensitivity=scores, budget=k, alpha=0.1)
    form = tuned.forms()[gate]
    assert isinstance(form, spt.Sparse) and form.k == k
    x = batch()
    loss = loss_of(tuned, x)
    with _LargestTensor() as seen:
        loss.backward()
    assert seen.largest >= k, "the mode sees backward's tensors (the layer's dense gradient has k entries here)"
    assert seen.largest < k * k // 100, f"backward built a tensor of {seen.largest} entries (k*k = {k * k})"
    dense = torch.autograd.grad(loss_of(ref, x), ref.get_parameter(gate))[0]
    torch.testing.assert_close(form.values.grad, dense.view(-1)[form.indices.long()], rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- 5. init, 6. training, merge


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_starts_at_the_base_model(arch: str, kind: str) -> None:
    model = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}[arch]()
    x = batch()
    before = output_of(model, x)
    tuned = dt.attach(model, "spt", sensitivity="random", budget=6000, structured=kind)
    assert tuned.method_config.allocation["structured"], "the budget puts at least one structured module"
    assert torch.equal(output_of(tuned, x), before)
    tuned.train()  # dropout and DropPath on the branch: still zero at init
    assert torch.equal(output_of(tuned, x), before)


def _mixed_scores(model: torch.nn.Module, matrix: str, sparse: str, kind: str = "lora") -> tuple[dict, int]:
    """Scores that mark: all of ``matrix`` (structured), 5 entries of ``sparse`` and all of its owner's
    bias (a full vector), 2 entries of the first norm weight (a sparse vector); and that exact budget."""
    cands = {c.name: c for c in spt.candidates(model, SptConfig(structured=kind))}
    scores = {n: torch.rand(c.shape, generator=torch.Generator().manual_seed(7)) * 0.01 for n, c in cands.items()}
    norm = next(n for n in cands if "LayerNorm.weight" in n or "ln_1.weight" in n)
    bias = sparse.rpartition(".")[0] + ".bias"
    scores[matrix].fill_(1.0)
    scores[sparse].view(-1)[:5] = 1.0
    scores[bias].fill_(1.0)
    scores[norm].view(-1)[:2] = 1.0
    return scores, cands[matrix].full_cost + 5 + cands[bias].full_cost + 2


MIXED = {
    "bert": ("bert.encoder.layer.0.attention.self.query.weight", "bert.encoder.layer.1.intermediate.dense.weight"),
    "gpt2": ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight"),  # sparse Conv1D + its bias
}


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_backbone_stays_bitwise_frozen_and_the_lora_variant_merges(arch: str) -> None:
    model = {"bert": tiny_bert, "gpt2": tiny_gpt2}[arch]()
    w0 = _plain_state(model)
    scores, budget = _mixed_scores(model, *MIXED[arch])
    tuned = dt.attach(model, "spt", sensitivity=scores, budget=budget)
    plan = tuned.method_config.allocation
    assert plan["cost"] == budget == tuned.num_trainable()
    assert len(plan["structured"]) == 1 and len(plan["vectors"]) == 1 and len(plan["unstructured"]) == 2
    x = batch()
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
    tuned.train()
    for _ in range(3):
        opt.zero_grad()
        loss_of(tuned, x).backward()
        opt.step()
    assert all(p.grad is not None for p in tuned.trainable_parameters())
    tuned.eval()
    trained = output_of(tuned, x)
    now = _plain_state(model)
    assert now.keys() == w0.keys() and all(torch.equal(now[k], w0[k]) for k in w0), "the base is never written"
    assert not torch.allclose(trained, output_of(tiny_bert() if arch == "bert" else tiny_gpt2(), x))
    plain = tuned.merge()
    assert not any("parametrizations" in k for k in plain.state_dict())
    torch.testing.assert_close(output_of(plain, x), trained, atol=1e-5, rtol=0)
    tuned.unmerge()
    torch.testing.assert_close(output_of(tuned, x), trained, atol=1e-5, rtol=0)


def test_adapter_variant_cannot_merge() -> None:
    model = tiny_llama()
    tuned = dt.attach(model, "spt", sensitivity="random", budget=6000, structured="adapter")
    with torch.no_grad():
        for form in tuned.forms().values():
            if isinstance(form, spt.ParallelAdapter):
                form.up.weight.normal_()
    x = batch()
    out = output_of(tuned, x)
    with pytest.raises(dt.DeltatuneError, match=r"cannot be merged into weights \(.*: its adapter delta changes activations"):
        tuned.merge()
    assert torch.equal(output_of(tuned, x), out), "a refused merge leaves the model as it was"


# ---------------------------------------------------------------- the artifact, resume, data


@pytest.mark.parametrize(("arch", "kind"), [("llama", "lora"), ("gpt2", "adapter")])
def test_artifact_rebuilds_the_same_forms_without_scores(arch: str, kind: str, tmp_path) -> None:
    make = {"llama": tiny_llama, "gpt2": tiny_gpt2}[arch]
    model = make()
    scores = {c.name: torch.rand(c.shape, generator=torch.Generator().manual_seed(3)) for c in spt.candidates(model)}
    path = spt.save_sensitivity(scores, tmp_path / "scores.safetensors")
    tuned = dt.attach(model, "spt", sensitivity=path, budget=5000, structured=kind)
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
    x = batch()
    for _ in range(2):
        opt.zero_grad()
        loss_of(tuned, x).backward()
        opt.step()
    tuned.save(tmp_path / "a")
    (tmp_path / "scores.safetensors").unlink()  # loading needs no scores and no data
    loaded = dt.load(make(), tmp_path / "a")
    assert loaded.method_config.allocation == tuned.method_config.allocation
    assert list(loaded.forms()) == list(tuned.forms())
    assert torch.equal(output_of(loaded, x), output_of(tuned, x))


def test_resume_puts_on_the_forms_the_checkpoint_was_trained_with() -> None:
    a = dt.attach(tiny_llama(), "spt", sensitivity="random", budget=6000, seed=1)
    b = dt.attach(tiny_llama(), "spt", sensitivity="random", budget=6000, seed=2)
    assert a.method_config.allocation != b.method_config.allocation
    with torch.no_grad():
        for p in b.trainable_parameters():
            p.normal_(std=0.01)
    a.policy.load_state_dict(json.loads(json.dumps(b.policy.state_dict())))  # checkpoints hold JSON
    assert list(a.forms()) == list(b.forms()) and a.method_config.allocation == b.method_config.allocation
    a.deltas.load_state_dict(b.deltas.state_dict())
    x = batch()
    assert torch.equal(output_of(a, x), output_of(b, x))


@pytest.fixture(scope="module")
def word_folder(tmp_path_factory):
    """A tiny Llama with a word-level tokenizer built here (no shipped model to convert)."""
    folder = save_word_llama(tmp_path_factory.mktemp("spt-llama"), extra_words=(":",))
    data = folder / "sentiment.jsonl"
    write_sentiment_jsonl(data)
    return folder


def test_yaml_run_computes_the_sensitivity_from_its_data_and_resumes(word_folder, tmp_path) -> None:
    from deltatune.train import load_config

    yaml_text = f"""
model: {word_folder}
data: &data {{path: {word_folder / 'sentiment.jsonl'}, task: classification, labels: [negative, positive],
              max_length: 16, eval_fraction: 0.25}}
method: {{name: spt, data: *data, budget: 400, r: 2, sensitivity_batches: 2, sensitivity_batch_size: 4}}
train: {{steps: 4, batch_size: 4, lr: 1.0e-2, schedule: constant, progress: false}}
output: {tmp_path / 'run'}
"""
    (tmp_path / "run.yaml").write_text(yaml_text)
    cfg = load_config(tmp_path / "run.yaml", ["data.max_train=12"])
    assert cfg.method["data"]["max_train"] == 12, "the alias shares the run's data section, overrides included"
    summary = dt.train(cfg)
    plan = dt.inspect(tmp_path / "run")["config"]["allocation"]
    assert summary["trainable"] == plan["cost"] and abs(plan["cost"] - 400) < 100

    # the same scores by hand: the task's first C batches of a seeded shuffle, the task's loss
    model = dt.models.load(str(word_folder))
    batches, loss_fn = task_batches(model, cfg.method["data"], batches=2, batch_size=4)
    by_hand = dt.attach(model, "spt", sensitivity=spt.sensitivity(model, batches, loss_fn), budget=400, r=2)
    assert by_hand.method_config.allocation == plan
    assert dt.load(dt.models.load(str(word_folder)), tmp_path / "run").num_trainable() == plan["cost"]

    # stopped after 2 steps and resumed to 4 (the sensitivity is recomputed, the checkpoint loads into it)
    half = ["data.max_train=12", f"output={tmp_path / 'resumed'}"]
    dt.train(load_config(tmp_path / "run.yaml", [*half, "train.steps=2"]))
    resumed = dt.train(load_config(tmp_path / "run.yaml", half), resume=True)
    assert resumed["resumed_from"] == 2
    a = (tmp_path / "run" / "delta.safetensors").read_bytes()
    assert a == (tmp_path / "resumed" / "delta.safetensors").read_bytes(), "resumed bit-identical to straight"


def test_errors_name_the_fix(tmp_path) -> None:
    with pytest.raises(dt.DeltatuneError, match="needs data"):
        dt.attach(tiny_llama(), "spt")
    with pytest.raises(dt.DeltatuneError, match="not both"):
        dt.attach(tiny_llama(), "spt", sensitivity="random", data={"name": "tweets"})
    with pytest.raises(dt.DeltatuneError, match="method data"):
        dt.attach(tiny_llama(), "spt", data={"nmae": "tweets"})
    with pytest.raises(dt.DeltatuneError, match="missing"):
        dt.attach(tiny_llama(), "spt", sensitivity={"model.layers.0.self_attn.q_proj.weight": torch.ones(32, 32)})
    with pytest.raises(dt.DeltatuneError, match="not a file"):
        dt.attach(tiny_llama(), "spt", sensitivity=str(tmp_path / "none.safetensors"))

