"""The core of activation-side forms: the attention key/value hook, sublayer sites, the bottleneck."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import MODELS, tiny_gpt2, tiny_llama
from transformers import DynamicCache

from deltatune.core.forms.attention import attention_modules, clear_kv_hook, prepend_keys, set_kv_hook
from deltatune.core.forms.module import Bottleneck, ModuleForm, add_to_output, blocks, sublayers
from deltatune.errors import DeltatuneError


def _kv_shape(model: nn.Module) -> tuple[int, int]:
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return heads, cfg.hidden_size // cfg.num_attention_heads


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_prefix_through_the_hook_equals_a_prefilled_cache(make, impl: str) -> None:
    """Keys/values prepended inside attention = the same keys/values placed in the KV cache first,
    with the real tokens keeping their own positions (a left-padded row included)."""
    model = make()
    model.config._attn_implementation = impl
    heads, dim = _kv_shape(model)
    g = torch.Generator().manual_seed(0)
    prefixes = [(torch.randn(1, heads, 3, dim, generator=g), torch.randn(1, heads, 3, dim, generator=g))
                for _ in attention_modules(model)]
    ids = torch.randint(0, 128, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)

    for attn, (pk, pv) in zip(attention_modules(model), prefixes, strict=True):
        set_kv_hook(model, attn, lambda m, q, k, v, am, pk=pk, pv=pv: prepend_keys(q, k, v, am, pk, pv, m.is_causal))
    assert model.config._attn_implementation == f"deltatune_{impl}"
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    for attn in attention_modules(model):
        clear_kv_hook(model, attn)
    assert model.config._attn_implementation == impl, "the last hook removed restores the implementation"

    cache = DynamicCache(config=model.config)
    for i, (pk, pv) in enumerate(prefixes):
        cache.update(pk.expand(2, -1, -1, -1).clone(), pv.expand(2, -1, -1, -1).clone(), i)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=torch.cat([torch.ones(2, 3, dtype=torch.long), mask], 1),
                    position_ids=pos, past_key_values=cache).logits
    assert torch.equal(ours[0], ref[0])
    assert torch.equal(ours[1, 2:], ref[1, 2:])  # padded query rows are don't-care


def test_kv_hook_refuses_unsupported_attention_and_a_second_hook() -> None:
    model = tiny_llama()
    attn = attention_modules(model)[0]
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(DeltatuneError, match="attn_implementation='sdpa'"):
        set_kv_hook(model, attn, lambda m, q, k, v, am: (k, v, am))
    model.config._attn_implementation = "sdpa"
    set_kv_hook(model, attn, lambda m, q, k, v, am: (k, v, am))
    with pytest.raises(DeltatuneError, match="already has a key/value hook"):
        set_kv_hook(model, attn, lambda m, q, k, v, am: (k, v, am))
    clear_kv_hook(model, attn)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_sublayer_sites_read_the_input_and_write_the_output(arch: str) -> None:
    """Parallel insertion sees the sublayer input (the FFN's input after the pre-LN / the attention
    output LN); sequential insertion sees the output; adding zero changes nothing."""
    model = MODELS[arch]()
    x = {"input_ids": torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(1))}
    with torch.no_grad():
        before = model(**x).logits
    site = sublayers(model, "ffn")[1]
    assert len(sublayers(model, "attention")) == len(blocks(model)) == 3
    expected: list[torch.Tensor] = []
    reads = site.reads.register_forward_pre_hook(lambda m, a, kw: expected.append(a[0] if a else kw["hidden_states"]),
                                                 with_kwargs=True)
    seen: dict[str, torch.Tensor] = {}

    class Probe(ModuleForm):
        def install(self) -> None:
            add_to_output(self, site, lambda z: seen.setdefault("input", z) * 0, "input")
            add_to_output(self, site, lambda h: seen.setdefault("output", h) * 0, "output")

    probe = Probe()
    probe.attach()
    with torch.no_grad():
        after = model(**x).logits
    assert torch.equal(after, before)
    assert torch.equal(seen["input"], expected[-1])
    assert seen["output"].shape[-1] == model.config.hidden_size
    probe.detach()
    reads.remove()
    assert not site.writes._forward_hooks and not site.reads._forward_pre_hooks


def test_blocks_error_names_the_problem() -> None:
    with pytest.raises(DeltatuneError, match="no list of transformer blocks"):
        blocks(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("init", ["lora", "bert"])
def test_bottleneck_starts_at_zero_and_counts_its_parameters(init: str) -> None:
    b = Bottleneck(16, 4, "relu", scale=4.0, init=init)
    assert torch.equal(b(torch.randn(3, 16)), torch.zeros(3, 16))
    assert sum(p.numel() for p in b.parameters()) == 2 * 16 * 4 + 4 + 16
    assert sum(p.numel() for p in Bottleneck(16, 4, learnable_scale=True).parameters()) == 2 * 16 * 4 + 4 + 16 + 1
    with pytest.raises(DeltatuneError, match="unknown activation"):
        Bottleneck(16, 4, "swishy")
