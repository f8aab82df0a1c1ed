"""Several deltas on one model: tuned.add / use, and per-row selection with adapter_names (each row gets the output
of its own delta alone), for Llama (Linear, Embedding) and GPT-2 (Conv1D); other forms are refused for mixed batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import batch, output_of, random_lora, tiny_gpt2, tiny_llama

import deltatune as dt

Q0 = "model.layers.0.self_attn.q_proj.weight"


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add waits


def _lora(path: Path, make=tiny_llama, seed: int = 1, **opts) -> Path:
    random_lora(make, seed, **opts).save(path)
    return path


def _full(path: Path) -> Path:
    tuned = dt.attach(tiny_llama(), "full", targets=[Q0])
    tuned.forms()[Q0].snapshot()
    with torch.no_grad():
        tuned.forms()[Q0].weight.add_(torch.randn_like(tuned.forms()[Q0].weight) * 0.2)
    tuned.save(path)
    return path


@pytest.mark.parametrize(("make", "targets"), [(tiny_llama, ["q_proj", "v_proj", "embed_tokens"]),
                                               (tiny_gpt2, ["c_attn", "c_fc"])])
def test_each_row_gets_its_own_delta(tmp_path, make, targets) -> None:
    a = _lora(tmp_path / "a", make, seed=1, targets=targets)
    b = _lora(tmp_path / "b", make, seed=2, targets=targets[:1], r=2)
    x = batch(n=5)
    alone = {"default": output_of(dt.load(make(), a), x), "b": output_of(dt.load(make(), b), x),
             "__base__": output_of(make(), x)}
    assert (alone["default"] - alone["b"]).abs().max() > 0.1 and (alone["b"] - alone["__base__"]).abs().max() > 0.1

    tuned = dt.load(make(), a).add("b", b)
    names = ["b", "default", "__base__", None, "b"]
    with torch.no_grad():
        mixed = tuned(**x, adapter_names=names).logits
    for i, name in enumerate(names):
        assert torch.allclose(mixed[i], alone[name or "__base__"][i], atol=1e-6, rtol=1e-5), (i, name)
    assert torch.equal(output_of(tuned, x), alone["default"]), "after the call the delta in use serves again"


def test_use_switches_deltas_and_the_base(tmp_path) -> None:
    a, b, f = _lora(tmp_path / "a", targets=["q_proj"]), _lora(tmp_path / "b", seed=2), _full(tmp_path / "f")
    x = batch()
    model = tiny_llama()
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = dt.load(model, a)
    tuned.add("b", b).add("dense", f)
    assert tuned.tenants.names == ["default", "b", "dense"]
    for name, path in (("b", b), ("dense", f), ("default", a)):
        tuned.use(name)
        assert torch.equal(output_of(tuned, x), output_of(dt.load(tiny_llama(), path), x)), name
    tuned.use(None)
    assert torch.equal(output_of(tuned, x), output_of(tiny_llama(), x))
    assert all(torch.equal(model.state_dict()[k], w0[k]) for k in w0), "the base is untouched"
    with pytest.raises(dt.DeltatuneError, match="no delta is in use"):
        tuned.merge()

    tuned.use("b")  # save, merge and training act on the delta in use
    assert tuned.method.name == "lora" and set(tuned.forms()) == set(dt.load(tiny_llama(), b).forms())
    trainable = {id(p) for p in tuned.trainable_parameters()}
    assert trainable == {id(p) for f in tuned.forms().values() for p in f.parameters()}, "parked deltas do not train"
    tuned.save(tmp_path / "b-again")
    again, before = dt.load(tiny_llama(), tmp_path / "b-again"), dt.load(tiny_llama(), b)
    assert all(torch.equal(t, before.delta_state_dict()[k]) for k, t in again.delta_state_dict().items())
    plain = tuned.merge()
    assert torch.allclose(output_of(plain, x), output_of(before, x), atol=1e-5, rtol=0)
    with pytest.raises(dt.DeltatuneError, match="unmerge"):
        tuned.use("default")
    tuned.unmerge()
    tuned.use("dense")
    with pytest.raises(dt.DeltatuneError, match="the weight itself"):
        tuned(**x, adapter_names=["default", "dense"])
    # (merge + unmerge restored W0 to float tolerance, not bit for bit)
    assert torch.allclose(output_of(tuned, x), output_of(dt.load(tiny_llama(), f), x), atol=1e-6, rtol=1e-5), \
        "a refused call changes nothing"


def test_generate_with_adapter_names(tmp_path) -> None:
    a, b = _lora(tmp_path / "a", seed=1), _lora(tmp_path / "b", seed=2)
    x = batch(n=3, length=5)
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    tuned = dt.load(tiny_llama(), a).add("b", b)
    out = tuned.generate(**x, adapter_names=["b", "__base__", "default"], **kw)
    own = [dt.load(tiny_llama(), b), tiny_llama(), dt.load(tiny_llama(), a)]
    beams = tuned.generate(**x, adapter_names=["b", "__base__", "default"], num_beams=2, **kw)
    for i, m in enumerate(own):
        row = {"input_ids": x["input_ids"][i:i + 1]}
        assert torch.equal(out[i], m.generate(**row, **kw)[0]), i
        # beam search runs each row twice in place: both copies follow the row's name
        assert torch.equal(beams[i], m.generate(**row, num_beams=2, **kw)[0]), i


def test_bad_names_and_other_bases_are_refused(tmp_path) -> None:
    a = _lora(tmp_path / "a")
    tuned = dt.load(tiny_llama(), a)
    with pytest.raises(dt.DeltatuneError, match="already on this model"):
        tuned.add("default", a)
    with pytest.raises(dt.DeltatuneError, match="another base model"):
        tuned.add("other", _lora(tmp_path / "o", lambda: tiny_llama(seed=5)))
    with pytest.raises(dt.DeltatuneError, match="is not on this model"):
        tuned(**batch(), adapter_names=["default", "nope"])
    with pytest.raises(dt.DeltatuneError, match="2 rows but adapter_names has 3"):
        tuned(**batch(), adapter_names=["default", None, None])
    with pytest.raises(dt.DeltatuneError, match="no delta named"):
        tuned.use("nope")
    adapter = dt.attach(tiny_llama(), "adapter")
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.normal_(0, 0.3)
    tuned.add("bottleneck", adapter)  # an activation-side delta: use() serves it, mixed batches cannot
    assert torch.equal(output_of(tuned.use("bottleneck"), batch()), output_of(adapter, batch()))
    with pytest.raises(dt.DeltatuneError, match="activations"):
        tuned(**batch(), adapter_names=["default", "bottleneck"])
    tuned.use("default")
    other = dt.load(tiny_llama(), a)
    tuned.add("same-as-tuned", other)  # a Tuned of the same base is taken as it is
    assert torch.equal(output_of(tuned.use("same-as-tuned"), batch()), output_of(other, batch()))
