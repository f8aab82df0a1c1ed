"""Shared pieces of the prefix family: prefix tuning, P-tuning v2, MAM's attention half, and the
causal path of prompt tuning (not a method: the leading underscore keeps it unregistered).

A prefix is, per attention layer, l key vectors P_k and l value vectors P_v (per key/value head)
put in front of the layer's own keys and values, visible to every query (He et al. 2022, §2:
prefix tuning is a gated parallel adapter on the attention heads). They are added inside the
attention function through ``set_kv_hook`` (``core/forms/attention.py``), after RoPE and after the
KV cache update, so a prefix never takes a position and never enters the cache: generation with
the cache sees exactly the keys a full recomputation sees.

Li & Liang (2021) train P_k, P_v through a reparametrisation, an embedding E (l×d) -> Linear(d, mid)
-> tanh -> Linear(mid, 2·L·d_kv), and keep only the resulting P_k, P_v. Here the MLP is a form of
its own (``PrefixEncoder``, run once per forward of the model) next to the per-layer ``PrefixKV``
forms that read their slice of its output. The artifact holds the per-layer P_k, P_v only (the encoder stores nothing): it is folded
when saved, and a loaded artifact builds plain P_k, P_v parameters, no MLP. A resumed run needs the
MLP itself: the native loop's checkpoints hold every delta parameter (``tuned.deltas.state_dict()``),
and ``ReparamPolicy`` also carries the MLP in the policy state, the one channel the
``transformers.Trainer`` bridge checkpoints besides the artifact.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from deltatune.core.forms.attention import (
    attention_modules,
    check_kv_hook_reached,
    clear_kv_hook,
    prepend_keys,
    set_kv_hook,
)
from deltatune.core.forms.base import Form
from deltatune.core.forms.module import ModuleForm
from deltatune.core.policy import Policy
from deltatune.core.registry import Built
from deltatune.core.targeting import resolve_layers, select_modules
from deltatune.errors import DeltatuneError

PREFIX_WHY = ("a prefix adds keys and values inside attention's softmax, an input-dependent gated mix "
              "that no change of the weights reproduces")

# the module names transformers gives a sequence-classification head (BERT-style / decoder models)
HEAD_NAMES = ("classifier", "score")


# ---------------------------------------------------------------- geometry and hooks

def kv_geometry(model: nn.Module) -> tuple[int, int]:
    """(key/value heads, head dim) from the model's config; GQA models have fewer key/value heads
    than query heads, and the prefix lives in the key/value heads (before they are repeated)."""
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    if not heads or not hidden:
        raise DeltatuneError(f"{type(model).__name__}'s config does not give num_attention_heads / hidden_size")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "d_kv", None) or hidden // heads  # d_kv: T5
    return int(kv_heads), int(head_dim)


def hooked_attention(model: nn.Module, layers: list[int] | str | None = None,
                     method: str | None = None) -> list[tuple[str, nn.Module]]:
    """(dotted name, attention module) of every attention module the prefix goes into, block order (an
    encoder-decoder's cross-attention too); ``method`` names the method where the architecture is refused."""
    names = {id(m): n for n, m in model.named_modules()}
    found = attention_modules(model, method)
    chosen = resolve_layers(layers, len(found))
    out = [(names[id(m)], m) for i, m in enumerate(found) if chosen is None or i in chosen]
    if not out:
        raise DeltatuneError(f"layers={layers!r} selects none of the model's {len(found)} attention layers")
    return out


class KVUnhook:
    """A handle for ``ModuleForm.keep``: removing it clears the key/value hook."""

    def __init__(self, model: nn.Module, attention: nn.Module) -> None:
        self.model, self.attention = model, attention

    def remove(self) -> None:
        clear_kv_hook(self.model, self.attention)


def add_prefix(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any,
               pk: torch.Tensor, pv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """``prepend_keys`` with a check that the prefix fits this attention's key/value heads."""
    if pk.shape[-3] != key.shape[1] or pk.shape[-1] != key.shape[-1]:
        raise DeltatuneError(
            f"the prefix has {pk.shape[-3]} key/value heads of size {pk.shape[-1]} but {type(module).__name__} "
            f"computes {key.shape[1]} of size {key.shape[-1]}: the model's config does not describe its attention"
        )
    if pk.dim() == 3:
        pk, pv = pk[None], pv[None]
    return prepend_keys(query, key, value, mask, pk, pv, causal=bool(getattr(module, "is_causal", False)))


class Snapshot:
    """A copy of some tensors to tell whether they changed since. Version counters cannot: a fused
    optimizer step writes parameters without moving them."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.copies = [t.detach().clone() for t in tensors]

    def same(self, tensors: list[torch.Tensor]) -> bool:
        return len(tensors) == len(self.copies) and all(
            t.shape == c.shape and t.device == c.device and t.dtype == c.dtype and torch.equal(t.detach(), c)
            for t, c in zip(tensors, self.copies, strict=True))


# ---------------------------------------------------------------- the forms

class PrefixEncoder(ModuleForm):
    """Li & Liang's reparametrisation of all layers' prefixes: E (l×d) -> Linear(d, mid) -> tanh ->
    Linear(mid, 2·n·d_kv), split into P_k, P_v of the n hooked layers (layer-major, then key/value,
    then head, as PEFT's ``PrefixEncoder``). Training-only: it stores nothing in the artifact.

    E starts N(0, 1) and the Linears with torch's default init, as nn.Embedding / nn.Linear in the
    official code (XiangLi1999/PrefixTuning) and in PEFT. Parameters: l·d + d·mid + mid + mid·2n·d_kv + 2n·d_kv.

    The MLP runs once per forward of the model (a pre-hook on its backbone), and every layer's hook
    reads its slice of that output."""

    kind = "prefix"

    def __init__(self, model: nn.Module, length: int, mid: int, layers: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.length, self.layers, self.kv_heads, self.head_dim = length, layers, kv_heads, head_dim
        d = model.config.hidden_size
        self.embedding = nn.Parameter(torch.randn(length, d))
        self.down = nn.Linear(d, mid)
        self.up = nn.Linear(mid, layers * 2 * kv_heads * head_dim)
        self._backbone = (getattr(model, "base_model", model),)  # a tuple: not a submodule of ours
        self._current: torch.Tensor | None = None  # this forward's output
        # P_k, P_v of artifact tensors loaded into a training delta, by layer, served until the MLP changes
        self._pins: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._pinned_at: Snapshot | None = None

    def why_not_mergeable(self) -> str:
        return PREFIX_WHY

    def install(self) -> None:
        self.keep(self._backbone[0].register_forward_pre_hook(self._start))

    def uninstall(self) -> None:
        self._current = None

    def compute(self) -> torch.Tensor:
        """Every layer's (P_k, P_v): (layers, 2, kv_heads, l, head_dim)."""
        out = self.up(torch.tanh(self.down(self.embedding)))
        return out.view(self.length, self.layers, 2, self.kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)

    def _start(self, module: nn.Module, args: tuple) -> None:
        self._check_pins()
        self._current = self.compute()

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_k, P_v) of the i-th hooked layer, each (kv_heads, l, head_dim), as this forward uses them."""
        if i in self._pins:
            return self._pins[i]
        both = (self._current if self._current is not None else self.compute())[i]
        return both[0], both[1]

    def folded(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(P_k, P_v) of layer i from the MLP as it is now (what the artifact stores)."""
        self._check_pins()
        if i in self._pins:
            return self._pins[i]
        with torch.no_grad():
            both = self.compute()[i]
        return both[0], both[1]

    def pin(self, i: int, pk: torch.Tensor, pv: torch.Tensor) -> None:
        if self._pinned_at is None:
            self._pinned_at = Snapshot(list(self.parameters()))
        self._pins[i] = (pk, pv)

    def _check_pins(self) -> None:
        if self._pinned_at is not None and not self._pinned_at.same(list(self.parameters())):
            self._pins, self._pinned_at = {}, None

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {}  # folded into the PrefixKV forms' P_k, P_v when saved

    def stored_tensors_names(self) -> list[str]:
        return []

    def mlp_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class PrefixKV(ModuleForm):
    """P_k, P_v (each (kv_heads, l, head_dim)) in front of one attention layer's keys and values.

    Direct: its own parameters ``key``, ``value`` (N(0, 1) at the start, the nn.Embedding init of
    P-tuning v2 and PEFT, or ``start``: e.g. ``real_word_kv``). Reparametrised: it reads layer ``index`` of a ``PrefixEncoder`` and owns no
    parameters; ``stored_tensors`` then folds the encoder's output into plain ``key`` / ``value``."""

    kind = "prefix"

    def __init__(self, model: nn.Module, attention: nn.Module, index: int, length: int, kv_heads: int, head_dim: int,
                 encoder: PrefixEncoder | None = None, loading: bool = False,
                 start: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        self._site = (model, attention)  # a tuple: the base modules must not become our submodules
        self.index, self.length = index, length
        self.__dict__["_encoder"] = encoder  # shared by all layers; registered once, as its own form
        if encoder is None:
            shape = (kv_heads, length, head_dim)
            if start is None:
                start = (torch.zeros(shape), torch.zeros(shape)) if loading else (torch.randn(shape), torch.randn(shape))
            self.key = nn.Parameter(start[0].detach().float().clone())
            self.value = nn.Parameter(start[1].detach().float().clone())

    @property
    def encoder(self) -> PrefixEncoder | None:
        return self.__dict__["_encoder"]

    def why_not_mergeable(self) -> str:
        return PREFIX_WHY

    def install(self) -> None:
        model, attention = self._site
        set_kv_hook(model, attention, self._hook)
        self.keep(KVUnhook(model, attention))

    def base_tensors(self) -> dict[str, torch.Tensor]:
        # P_k, P_v live in this layer's key/value space: an artifact belongs to these projections
        return dict(self._site[1].named_parameters())

    def _hook(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any
              ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        pk, pv = (self.key, self.value) if self.encoder is None else self.encoder.layer(self.index)
        return add_prefix(module, query, key, value, mask, pk, pv)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        pk, pv = (self.key, self.value) if self.encoder is None else self.encoder.folded(self.index)
        return {"key": pk.detach(), "value": pv.detach()}

    def stored_tensors_names(self) -> list[str]:
        return ["key", "value"]

    def load_stored(self, tensors: dict[str, torch.Tensor]) -> None:
        """Direct: copy. Reparametrised (an artifact loaded into a run still training, e.g. the Trainer
        bridge's best checkpoint): P_k, P_v cannot be inverted into the MLP, so they are served as given
        until the MLP changes (its state restored by ``ReparamPolicy`` on resume, or a training step)."""
        enc = self.encoder
        if enc is None:
            return super().load_stored(tensors)
        kv_shape = (enc.kv_heads, self.length, enc.head_dim)
        for name in ("key", "value"):
            if tuple(tensors[name].shape) != kv_shape:
                raise DeltatuneError(
                    f"tensor {name!r} has shape {tuple(tensors[name].shape)} in the artifact but the model needs "
                    f"{kv_shape}: the artifact was made with another config or base model"
                )
        ref = enc.embedding
        enc.pin(self.index, tensors["key"].to(ref.device, ref.dtype), tensors["value"].to(ref.device, ref.dtype))


class ReparamPolicy(Policy):
    """The static policy, plus the training-only MLP of a reparametrised prefix in its state: the
    artifact holds the folded P_k, P_v only, and a run resumed through the ``transformers.Trainer``
    bridge (artifact + policy state) gets its MLP back exactly from here."""

    name = "prefix-reparam"

    def __init__(self, encoder: PrefixEncoder) -> None:
        self.encoder = encoder

    def state_dict(self) -> dict[str, Any]:
        return {"encoder": {n: p.detach() for n, p in self.encoder.named_parameters()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("encoder")
        if saved is None:
            raise DeltatuneError("the checkpoint holds no prefix encoder state: it was written by another method config")
        own = dict(self.encoder.named_parameters())
        if set(saved) != set(own):
            raise DeltatuneError(f"the checkpoint's prefix encoder has tensors {sorted(saved)}, this one {sorted(own)}")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(saved[n].to(p.device, p.dtype))


# ---------------------------------------------------------------- builders

ENCODER_NAME = "prefix_encoder"  # the form name of the reparametrisation MLP (training only)


def real_word_kv(model: nn.Module, sites: list[tuple[str, nn.Module]], length: int
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Li & Liang's initialisation "with activations of real words" (their §7.2): per hooked layer, the
    keys and values (kv_heads, l, head_dim) the frozen model computes for l vocabulary tokens sampled
    uniformly, at positions 0..l-1. They have the scale of the model's own keys and values, where
    N(0, 1) vectors may be far off it."""
    table = model.get_input_embeddings().weight
    ids = torch.randint(0, table.shape[0], (1, length)).to(table.device)
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def reader(i: int):
        def hook(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any) -> Any:
            seen[i] = (key[0].float().cpu(), value[0].float().cpu())
            return key, value, mask
        return hook

    for i, (_, attn) in enumerate(sites):
        set_kv_hook(model, attn, reader(i))
    try:
        with torch.no_grad():
            getattr(model, "base_model", model)(input_ids=ids)
    finally:
        for _, attn in sites:
            clear_kv_hook(model, attn)
    return [seen[i] for i in range(len(sites))]


def prefix_forms(model: nn.Module, length: int, reparam: bool, mid_dim: int, *, method: str, loading: bool,
                 layers: list[int] | str | None = None, init: str = "random") -> Built:
    """The prefix of every (or the ``layers``) attention layer: forms named by the attention modules
    (``model.layers.0.self_attn``: tensors ``key``, ``value``), plus ``prefix_encoder`` and a
    ``ReparamPolicy`` when ``reparam`` and training. Loading an artifact builds direct P_k, P_v: the
    MLP was folded away when it was saved. ``init`` (direct P_k, P_v only): "random" N(0, 1) or
    "vocab" (``real_word_kv``). ``method`` names the method in the refusal of a model whose attention
    never calls the key/value hook."""
    if length < 1:
        raise DeltatuneError(f"prefix length={length} must be at least 1")
    if reparam and mid_dim < 1:
        raise DeltatuneError(f"mid_dim={mid_dim} must be at least 1")
    if init not in ("random", "vocab"):
        raise DeltatuneError(f"prefix init={init!r}: use 'random' (N(0, 1)) or 'vocab' (keys/values of real tokens)")
    sites = hooked_attention(model, layers, method)
    kv_heads, head_dim = kv_geometry(model)
    check_kv_hook_reached(model, [attn for _, attn in sites], method)
    encoder = None
    if reparam and not loading:
        encoder = PrefixEncoder(model, length, mid_dim, len(sites), kv_heads, head_dim)
    starts: list[Any] = [None] * len(sites)
    if init == "vocab" and encoder is None and not loading:
        starts = real_word_kv(model, sites, length)
    forms: dict[str, Form] = {
        name: PrefixKV(model, attn, i, length, kv_heads, head_dim, encoder, loading, starts[i])
        for i, (name, attn) in enumerate(sites)
    }
    if encoder is None:
        return Built(forms)
    forms[ENCODER_NAME] = encoder
    return Built(forms, ReparamPolicy(encoder))


def stored_count(built_or_forms: Built | dict[str, Form]) -> int:
    """Values the artifact holds (2·n·l·d_kv for a prefix; the reparametrisation MLP excluded)."""
    forms = built_or_forms.forms if isinstance(built_or_forms, Built) else built_or_forms
    return sum(t.numel() for f in forms.values() for t in f.stored_tensors().values())


def head_parameters(model: nn.Module, modules: list[str] | None = None) -> list[tuple[str, nn.Parameter]]:
    """The parameters of ``modules`` (name patterns), or with None of the model's classification head
    (a top-level ``classifier`` / ``score`` module, as transformers names them); [] when there is none."""
    if modules is not None:
        chosen = select_modules(model, modules) if modules else []
    else:
        chosen = [(n, m) for n, m in model.named_children() if n in HEAD_NAMES]
    return [(f"{n}.{pn}", p) for n, m in chosen for pn, p in m.named_parameters()]
