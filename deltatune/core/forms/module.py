"""Activation-side forms: small modules that change hidden states, h ← h + s·f(·).

A ``ModuleForm`` owns its parameters (an ``nn.Module``) and reaches the model through forward
hooks it installs in ``install`` and that ``detach`` removes. It never writes a base tensor, and in
general it cannot be merged into weights (a nonlinearity or an attention gate sits in between),
so ``merge`` raises a clear error and serving keeps it attached.

``Sublayer`` and ``sublayers`` say where a block's attention and feed-forward sublayers read their
input and write their output (before the residual add), as the architecture table
(``core/architectures.py``) describes each model; ``add_to_output`` installs h ← h + f(·) there,
reading either the sublayer's output (sequential insertion) or its input (parallel insertion).
``Bottleneck`` is the down-project / nonlinearity / up-project module the adapter family shares.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from deltatune.core import architectures
from deltatune.core.forms.base import Form
from deltatune.errors import DeltatuneError

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "linear": nn.Identity,
}


class ModuleForm(Form):
    """A delta made of its own modules, reaching the model through hooks."""

    kind = "module"
    mergeable = False

    def __init__(self) -> None:
        super().__init__()
        self._handles: list[Any] = []

    def install(self) -> None:
        """Register the hooks that put this delta into the forward pass (via ``self.keep``)."""
        raise NotImplementedError

    def uninstall(self) -> None:
        """Undo what ``install`` did besides hooks (hooks are removed by ``detach``)."""

    def keep(self, handle: Any) -> None:
        self._handles.append(handle)

    def attach(self) -> None:
        if self.attached:
            return
        self.install()
        self.attached = True

    def detach(self) -> None:
        if not self.attached:
            return
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.uninstall()
        self.attached = False


class Bottleneck(nn.Module):
    """f(z) = s · W_up act(W_down z + b_down) + b_up, with W_up and b_up zero at init so f ≡ 0 (the
    adapted model starts exactly at the base model).

    ``init="lora"``: W_down Kaiming-uniform(a=√5) as nn.Linear / LoRA's A (the unified-view repo's
    scaled parallel adapter); ``init="bert"``: W_down ~ N(0, 0.02) (its "bert" init), W_up zero in
    both cases. ``scale`` is fixed unless ``learnable_scale`` (the repo's ``learnable_scalar``).
    Parameters: 2·d·r + r + d (+1 for a learnable scale)."""

    def __init__(self, d: int, r: int, activation: str = "relu", scale: float = 1.0, init: str = "lora",
                 learnable_scale: bool = False, d_out: int | None = None) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise DeltatuneError(f"unknown activation {activation!r}; use one of {sorted(ACTIVATIONS)}")
        if init not in ("lora", "bert"):
            raise DeltatuneError(f"unknown adapter init {init!r}; use 'lora' or 'bert'")
        if r < 1:
            raise DeltatuneError(f"bottleneck size must be at least 1, got {r}")
        self.down = nn.Linear(d, r)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(r, d if d_out is None else d_out)
        with torch.no_grad():
            if init == "lora":
                nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            else:
                nn.init.normal_(self.down.weight, std=0.02)
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()
        if learnable_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale)))
        else:
            self.register_buffer("scale", torch.tensor(float(scale)), persistent=False)
        self.activation = activation

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        dtype = self.down.weight.dtype
        out = self.up(self.act(self.down(z.to(dtype))))
        return (self.scale * out).to(z.dtype)


# ---------------------------------------------------------------- where sublayers are

SublayerKind = Literal["attention", "cross_attention", "ffn"]


@dataclass
class Sublayer:
    """One sublayer of block ``block``: ``reads``'s input is the sublayer input x (after the pre-LN of a
    pre-LN block); ``writes``'s output is the sublayer output h, before dropout / residual / post-LN; ``out``
    the Linear / Conv1D that produces h where the architecture table names one."""

    block: int
    kind: SublayerKind
    reads: nn.Module
    writes: nn.Module
    name: str  # dotted name of ``writes`` in the model
    out: nn.Module | None = None


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks with their dotted names, as ``core/architectures.py`` describes the model:
    every stack in forward order (an encoder-decoder's encoder, then decoder; Swin's stages), one global
    index; for a model the table lacks, the children of the longest ``nn.ModuleList``."""
    return [(b.name, b.module) for b in architectures.blocks(model)]


def sublayers(model: nn.Module, kind: SublayerKind, layers: set[int] | None = None) -> list[Sublayer]:
    """The ``kind`` sublayer of every block (or of the blocks in ``layers``) that has one (``cross_attention``:
    the decoder blocks of an encoder-decoder)."""
    found = []
    for block in architectures.blocks(model):
        if layers is not None and block.index not in layers:
            continue
        site = architectures.locate(block, kind)
        if site is not None:
            found.append(Sublayer(block.index, kind, site.reads, site.writes, site.name, site.out))
    if not found and layers is None and kind != "cross_attention":
        raise DeltatuneError(
            f"{type(model).__name__} has no {kind} sublayer deltatune can find; supported: {architectures.supported()}"
        )
    return found


def _first(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


def _replace_first(value: Any, new: torch.Tensor) -> Any:
    return (new, *value[1:]) if isinstance(value, tuple) else new


def sublayer_input(args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """The hidden states a sublayer module was called with (Llama passes them as a keyword)."""
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise DeltatuneError("cannot find the hidden states among the sublayer's arguments")


def add_to_output(form: ModuleForm, site: Sublayer, f: Callable[[torch.Tensor], torch.Tensor],
                  reads: Literal["output", "input"]) -> None:
    """Install h ← h + f(z) at ``site``: z = h (sequential insertion) or z = the sublayer input x
    (parallel insertion). The hooks are kept by ``form`` and removed when it detaches."""
    if reads == "output":
        def sequential(module: nn.Module, args: tuple, output: Any) -> Any:
            h = _first(output)
            return _replace_first(output, h + f(h))

        form.keep(site.writes.register_forward_hook(sequential))
        return
    if site.reads is site.writes:
        def parallel(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
            h = _first(output)
            return _replace_first(output, h + f(sublayer_input(args, kwargs)))

        form.keep(site.writes.register_forward_hook(parallel, with_kwargs=True))
        return
    seen: list[torch.Tensor] = []  # x from the reading module, consumed by the writing one

    def capture(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        seen[:] = [sublayer_input(args, kwargs)]

    def add(module: nn.Module, args: tuple, output: Any) -> Any:
        if not seen:
            raise DeltatuneError(f"{site.name}: the sublayer's output came without its input being seen")
        x = seen.pop()
        h = _first(output)
        return _replace_first(output, h + f(x))

    form.keep(site.reads.register_forward_pre_hook(capture, with_kwargs=True))
    form.keep(site.writes.register_forward_hook(add))
