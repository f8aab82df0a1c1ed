"""A hook on the keys and values of attention, for forms that add to them (prefixes) or read them.

transformers 5 computes attention through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
(its public extension point, ``AttentionInterface.register``), called with the attention module,
the post-RoPE queries/keys/values of shape (batch, heads, length, head_dim) and the mask. We register
``deltatune_sdpa`` / ``deltatune_eager``: they look up a hook on the attention module, let it
change (key, value, mask), and run the original implementation. While any hook is set on a model
its config points at our name; when the last one is removed it points back, so a model without an
activation-side form runs exactly the code it ran before.

Because the hook runs after the KV cache update, added keys (a prefix) are never written into the
cache and never take a position: generation with a cache and a full recomputation see the same
keys, and position ids stay those of the real tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from deltatune.core import architectures
from deltatune.errors import DeltatuneError

# (module, query, key, value, mask) -> (key, value, mask)
KVHook = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, torch.Tensor, Any]]

_HOOK = "_deltatune_kv_hook"
_ORIGINAL = "_deltatune_attn_implementation"
_COUNT = "_deltatune_kv_hooks"
_PREFIX = "deltatune_"
SUPPORTED = ("sdpa", "eager")


def _eager_of(module: nn.Module) -> Callable:
    """The eager attention of the module's own modeling file (each model family defines its own)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    return fn


def _wrapped(base: str) -> Callable:
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Any, **kwargs: Any) -> Any:
        hook = module.__dict__.get(_HOOK)
        if hook is not None:
            key, value, attention_mask = hook(module, query, key, value, attention_mask)
            bias = kwargs.get("position_bias")  # T5: a relative bias added to the scores, one column per key
            if isinstance(bias, torch.Tensor) and bias.shape[-1] < key.shape[-2]:
                kwargs["position_bias"] = torch.nn.functional.pad(bias, (key.shape[-2] - bias.shape[-1], 0))
        if base == "sdpa":
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return _eager_of(module)(module, query, key, value, attention_mask, **kwargs)

    return attention


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for base in SUPPORTED:
        name = _PREFIX + base
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _wrapped(base))
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])


def _config_of(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "_attn_implementation"):
        raise DeltatuneError(
            f"{type(model).__name__} is not a transformers model: prefix / query-token methods hook the attention of "
            "transformers models (Llama, GPT-2, BERT families)"
        )
    return cfg


def _configs(model: nn.Module) -> list[Any]:
    """Every distinct config the model's modules read ``_attn_implementation`` from: the model's own and any
    copy a submodule keeps (T5's encoder and decoder stacks each hold a copy of the model's config)."""
    found = {id(_config_of(model)): _config_of(model)}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            found.setdefault(id(cfg), cfg)
    return list(found.values())


def set_kv_hook(model: nn.Module, attention: nn.Module, hook: KVHook) -> None:
    """Route ``attention``'s keys and values through ``hook``; the model switches to our attention."""
    configs = _configs(model)
    if _HOOK in attention.__dict__:
        raise DeltatuneError(f"{type(attention).__name__} already has a key/value hook: two prefix deltas on one model")
    count = model.__dict__.get(_COUNT, 0)
    if count == 0:
        originals = [cfg._attn_implementation or "sdpa" for cfg in configs]
        bad = [c for c in originals if c not in SUPPORTED]
        if bad:
            raise DeltatuneError(
                f"the model runs attention_implementation={bad[0]!r}; prefix and query-token methods support "
                f"{' and '.join(SUPPORTED)}: load the model with attn_implementation='sdpa'"
            )
        _register()
        model.__dict__[_ORIGINAL] = list(zip(configs, originals, strict=True))
        for cfg, current in zip(configs, originals, strict=True):
            cfg._attn_implementation = _PREFIX + current
    model.__dict__[_COUNT] = count + 1
    attention.__dict__[_HOOK] = hook


def clear_kv_hook(model: nn.Module, attention: nn.Module) -> None:
    if attention.__dict__.pop(_HOOK, None) is None:
        return
    count = model.__dict__.get(_COUNT, 1) - 1
    model.__dict__[_COUNT] = count
    if count == 0:
        for cfg, original in model.__dict__.pop(_ORIGINAL):
            cfg._attn_implementation = original


def attention_modules(model: nn.Module, method: str | None = None) -> list[nn.Module]:
    """The modules that call the attention function, in block order (self- then cross-attention): as the
    architecture table says, else those with a ``layer_idx`` and an ``is_causal`` flag (transformers' attention
    classes; BERT's ``attention.self``). With ``method``, an architecture where the hook cannot work is refused."""
    if method is not None:
        architectures.check_kv_hook(model, method)
    found = architectures.attention_callers(model)
    if found is None:
        found = [m for m in model.modules() if hasattr(m, "is_causal") and hasattr(m, "layer_idx")]
    if not found:
        raise DeltatuneError(
            f"{type(model).__name__} has no transformers attention modules to hook (supported: {architectures.supported()})"
        )
    return found


def prepend_keys(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, prefix_key: torch.Tensor,
                 prefix_value: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Keys/values with ``prefix_*`` (batch or 1, kv_heads, l, head_dim) in front, visible to every
    query; the mask grows by l always-visible columns (bool True / additive 0). A causal attention
    that had no mask (sdpa's is_causal fast path) gets its causal mask spelled out, since the
    implicit one would be aligned to the wrong corner once keys outnumber queries."""
    b, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
    pk = prefix_key.to(key.dtype).expand(b, -1, -1, -1)
    pv = prefix_value.to(value.dtype).expand(b, -1, -1, -1)
    n = pk.shape[2]
    if mask is None and causal and q_len > 1:
        # query i sits at key position k_len - q_len + i (the cached keys come first)
        rows = torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)
        mask = (torch.arange(k_len, device=query.device)[None, :] <= rows)[None, None].expand(b, 1, q_len, k_len)
    if mask is not None:
        shape = (*mask.shape[:-1], n)
        visible = torch.ones(shape, dtype=torch.bool, device=mask.device) if mask.dtype == torch.bool \
            else torch.zeros(shape, dtype=mask.dtype, device=mask.device)
        mask = torch.cat([visible, mask], dim=-1)
    return torch.cat([pk, key], dim=2), torch.cat([pv, value], dim=2), mask


def check_kv_hook_reached(model: nn.Module, attentions: list[nn.Module], method: str) -> None:
    """Refuse ``method`` unless a forward of ``model`` calls the key/value hook of every module in
    ``attentions``, after the architecture table's own refusal (``architectures.check_kv_hook``). Some models
    (Falcon) compute attention themselves instead of through
    ``ALL_ATTENTION_FUNCTIONS``: a hook set there is never called, so a prefix would silently train
    nothing. One forward of two tokens, without gradients, cache or dropout, answers it; the model's
    modes and the RNG are left as they were. A module that already has a hook (another delta's) was
    checked when that delta was attached."""
    architectures.check_kv_hook(model, method)
    pending = [m for m in attentions if _HOOK not in m.__dict__]
    if not pending:
        return
    reached: set[int] = set()

    def count(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any) -> Any:
        reached.add(id(module))
        return key, value, mask

    for attention in pending:
        set_kv_hook(model, attention, count)
    try:
        _probe_forward(model)
    finally:
        for attention in pending:
            clear_kv_hook(model, attention)
    if any(id(m) not in reached for m in pending):
        raise DeltatuneError(
            f"{method} needs the attention's key/value hook, which {type(model).__name__} does not call "
            "(it runs its own attention): use a weight-side method such as lora"
        )


def _probe_forward(model: nn.Module) -> None:
    """Run ``model`` once on its smallest input (``architectures.probe_inputs``), changing none of its state: eval mode (no dropout) restored
    after, no KV cache, the RNG of its device forked."""
    ref = next(model.parameters())
    inputs = architectures.probe_inputs(model, ref.device)
    modes = [(m, m.training) for m in model.modules()]
    devices = [ref.device] if ref.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            getattr(model, "base_model", model)(**inputs)  # the backbone: a head adds nothing to learn here
    finally:
        for m, training in modes:
            m.training = training
