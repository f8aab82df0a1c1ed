"""DoRA: weight-decomposed low-rank adaptation (Liu et al., ICML 2024; arXiv 2402.09353).

The adapted weight is split into a magnitude and a direction,

    W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_c,

with one magnitude per output feature (the norm runs over each output's input weights; for an embedding,
as in PEFT, over the vocabulary for each hidden dimension). m starts at ‖W0 + s·B·A‖_c, so with B = 0 the
model starts exactly at the base. A, B follow LoRA (``deltatune.methods.lora``), m trains with them.

The forward pass is Hugging Face PEFT's (``tuners/lora/dora.py``, 0.21.2), so logits agree with
``LoraConfig(use_dora=True)`` to float rounding: the norm is computed from W0 and the current B·A and then
*detached* (paper §4.3: "treating ‖V + ΔV‖_c as a constant ... it won't receive any gradient"), and
y = W0·x + b + (m/‖·‖ − 1)·(W0·x) + (m/‖·‖)·s·B·A·dropout(x), where W0·x is the base output minus its
bias, or, when dropout is active, W0 applied to the dropped-out input (PEFT's exact choice).

On a quantized base (``deltatune.core.quantized``) W0 is the dequantized weight, built where the norm (and,
with dropout, W0·x) needs it and dropped after, as PEFT does for bitsandbytes layers: no m·n copy outlives the
forward.

Merging writes W' into the base tensor; the norm it used is kept in memory so that unmerge inverts it
(W0 = W'·‖·‖/m − s·B·A), as PEFT does. Unlike LoRA's, this ΔW = m/‖V‖ ⊙ V − W0 depends on W0: in a
composition it must merge before other deltas of the same weight (compose merges in part order).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from deltatune.core.forms.lowrank import LowRank
from deltatune.core.registry import Built, Traits, register
from deltatune.errors import DeltatuneError
from deltatune.methods import lora
from deltatune.methods._lowrank import default_targets


class DoRA(LowRank):
    """A LoRA delta with a learnable magnitude per output feature (``magnitude``)."""

    kind = "dora"

    def __init__(self, module: nn.Module, r: int, alpha: float, **options) -> None:
        super().__init__(module, r, alpha, **options)
        self.magnitude = nn.Parameter(torch.empty(self.B.shape[0], dtype=self.A.dtype, device=self.A.device))
        self._merge_norm: torch.Tensor | None = None  # the norm a merge used; unmerge needs it
        self.reset_magnitude()

    # -- the decomposition ------------------------------------------------------------------
    def _oriented(self, w: torch.Tensor) -> torch.Tensor:
        """A weight in (out, in) orientation (embeddings: (dim, num), PEFT's fan_in_fan_out view)."""
        return w if self.layout == "linear" else w.T

    def _lora_weight(self) -> torch.Tensor:
        return self.B @ self.A  # (out, in), without the scale

    def weight_norm(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """‖W0 + s·B·A‖ per output feature, detached (paper §4.3, PEFT ``get_weight_norm``)."""
        dtype = dtype or self.A.dtype
        with torch.no_grad():
            w = self._oriented(self.dense_base(dtype)) + self.scale * self._lora_weight().to(dtype)
            return torch.linalg.norm(w, dim=1).to(w.dtype)

    def reset_magnitude(self) -> None:
        """m = ‖W0 + s·B·A‖_c (PEFT's init; with B = 0 the delta is exactly zero)."""
        with torch.no_grad():
            self.magnitude.copy_(self.weight_norm())

    def _factor(self, norm: torch.Tensor) -> torch.Tensor:
        """m / ‖·‖ shaped to scale the base tensor in its own layout."""
        f = self.magnitude.float() / norm.float()
        return f.view(-1, 1) if self.layout == "linear" else f.view(1, -1)

    def delta_weight(self) -> torch.Tensor:
        if self.merged:
            raise DeltatuneError("a merged DoRA delta has overwritten W0, which its ΔW depends on: unmerge first")
        base = self.dense_base(torch.float32)
        lora_w = self.scale * self._lora_weight().float()
        adapted = base + (lora_w if self.layout == "linear" else lora_w.T)
        return self._factor(self.weight_norm(torch.float32)) * adapted - base

    # -- forward -------------------------------------------------------------------------
    def _output_is_base(self, module: nn.Module) -> bool:
        """Whether the module's own output is W0·x (+ b): no other delta parametrises or hooks this weight."""
        return not parametrize.is_parametrized(module, "weight") and len(module._forward_hooks) <= 1

    def _dora_output(self, module: nn.Module, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The module's output with the DoRA delta, from its input and its output (PEFT's arithmetic). Beside
        other deltas of the same weight (a composition), W0·x is computed apart so that exactly ΔW·x is added."""
        if self.layout == "embedding":
            ms = self.magnitude / self.weight_norm()
            e = module
            opts = (e.padding_idx, e.max_norm, e.norm_type, e.scale_grad_by_freq, e.sparse)
            lora_out = ms * (F.embedding(x, self.A.T, *opts) @ self.B.T) * self.scale
            if self._output_is_base(module):
                return (ms * output + lora_out).to(output.dtype)
            base = F.embedding(x, self.dense_base(), *opts)
            return (output + ((ms - 1) * base + lora_out)).to(output.dtype)
        x = x.to(self.A.dtype)
        ms = (self.magnitude / self.weight_norm(x.dtype)).view(1, -1)
        if self.training and isinstance(self.dropout, nn.Dropout):
            x = self.dropout(x)
            # W0 on the dropped-out input, as PEFT
            base = F.linear(x, self._oriented(self.dense_base(x.dtype)))
        elif self._output_is_base(module):
            bias = getattr(module, "bias", None)
            base = output if bias is None else output - bias
        else:
            base = F.linear(x, self._oriented(self.dense_base(x.dtype)))
        lora_out = F.linear(F.linear(x, self.A), self.B)
        return (output + ((ms - 1) * base + ms * lora_out * self.scale)).to(output.dtype)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self._dora_output(module, args[0], output)

    def output_delta(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        base = module.forward(x)  # forward, not __call__: our own hook must not run
        return self._dora_output(module, x, base) - base

    # -- merge -----------------------------------------------------------------------------
    def merge(self) -> None:
        if not self.merged:
            self._merge_norm = self.weight_norm(torch.float32)
        super().merge()  # base + delta_weight() = m/‖·‖ ⊙ (W0 + s·B·A); tied weights get their own copy

    def unmerge(self) -> None:
        if self.merged and self._untied_from is None:
            # invert in place with the norm the merge used (W' no longer tells it: each row's norm is now m)
            with torch.no_grad():
                base = self.base
                lora_w = self.scale * self._lora_weight().float()
                w0 = base.float() / self._factor(self._merge_norm) - (lora_w if self.layout == "linear" else lora_w.T)
                base.copy_(w0.to(base.dtype))
            self.merged = False
            self._merge_norm = None
            self.attach()
            return
        super().unmerge()
        self._merge_norm = None

    def extra_repr(self) -> str:
        return super().extra_repr() + ", magnitude"


# The paper's commonsense-reasoning recipe (NVlabs/DoRA commonsense_reasoning: README and llama*_DoRA.sh run
# with r=32, alpha=64 on q/k/v/up/down; finetune.py's lora_dropout default 0.05). PEFT's defaults differ: r=8, lora_alpha=8, dropout 0.0 and
# q_proj/v_proj only (the `lora` defaults of this library); set them explicitly to reproduce a PEFT run.
PAPER_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
_LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma")


@dataclass
class DoraConfig(lora.LoraConfig):
    """LoRA's options (r, alpha, dropout, targets, use_rslora, init, bias, patterns, modules_to_save) with the
    DoRA paper's defaults. ``init``: True (Kaiming A, zero B: the base model at step 0), "gaussian", False."""

    r: int = 32  # paper: r=32 (DoRA† r=16); PEFT: 8
    alpha: float = 64.0  # paper: alpha = 2r; PEFT: 8
    dropout: float = 0.05  # paper (LLM-Adapters finetune.py); PEFT: 0.0
    # None: the paper's q/k/v/up/down on Llama-like models, the `lora` defaults (PEFT's) elsewhere
    targets: list[str] | None = None


def _targets(model: nn.Module, cfg: DoraConfig) -> list[str]:
    if cfg.targets:
        return cfg.targets
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return PAPER_TARGETS if model_type in _LLAMA_LIKE else default_targets(model)


@register("dora", DoraConfig, "DoRA: magnitude m per output times the direction of W0 + (alpha/r)·B·A "
          "(Liu et al., 2024); PEFT-compatible (use_dora), mergeable", family="low-rank",
          traits=Traits(quantized_base=True))
def build(model: nn.Module, cfg: DoraConfig, *, loading: bool = False) -> Built:
    # LoRA's builder selects the modules and builds the bias / modules_to_save deltas; each low-rank delta
    # then becomes a DoRA delta on the same module, keeping LoRA's factors (same seed: same A as `lora`)
    built = lora.build(model, dataclasses.replace(cfg, targets=_targets(model, cfg)), loading=loading)
    forms = dict(built.forms)
    for name, f in built.forms.items():
        if type(f) is not LowRank:
            continue
        module = f.sites[0][0]
        p = float(getattr(f.dropout, "p", 0.0))
        d = DoRA(module, f.r, f.alpha, use_rslora=f.use_rslora, dropout=p, init=cfg.init, tied=f._tied)
        with torch.no_grad():
            d.A.copy_(f.A)
            d.B.copy_(f.B)
        d.reset_magnitude()
        forms[name] = d
    return Built(forms, built.policy)
