"""Bottleneck adapters (adapter, parallel_adapter, scaled_parallel_adapter) against the invariants of the
unified view (He et al., ICLR 2022) and the life of a delta."""

from __future__ import annotations

import pytest
import torch
from conftest import MODELS, batch, loss_of, output_of, tiny_bert, tiny_gpt2, tiny_llama

import deltatune as dt
from deltatune.core.forms.module import sublayer_input, sublayers
from deltatune.methods._adapters import Adapter

METHODS = ["adapter", "parallel_adapter", "scaled_parallel_adapter"]
D, R = 32, 4  # the tiny models' width; a small bottleneck


def train(tuned: dt.Tuned, x: dict, steps: int = 3, lr: float = 0.5) -> None:
    opt = torch.optim.SGD(tuned.trainable_parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_of(tuned, x).backward()
        opt.step()


def randomise(tuned: dt.Tuned) -> None:
    """Non-zero adapters (W_up starts at zero) without training, for checks that need f != 0."""
    with torch.no_grad():
        for form in tuned.forms().values():
            if isinstance(form, Adapter):
                for p in form.bottleneck.parameters():
                    if p.dim():
                        p.normal_(std=0.3)


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("method", METHODS)
def test_starts_at_base_then_trains_and_detaches_exactly(method: str, arch: str) -> None:
    model = MODELS[arch]()
    x = batch()
    base = output_of(model, x)
    tuned = dt.attach(model, method, r=R)
    tuned.train()
    assert torch.equal(output_of(tuned, x), base), "zero-initialised W_up: f == 0"
    train(tuned, x)
    assert not torch.allclose(output_of(tuned, x), base)
    assert tuned.detach() is model and torch.equal(output_of(model, x), base)


def test_pfeiffer_has_half_of_houlsby_sites_and_counts_follow_the_formula() -> None:
    per_site = 2 * D * R + R + D
    houlsby = dt.attach(tiny_llama(), "adapter", r=R)
    pfeiffer = dt.attach(tiny_llama(), "adapter", r=R, placement="pfeiffer")
    assert len(houlsby.forms()) == 2 * len(pfeiffer.forms()) == 2 * 3
    assert all(".mlp." in n for n in pfeiffer.forms())
    assert houlsby.num_trainable() == 6 * per_site and pfeiffer.num_trainable() == 3 * per_site
    both = dt.attach(tiny_gpt2(), "parallel_adapter", r=R, sublayers=["attention", "ffn"], layers=[0, 2])
    assert both.num_trainable() == 4 * per_site
    learn = dt.attach(tiny_bert(), "scaled_parallel_adapter", r=R, learnable_scale=True, layers="1:")
    assert learn.num_trainable() == 2 * (per_site + 1)
    head = dt.attach(tiny_bert(), "adapter", r=R, layers=[0], modules_to_save=["classifier"])
    assert head.num_trainable() == 2 * per_site + (D * 3 + 3)


def test_form_names_and_sites() -> None:
    names = list(dt.attach(tiny_bert(), "adapter", r=R, layers=[1]).forms())
    assert names == ["bert.encoder.layer.1.attention.output.dense.adapter", "bert.encoder.layer.1.output.dense.adapter"]
    names = list(dt.attach(tiny_llama(), "scaled_parallel_adapter", r=R, layers=[-1]).forms())
    assert names == ["model.layers.2.mlp.adapter"]


@pytest.mark.parametrize("arch", list(MODELS))
def test_parallel_adapter_reads_the_ffn_input(arch: str) -> None:
    """Spec test 4: the bottleneck receives exactly the tensor the FFN module is called with."""
    model = MODELS[arch]()
    tuned = dt.attach(model, "parallel_adapter", r=R, layers=[1])
    randomise(tuned)
    (form,) = tuned.forms().values()
    ffn = sublayers(model, "ffn", {1})[0]
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        ffn.reads.register_forward_pre_hook(lambda m, a, k: seen.update(ffn_in=sublayer_input(a, k)), with_kwargs=True),
        ffn.writes.register_forward_hook(lambda m, a, out: seen.update(ffn_out=out)),
        form.bottleneck.register_forward_pre_hook(lambda m, a: seen.update(adapter_in=a[0])),
    ]
    output_of(tuned, batch())
    for h in hooks:
        h.remove()
    assert torch.equal(seen["adapter_in"], seen["ffn_in"])
    assert not torch.allclose(seen["adapter_in"], seen["ffn_out"])
    # the sequential adapter, by contrast, reads the FFN output (before its own addition)
    seq = dt.attach(MODELS[arch](), "adapter", r=R, layers=[1], placement="pfeiffer")
    (sform,) = seq.forms().values()
    ffn = sublayers(seq.model, "ffn", {1})[0]
    h1 = sform.bottleneck.register_forward_pre_hook(lambda m, a: seen.update(adapter_in=a[0]))
    h2 = ffn.reads.register_forward_pre_hook(lambda m, a, k: seen.update(ffn_in=sublayer_input(a, k)), with_kwargs=True)
    output_of(seq, batch())
    h1.remove()
    h2.remove()
    assert seen["adapter_in"].shape == seen["ffn_in"].shape and not torch.equal(seen["adapter_in"], seen["ffn_in"])


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_scaled_pa_is_linear_in_s(arch: str) -> None:
    """Spec test 5: s = 0 is the base model; Δh at the sublayer doubles when s doubles."""
    model = MODELS[arch]()
    x = batch()
    base = output_of(model, x)
    tuned = dt.attach(model, "scaled_parallel_adapter", r=R, layers=[0])
    randomise(tuned)
    (form,) = tuned.forms().values()
    assert form.bottleneck.scale.item() == 4.0
    site = sublayers(model, "ffn", {0})[0]
    outs: list[torch.Tensor] = []
    hook = site.writes.register_forward_hook(lambda m, a, out: outs.append(out[0] if isinstance(out, tuple) else out))
    for s in (0.0, 1.5, 3.0):
        form.bottleneck.scale.fill_(s)
        logits = output_of(tuned, x)
        if s == 0.0:
            assert torch.equal(logits, base)
    hook.remove()
    h0, h1, h2 = outs
    d1, d2 = h1 - h0, h2 - h0
    assert d1.abs().max() > 1e-3
    assert torch.allclose(d2, 2 * d1, atol=1e-5, rtol=1e-5)


def test_learnable_scale_trains() -> None:
    tuned = dt.attach(tiny_llama(), "scaled_parallel_adapter", r=R, learnable_scale=True, scale=2.0)
    form = next(iter(tuned.forms().values()))
    assert isinstance(form.bottleneck.scale, torch.nn.Parameter) and form.bottleneck.scale.item() == 2.0
    train(tuned, batch(), steps=3, lr=0.5)
    assert form.bottleneck.scale.item() != 2.0
    assert "bottleneck.scale" in form.stored_tensors()
    fixed = next(iter(dt.attach(tiny_llama(), "scaled_parallel_adapter", r=R).forms().values()))
    assert "bottleneck.scale" not in fixed.stored_tensors()  # a fixed s comes from the config


@pytest.mark.parametrize(("method", "arch", "options"), [
    ("adapter", "llama", {}),
    ("adapter", "bert", {"placement": "pfeiffer", "modules_to_save": ["classifier"]}),
    ("parallel_adapter", "gpt2", {"sublayers": ["attention", "ffn"]}),
    ("scaled_parallel_adapter", "bert", {"learnable_scale": True}),
])
def test_save_and_load_reproduce_outputs(method: str, arch: str, options: dict, tmp_path) -> None:
    x = batch()
    tuned = dt.attach(MODELS[arch](), method, r=R, **options)
    train(tuned, x)
    want = output_of(tuned, x)
    tuned.save(tmp_path / "a")
    loaded = dt.load(MODELS[arch](), tmp_path / "a")
    assert torch.equal(output_of(loaded, x), want)
    assert loaded.num_trainable() == tuned.num_trainable()


@pytest.mark.parametrize(("method", "arch", "options"), [
    ("adapter", "llama", {}),
    ("adapter", "llama", {"activation": "linear"}),  # linear, but o_proj / down_proj have no bias
    ("parallel_adapter", "gpt2", {"activation": "linear"}),
    ("scaled_parallel_adapter", "bert", {}),
])
def test_merge_raises_where_it_cannot_be_exact(method: str, arch: str, options: dict) -> None:
    model = MODELS[arch]()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = dt.attach(model, method, r=R, **options)
    with pytest.raises(dt.DeltatuneError, match="cannot be merged"):
        tuned.merge()
    form = next(iter(tuned.forms().values()))
    with pytest.raises(dt.DeltatuneError, match="cannot be merged"):
        form.merge()
    assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_linear_sequential_adapter_merges_and_unmerges_exactly(arch: str) -> None:
    model = MODELS[arch]()
    x = batch()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = dt.attach(model, "adapter", r=R, activation="linear",
                      **({"modules_to_save": ["classifier"]} if arch == "bert" else {}))
    assert all(f.mergeable for f in tuned.forms().values())
    train(tuned, x, lr=0.2)
    want = output_of(tuned, x)
    plain = tuned.merge()
    assert type(plain) is type(model) and not any(f.attached for f in tuned.forms().values())
    assert torch.allclose(output_of(plain, x), want, atol=1e-5, rtol=0)
    changed = [k for k, v in plain.state_dict().items() if not torch.equal(v, w0[k])]
    assert changed and all(k.endswith(("c_proj.weight", "c_proj.bias", "dense.weight", "dense.bias", "classifier.weight",
                                       "classifier.bias")) for k in changed), changed
    tuned.unmerge()
    assert torch.equal(output_of(tuned, x), want)
    tuned.detach()
    restored = model.state_dict()
    # the adapters put back their saved W0, b0 bit for bit; the classifier's dense delta subtracts (1e-6)
    assert all(torch.equal(v, w0[k]) for k, v in restored.items() if not k.startswith("classifier."))
    assert all(torch.allclose(restored[k], w0[k], atol=1e-6, rtol=0) for k in w0)


def test_bad_options_name_the_problem() -> None:
    with pytest.raises(dt.DeltatuneError, match="placement"):
        dt.attach(tiny_llama(), "adapter", placement="middle")
    with pytest.raises(dt.DeltatuneError, match="sublayers"):
        dt.attach(tiny_llama(), "parallel_adapter", sublayers=["ffn", "embedding"])
    with pytest.raises(dt.DeltatuneError, match="activation"):
        dt.attach(tiny_llama(), "adapter", activation="swish")
    with pytest.raises(dt.DeltatuneError, match="r=0"):
        dt.attach(tiny_llama(), "scaled_parallel_adapter", r=0)
    with pytest.raises(dt.DeltatuneError, match="blocks the model does not have"):
        dt.attach(tiny_llama(), "adapter", layers=[3])
