"""MAM adapter: prefix on attention + scaled parallel adapter on the FFN."""

from __future__ import annotations

import pytest
import torch
from conftest import MODELS, batch, loss_of, output_of, tiny_llama

import deltatune as dt
from deltatune.errors import DeltatuneError


def _attach(arch: str, method: str, **options):
    model = MODELS[arch]()
    torch.manual_seed(7)  # the prefix draws its init first in both methods
    return dt.attach(model, method, **options)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_fresh_mam_is_its_prefix_alone_and_counts_its_parameters(arch: str) -> None:
    """The FFN adapters start at zero (LoRA init), so a fresh MAM computes exactly its prefix's outputs;
    its trainable count is the prefix's (MLP included) + L·(2·d·r + r + d)."""
    x = batch()
    mam = _attach(arch, "mam", prefix_length=4, mid_dim=16, r=8)
    prefix = _attach(arch, "prefix", length=4, mid_dim=16)
    assert torch.equal(output_of(mam, x), output_of(prefix, x))
    d, n_layers = mam.config.hidden_size, len(prefix.forms()) - 1  # minus the reparametrisation MLP
    assert mam.num_trainable() == prefix.num_trainable() + n_layers * (2 * d * 8 + 8 + d)
    # the adapters read the FFN input, scaled by s = 4
    adapters = [f for n, f in mam.forms().items() if n.endswith(".adapter")]
    assert len(adapters) == n_layers and all(float(a.bottleneck.scale) == 4.0 for a in adapters)


def test_mam_trains_saves_folded_and_generates_with_the_cache(tmp_path) -> None:
    x = batch()
    tuned = _attach("llama", "mam", prefix_length=3, mid_dim=16, r=4)
    opt = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss_of(tuned, x).backward()
        opt.step()
    tuned.eval()
    trained = output_of(tuned, x)
    tuned.save(tmp_path / "mam")
    loaded = dt.load(tiny_llama(), tmp_path / "mam")
    assert torch.equal(output_of(loaded, x), trained)
    assert not any("encoder" in n for n in loaded.forms()), "the reparametrisation MLP is folded away"
    with pytest.raises(DeltatuneError, match="cannot be merged"):
        loaded.merge()
    prompt = x["input_ids"][:1, :4]
    cached = loaded.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
    full = loaded.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, full)


def test_mam_refuses_bad_sizes() -> None:
    with pytest.raises(DeltatuneError, match="prefix_length"):
        _attach("llama", "mam", prefix_length=0)
    with pytest.raises(DeltatuneError, match="r=0"):
        _attach("llama", "mam", r=0)
