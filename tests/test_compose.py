"""dt.compose / revert: θ0 + φ1 + φ2 from separately trained deltas, exact revert, merge, base checks."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from conftest import batch, output_of, random_lora, tiny_gpt2, tiny_llama

import deltatune as dt
from deltatune.core.forms.base import Form
from deltatune.ops.compose import SummedSparse, save_composed, save_reverted

Q0 = "model.layers.0.self_attn.q_proj.weight"
EMBED = "model.embed_tokens.weight"
NORM = "model.layers.1.input_layernorm.weight"


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _sparse_delta(make, path, entries: dict[str, tuple[range, int]]) -> dict[str, torch.Tensor]:
    """Save an lt-sft artifact whose delta has random values at the given flat positions; return it densely."""
    tuned = dt.attach(make(), "lt-sft")
    dense = {}
    forms = tuned.forms()
    with torch.no_grad():
        for name, (positions, seed) in entries.items():
            g = torch.Generator().manual_seed(seed)
            idx = torch.tensor(list(positions))
            forms[name].delta.view(-1)[idx] = torch.randn(idx.numel(), generator=g) * 0.5
            dense[name] = forms[name].delta.detach().clone()
    tuned.save(path)
    return dense


def _with_weights(make, *deltas: dict[str, torch.Tensor]) -> nn.Module:
    """The reference: a plain model whose weights are W0 + every dense delta."""
    model = make()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for delta in deltas:
            for name, d in delta.items():
                params[name].add_(d)
    return model


@pytest.fixture
def two(tmp_path):
    a = _sparse_delta(tiny_llama, tmp_path / "a", {Q0: (range(0, 20), 1), EMBED: (range(100, 140), 2)})
    b = _sparse_delta(tiny_llama, tmp_path / "b", {Q0: (range(10, 30), 3), NORM: (range(0, 8), 4)})
    return tmp_path / "a", tmp_path / "b", a, b


def test_apply_two_then_revert_twice_restores_the_base_exactly(two) -> None:
    path_a, path_b, a, b = two
    x = batch()
    model = tiny_llama()
    w0, before = _state(model), output_of(model, x)
    both = dt.compose(model, [path_a, path_b])
    assert both.parts == ["a", "b"]
    assert torch.allclose(output_of(both, x), output_of(_with_weights(tiny_llama, a, b), x), atol=1e-5, rtol=0)
    assert not torch.allclose(output_of(both, x), before)

    both.revert(0)
    assert both.parts == ["b"]
    assert torch.equal(output_of(both, x), output_of(dt.compose(tiny_llama(), [path_b]), x)), \
        "reverting gives exactly the composition of the remaining parts"
    dt.revert(both, "b")
    assert torch.equal(output_of(both, x), before)
    after = model.state_dict()
    assert after.keys() == w0.keys() and all(torch.equal(after[k], w0[k]) for k in w0), "θ0 bit for bit"


def test_sparse_parts_of_one_weight_become_one_form_with_the_union_and_sum(two) -> None:
    path_a, path_b, a, b = two
    both = dt.compose(tiny_llama(), [path_a, path_b])
    q = [f for f in both.applied_forms() if isinstance(f, SummedSparse) and f.param_name == Q0]
    assert len(q) == 1, "one sparse form per weight (a second forward replacement would be refused)"
    assert q[0].indices.tolist() == list(range(30))
    flat = (a[Q0] + b[Q0]).reshape(-1)
    assert torch.equal(q[0].values.detach(), flat[:30]), "overlapping entries add"
    assert {f.param_name for f in both.applied_forms()} == {Q0, EMBED, NORM}
    both.revert("a")
    q = [f for f in both.applied_forms() if f.param_name == Q0]
    assert q[0].indices.tolist() == list(range(10, 30)) and torch.equal(q[0].values.detach(), b[Q0].reshape(-1)[10:30])


def test_merge_folds_the_sum_and_unmerge_restores_bitwise(two) -> None:
    path_a, path_b, a, b = two
    x = batch()
    model = tiny_llama()
    w0 = _state(model)
    both = dt.compose(model, [path_a, path_b])
    composed = output_of(both, x)
    plain = both.merge()
    assert plain is model and not any("parametrizations" in k for k in plain.state_dict())
    reference = _with_weights(tiny_llama, a, b).state_dict()
    assert all(torch.allclose(plain.state_dict()[k], reference[k], atol=1e-6, rtol=1e-5) for k in reference)
    assert torch.allclose(output_of(plain, x), composed, atol=1e-5, rtol=0)
    with pytest.raises(dt.DeltatuneError, match="unmerge"):
        both.revert(0)
    both.unmerge()
    assert torch.equal(output_of(both, x), composed)
    both.revert(0)
    both.revert(0)
    assert all(torch.equal(model.state_dict()[k], w0[k]) for k in w0), "merge + unmerge left θ0 bit for bit"


def test_a_delta_of_another_base_is_refused(two) -> None:
    path_a, _, _, _ = two
    with pytest.raises(dt.DeltatuneError, match="another base model"):
        dt.compose(tiny_llama(seed=1), [path_a])


def test_lora_full_and_sparse_on_one_weight_compose_and_revert(tmp_path) -> None:
    x = batch()
    sparse = _sparse_delta(tiny_llama, tmp_path / "sft", {Q0: (range(0, 50), 5)})
    full = dt.attach(tiny_llama(), "full", targets=[Q0])
    full.forms()[Q0].snapshot()  # what the first forward with gradients does: W0 is kept, then W trains in place
    with torch.no_grad():
        full.forms()[Q0].weight.add_(torch.randn_like(full.forms()[Q0].weight) * 0.1)
    full.save(tmp_path / "full")
    lora = dt.attach(tiny_llama(), "lora", r=2, alpha=4, init=False)  # a Tuned, passed as it is
    lora_dense = {f"{n}": f.delta_weight().detach().clone() for n, f in lora.forms().items()}

    model = tiny_llama()
    w0 = _state(model)
    mixed = dt.compose(model, [lora, tmp_path / "sft", tmp_path / "full"])
    assert mixed.parts == ["lora", "sft", "full"]
    q = [f for f in mixed.applied_forms() if isinstance(f, SummedSparse)]
    assert len(q) == 1 and not q[0]._functional(), "beside a dense delta of the same weight, a parametrisation"
    reference = _with_weights(tiny_llama, lora_dense, sparse, {Q0: full.forms()[Q0].delta_weight().detach()})
    composed = output_of(mixed, x)
    assert torch.allclose(composed, output_of(reference, x), atol=1e-5, rtol=0)

    plain = mixed.merge()
    ref_w = reference.state_dict()
    assert all(torch.allclose(plain.state_dict()[k], ref_w[k], atol=1e-6, rtol=1e-5) for k in ref_w)
    mixed.unmerge()
    assert torch.equal(output_of(mixed, x), composed)

    dt.revert(mixed, "lora")
    assert torch.equal(output_of(mixed, x), output_of(dt.compose(tiny_llama(), [tmp_path / "sft", tmp_path / "full"]), x))
    mixed.revert("full")
    assert torch.equal(output_of(mixed, x), output_of(dt.compose(tiny_llama(), [tmp_path / "sft"]), x))
    mixed.revert(-1)
    assert mixed.parts == [] and all(torch.equal(model.state_dict()[k], w0[k]) for k in w0)


def test_gpt2_sparse_weight_and_bias_of_one_conv1d(tmp_path) -> None:
    x = batch()
    w, bias = "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias"
    a = _sparse_delta(tiny_gpt2, tmp_path / "a", {w: (range(0, 40), 1), bias: (range(0, 5), 2)})
    b = _sparse_delta(tiny_gpt2, tmp_path / "b", {w: (range(30, 60), 3)})
    both = dt.compose(tiny_gpt2(), [tmp_path / "a", tmp_path / "b"])
    assert torch.allclose(output_of(both, x), output_of(_with_weights(tiny_gpt2, a, b), x), atol=1e-5, rtol=0)


def test_a_tuned_on_the_same_model_is_taken_off_and_composed_once(two) -> None:
    path_a, _, a, _ = two
    x = batch()
    model = tiny_llama()
    tuned = dt.load(model, path_a)
    once = output_of(tuned, x)
    comp = dt.compose(model, [tuned])
    assert not tuned.attached and torch.equal(output_of(comp, x), once)
    with pytest.warns(UserWarning, match="'compose' delta"):
        other = dt.attach(model, "lora", r=2)  # a new attach takes the composition off first
    assert not comp.attached and other.attached


def test_activation_side_deltas_and_bad_input_are_refused(two) -> None:
    from deltatune.core import registry

    class Gate(Form):
        kind = "activation"
        mergeable = False

        def __init__(self) -> None:
            super().__init__()
            self.g = nn.Parameter(torch.zeros(1))

        def attach(self) -> None:
            self.attached = True

        def detach(self) -> None:
            self.attached = False

    @dataclass
    class GateConfig:
        pass

    @registry.register("_toy_gate", GateConfig, "test-only activation-side delta")
    def build(model, cfg, *, loading=False):
        return registry.Built({"gate": Gate()})

    try:
        gated = dt.attach(tiny_llama(), "_toy_gate")
        with pytest.raises(dt.DeltatuneError, match="changes activations"):
            dt.compose(tiny_llama(), [gated])
    finally:
        registry._REGISTRY.pop("_toy_gate", None)
    path_a = two[0]
    with pytest.raises(dt.DeltatuneError, match="list"):
        dt.compose(tiny_llama(), path_a)
    comp = dt.compose(tiny_llama(), [path_a])
    with pytest.raises(dt.DeltatuneError, match="no composed delta"):
        comp.revert("nope")
    with pytest.raises(dt.DeltatuneError, match="no part 3"):
        comp.revert(3)
    with pytest.raises(dt.DeltatuneError, match="base model"):
        dt.compose(dt.load(tiny_llama(), path_a), [path_a])


def test_save_composed_writes_the_merged_plain_model_and_save_reverted_takes_a_part_out(tmp_path) -> None:
    from transformers import LlamaForCausalLM

    for name, seed in (("a", 1), ("b", 2)):
        random_lora(tiny_llama, seed, targets=["q_proj", "v_proj"]).save(tmp_path / name)
    x = batch()
    out = save_composed([tmp_path / "a", tmp_path / "b"], tmp_path / "plain", base=tiny_llama())
    loaded = LlamaForCausalLM.from_pretrained(out).eval()
    reference = dt.compose(tiny_llama(), [tmp_path / "a", tmp_path / "b"])
    assert torch.allclose(output_of(loaded, x), output_of(reference, x), atol=1e-5, rtol=0)
    with pytest.raises(dt.DeltatuneError, match="in-memory base model"):
        save_reverted(out, "a", tmp_path / "without-a")  # the base was a module, not a name: nothing to rebuild from


def test_a_refused_part_leaves_the_delta_the_model_carries_attached(two) -> None:
    path_a = two[0]
    model = tiny_llama(seed=3)
    tuned = dt.attach(model, "lt-sft")
    with torch.no_grad():
        tuned.forms()[Q0].delta.add_(0.5)
    x = batch()
    before = output_of(tuned, x)
    with pytest.raises(dt.DeltatuneError, match="another base model"):
        dt.compose(model, [path_a])
    assert tuned.attached and torch.equal(output_of(tuned, x), before)


def test_a_composition_taken_off_by_a_refused_load_goes_back_on(two, tmp_path) -> None:
    path_a, path_b = two[0], two[1]
    _sparse_delta(lambda: tiny_llama(seed=5), tmp_path / "other", {Q0: (range(0, 5), 6)})
    model = tiny_llama()
    both = dt.compose(model, [path_a, path_b])
    x = batch()
    before = output_of(both, x)
    with pytest.raises(dt.DeltatuneError, match="another base model"):
        dt.load(model, tmp_path / "other")
    assert both.attached and torch.equal(output_of(both, x), before)
    plain = both.detach()
    both.revert("a")  # while detached: nothing goes back on
    assert not both.attached and torch.equal(output_of(plain, x), output_of(tiny_llama(), x))
    both.reattach()
    assert torch.equal(output_of(both, x), output_of(dt.compose(tiny_llama(), [path_b]), x))
