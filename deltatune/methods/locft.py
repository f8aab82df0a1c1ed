"""LocFT-BF (Yang et al., ICLR 2026, arXiv 2509.22072): localized breadth-first fine-tuning for model editing.

Plain fine-tuning edits well when it runs breadth-first (several epochs over all edits in shuffled
mini-batches, loss on the answer tokens only) and tunes one localized module: by default the MLP output
projection of one block (Llama ``mlp.down_proj``, GPT-2 ``mlp.c_proj``, BERT ``output.dense``).

* Form: a dense delta on the chosen module's tensors only, so the artifact stores one tensor.
* Policy: the official loop's rules on top of the native loop's shuffled epochs (train with ``data.task:
  edit``): a batch whose loss is below ``threshold`` does not step (``skip_step``; counted and logged), and
  the run ends after an epoch whose mean batch loss is below ``threshold``, or after ``epochs`` epochs
  (``should_stop``). Give ``train.steps`` >= epochs x batches per epoch; the policy ends the run.
* Layer: ``layer`` names the block; with ``layer: null`` the policy searches it (``search_layers`` are the
  candidates, default every block). Every candidate gets a zero dense delta for the first optimizer step;
  the layer whose weight gradient has the largest L1 norm on that first batch of edits wins (ties: the
  lower index). Why L1: Adam's first step moves each entry by about lr·sign(g), so to first order it lowers
  the loss by lr·‖g‖₁ — the score is the loss reduction the first real step would get on that layer, from
  one backward pass, deterministic given the seed. Only the winner's gradient is applied; the other
  deltas are still zero and are removed after the step, and the chosen layer is written into the config
  (so the artifact loads as a fixed-layer one).

Recipe of the paper (set in the run config, see the ``locft`` preset): Adam with weight decay 0
(``optimizer: adam``), constant learning rate 5e-5 (5e-4 in the official Llama-3 / Qwen2.5 configs), batch of
100 edits, no gradient clipping. The native loop drops the ragged end of every epoch (all batches full):
choose a ``train.batch_size`` that divides the number of edits so every epoch visits every edit once.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from deltatune.core.policy import Policy, release_state
from deltatune.core.registry import Built, Traits, register
from deltatune.core.targeting import count_layers, layer_index, resolve_layers
from deltatune.core.tuned import Tuned
from deltatune.errors import DeltatuneError
from deltatune.methods._common import dense_forms

log = logging.getLogger(__name__)

# the MLP output projection inside a block, by architecture (the first one the model has is used)
MLP_OUT = ("mlp.down_proj", "mlp.c_proj", "output.dense", "mlp.fc2", "mlp.dense_4h_to_h")


@dataclass
class LocFTConfig:
    layer: int | None = None  # the block to edit; None: search it at the first step (see the module doc)
    module: str | None = None  # path inside the block ("mlp.down_proj", "mlp", "" = the whole block, as the
    # official Mistral config); None: the block's MLP output projection, the paper's best location
    search_layers: list[int] | str | None = None  # candidate blocks of the search ([20, 21], "10:"); None: all
    epochs: int = 25  # num_steps of the official configs: passes over all edits
    threshold: float = 0.01  # skip batches below it; stop after an epoch whose mean loss is below it

    def __post_init__(self) -> None:
        if self.layer is not None and (isinstance(self.layer, bool) or self.layer < 0):
            raise ValueError(f"layer={self.layer!r} must be a block index >= 0 (or null to search one)")
        if self.layer is not None and self.search_layers is not None:
            raise ValueError("give layer (a fixed block) or search_layers (candidates to search), not both")
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be >= 1")
        if self.threshold < 0:
            raise ValueError(f"threshold={self.threshold} must be >= 0")


# -- where the delta lives -------------------------------------------------------------------------
def _in_block(name: str) -> tuple[int, str] | None:
    """(block index, path inside the block) of a dotted name, split at its first integer part."""
    i = layer_index(name)
    if i is None:
        return None
    m = re.search(rf"\.{i}(\.|$)", name)
    assert m is not None
    return i, name[m.end():]


def resolve_module(model: nn.Module, module: str | None) -> str:
    paths = {p[1] for n, _ in model.named_modules() if (p := _in_block(n)) is not None}
    if module is None:
        found = next((m for m in MLP_OUT if m in paths), None)
        if found is None:
            raise DeltatuneError(
                f"locft knows no MLP output projection in {type(model).__name__} (looked for {', '.join(MLP_OUT)}); "
                "set module to a path inside a block, e.g. 'mlp.down_proj'"
            )
        return found
    if module not in paths:
        near = sorted(p for p in paths if p.count(".") <= 2)[:20]
        raise DeltatuneError(f"module={module!r} is no path inside the model's blocks; paths there: {', '.join(near)}")
    return module


def layer_parameters(model: nn.Module, module: str, layer: int) -> list[tuple[str, nn.Parameter]]:
    """The parameters of ``<blocks>.<layer>.<module>``: the block index and the path are matched exactly,
    so layer 2 never picks up layer 20 (the official substring match does)."""
    out = []
    for name, p in model.named_parameters():
        where = _in_block(name)
        if where is None or where[0] != layer:
            continue
        inner = where[1]
        if module == "" or inner == module or inner.startswith(module + "."):
            out.append((name, p))
    return out


def _candidates(model: nn.Module, cfg: LocFTConfig) -> list[int]:
    n = count_layers(n for n, _ in model.named_parameters())
    if n == 0:
        raise DeltatuneError(f"locft edits one numbered block, but {type(model).__name__} has none")
    if cfg.layer is not None:
        if cfg.layer >= n:
            raise DeltatuneError(f"layer={cfg.layer} but the model has blocks 0..{n - 1}; pick one of them")
        return [cfg.layer]
    if cfg.search_layers is None:
        return list(range(n))
    chosen = sorted(resolve_layers(cfg.search_layers, n))
    if not chosen:
        raise DeltatuneError(f"search_layers={cfg.search_layers!r} names no block of 0..{n - 1}")
    return chosen


# -- the policy --------------------------------------------------------------------------------------
class LocFTPolicy(Policy):
    """Breadth-first editing rules: layer search at the first step, skip fitted batches, early stop.

    State (checkpointed): the chosen layer, the layer scores, the current epoch's batch losses, the
    epochs done, the epoch means and the skipped steps."""

    name = "locft"

    def __init__(self, cfg: LocFTConfig, layers: dict[int, list[str]]) -> None:
        self.cfg = cfg
        self.layers = layers  # candidate block -> names of its forms
        self.layer: int | None = cfg.layer if cfg.layer is not None else (next(iter(layers)) if len(layers) == 1
                                                                          else None)
        self.scores: dict[int, float] = {}
        self.losses: list[float] = []  # batch losses of the epoch in progress (skipped batches too)
        self.epoch_means: list[float] = []
        self.skipped: list[int] = []  # steps whose update was skipped
        self._tuned: Tuned | None = None

    def setup(self, tuned: Tuned) -> None:
        self._tuned = tuned
        if self.layer is not None:
            self.cfg.layer = self.layer

    # -- the search ------------------------------------------------------------------------------
    def before_optimizer_step(self, step: int, tuned: Tuned, optimizer: torch.optim.Optimizer) -> None:
        if self.layer is not None:
            return
        forms = tuned.forms()
        for layer, names in self.layers.items():
            grads = [forms[n].delta.grad for n in names]
            self.scores[layer] = float(sum(g.abs().sum().item() for g in grads if g is not None))
        self.layer = max(self.layers, key=lambda i: (self.scores[i], -i))
        for layer, names in self.layers.items():
            if layer != self.layer:
                for n in names:
                    forms[n].delta.grad = None  # the optimizer leaves them at zero
        log.info("locft: layer %d chosen (gradient L1 per layer: %s)", self.layer,
                 {i: round(s, 6) for i, s in self.scores.items()})

    def after_optimizer_step(self, step: int, tuned: Tuned, optimizer: torch.optim.Optimizer) -> None:
        if self.layer is not None and len(self.layers) > 1:
            self._keep_chosen(tuned, optimizer)

    def _keep_chosen(self, tuned: Tuned, optimizer: torch.optim.Optimizer | None = None) -> None:
        assert self.layer is not None
        gone = [n for layer, names in self.layers.items() if layer != self.layer for n in names]
        forms = tuned.forms()
        if optimizer is not None:
            release_state(optimizer, [p for n in gone if n in forms for p in forms[n].parameters()])
        tuned.replace_forms({}, remove=gone)
        self.layers = {self.layer: self.layers[self.layer]}
        self.cfg.layer, self.cfg.search_layers = self.layer, None  # the artifact says which block it edits

    # -- breadth-first rules ------------------------------------------------------------------------
    def skip_step(self, step: int, loss: float) -> bool:
        self.losses.append(loss)
        if loss >= self.cfg.threshold:
            return False
        self.skipped.append(step)
        log.info("locft: step %d skipped (batch loss %.4g < threshold %g); %d skipped so far",
                 step + 1, loss, self.cfg.threshold, len(self.skipped))
        return True

    def should_stop(self, step: int, epoch_end: bool) -> bool:
        if not epoch_end:
            return False
        mean = sum(self.losses) / max(len(self.losses), 1)  # all batches are full: the official size-weighted mean
        self.epoch_means.append(mean)
        self.losses = []
        if mean < self.cfg.threshold:
            log.info("locft: epoch %d mean loss %.4g < %g: stopping", len(self.epoch_means), mean, self.cfg.threshold)
            return True
        return len(self.epoch_means) >= self.cfg.epochs

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "scores": {str(k): v for k, v in self.scores.items()}, "losses": self.losses,
                "epoch_means": self.epoch_means, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters and, after a search, the single chosen layer's form (the loop loads the
        delta tensors next)."""
        if not state:
            return
        self.scores = {int(k): float(v) for k, v in state.get("scores", {}).items()}
        self.losses = [float(x) for x in state.get("losses", [])]
        self.epoch_means = [float(x) for x in state.get("epoch_means", [])]
        self.skipped = [int(x) for x in state.get("skipped", [])]
        layer = state.get("layer")
        if layer is not None:
            self.layer = int(layer)
            if len(self.layers) > 1:
                if self._tuned is None:
                    raise DeltatuneError("locft: attach the delta (dt.attach) before loading the policy state")
                self._keep_chosen(self._tuned)


# -- the method --------------------------------------------------------------------------------------
# why it cannot train on a quantized base (deltatune.core.quantized): said in its one-line refusal
QUANTIZED_BASE = (
    "it trains a whole MLP projection as a dense delta, and a quantized weight is packed storage, not "
    "values an optimizer can step"
)


@register("locft", LocFTConfig, "LocFT-BF model editing: breadth-first fine-tuning of one block's MLP projection",
          traits=Traits(quantized_base=QUANTIZED_BASE), family="chosen tensors")
def build(model: nn.Module, cfg: LocFTConfig, *, loading: bool = False) -> Built:
    module = resolve_module(model, cfg.module)
    forms = {}
    layers: dict[int, list[str]] = {}
    for layer in _candidates(model, cfg):
        params = layer_parameters(model, module, layer)
        if not params:
            raise DeltatuneError(f"block {layer} has no parameters under {module!r}; pick another module or layer")
        built = dense_forms(model, params)
        forms.update(built)
        layers[layer] = list(built)
    return Built(forms, LocFTPolicy(cfg, layers))
