"""HFT: half fine-tuning (Hui et al., ACL 2025).

Each round, half of the parameters of every block train and the other half stay frozen at the values
they had when the round began. The selection is category-level, per block, as in the paper:

- attention matrices (q, k, v, o; GPT-2's fused c_attn and c_proj): half of them;
- FFN matrices (gate, up, down; GPT-2 / BERT have two): half; with an odd count (3) half the blocks,
  drawn at random, get the larger share (2 of 3) and the others the smaller one (1 of 3);
- norms (input and post-attention): half (1 of 2).

Embeddings, head, final norm and the biases of linear layers always train (the paper's ablation: freezing
embeddings and head hurts; the rest is unspecified and cheap). Frozen means ``requires_grad=False``, so
no gradient is computed and no decay touches them (masking gradients would not). A run of ``rounds``
rounds draws a new selection at each round boundary, with a fresh optimizer state and a fresh LR
schedule, as separate training stages would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from deltatune.core.policy import Policy
from deltatune.core.registry import Built, Traits, register
from deltatune.core.targeting import layer_index
from deltatune.errors import DeltatuneError
from deltatune.methods._common import layerwise_forms, set_trainable

if TYPE_CHECKING:
    from deltatune.core.forms.base import Form
    from deltatune.core.tuned import Tuned

CATEGORIES = ("attention", "ffn", "norm")


@dataclass
class HftConfig:
    ratio: float = 0.5  # share of each category that trains (paper: 0.5; 0.4-0.6 is as good)
    rounds: int = 1  # selections over the run: a new draw, optimizer state and LR schedule at each
    seed: int = 0  # seed of the halves drawn at each round

    def __post_init__(self) -> None:
        if not 0 < self.ratio < 1:
            raise ValueError(f"ratio={self.ratio} must be strictly between 0 and 1")
        if self.rounds < 1:
            raise ValueError(f"rounds={self.rounds} must be >= 1")


def _category(model: nn.Module, name: str) -> str | None:
    """attention / ffn / norm for a block tensor; None for one that always trains (a linear layer's bias)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if "norm" in type(module).__name__.lower():
        return "norm"
    if leaf == "bias":
        return None
    return "attention" if any(k in module_name for k in ("attn", "attention")) else "ffn"


class HftPolicy(Policy):
    name = "hft"

    def __init__(self, cfg: HftConfig) -> None:
        self.cfg = cfg
        self.units: dict[int, dict[str, list[list[Form]]]] = {}  # block -> category -> units (a module's forms)
        self.always: list[Form] = []
        self.selected: list[str] = []  # names of the forms chosen this round
        self.rounds_drawn = 0
        self.boundaries: list[int] = []
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self._forms: dict[str, Form] = {}

    def setup(self, tuned: Tuned) -> None:
        self._forms = tuned.forms()
        by_module: dict[str, list[str]] = {}
        for name in self._forms:
            i = layer_index(name)
            cat = _category(tuned.model, name) if i is not None else None
            if cat is None:
                self.always.append(self._forms[name])
                continue
            # a norm's weight and bias are one unit; a matrix is a unit (its bias always trains)
            by_module.setdefault(f"{i}|{cat}|{name.rpartition('.')[0]}", []).append(name)
        for key, names in by_module.items():
            i, cat, _ = key.split("|", 2)
            self.units.setdefault(int(i), {c: [] for c in CATEGORIES})[cat].append(names)
        if not self.units:
            raise DeltatuneError(f"{type(tuned.model).__name__} has no numbered blocks: HFT selects within blocks")
        set_trainable(self.always, True)
        self._draw(None)

    def plan(self, total_steps: int, grad_accum: int) -> None:
        r = self.cfg.rounds
        self.boundaries = sorted({round(k * total_steps / r) for k in range(1, r)} - {0, total_steps})

    def lr_restarts(self, total_steps: int) -> list[int]:
        self.plan(total_steps, 1)
        return list(self.boundaries)

    def _shares(self, n: int, blocks: int) -> list[int]:
        """How many of n units each block trains: n·ratio, with the fractional part spread as whole
        units over a random part of the blocks (3 FFN matrices: 2 in half the blocks, 1 in the rest)."""
        exact = n * self.cfg.ratio
        low = math.floor(exact)
        n_high = round((exact - low) * blocks)
        order = torch.randperm(blocks, generator=self.generator).tolist()
        high = set(order[:n_high])
        return [min(n, low + (1 if b in high else 0)) for b in range(blocks)]

    def _draw(self, optimizer: torch.optim.Optimizer | None) -> None:
        chosen: list[list[str]] = []
        blocks = list(self.units)
        for cat in CATEGORIES:
            counts = [len(self.units[i][cat]) for i in blocks]
            if not any(counts):
                continue
            shares = self._shares(max(counts), len(blocks))
            for b, i in enumerate(blocks):
                units = self.units[i][cat]
                pick = torch.randperm(len(units), generator=self.generator)[: min(shares[b], len(units))]
                chosen += [units[int(j)] for j in sorted(pick.tolist())]
        self.selected = sorted(name for unit in chosen for name in unit)
        self.rounds_drawn += 1
        self._apply(optimizer)

    def _apply(self, optimizer: torch.optim.Optimizer | None) -> None:
        on = set(self.selected)
        block_forms = [(n, f) for n, f in self._forms.items() if f not in self.always]
        # a new round is a new optimizer: every tensor's state goes, trained or not
        set_trainable([f for n, f in block_forms if n not in on], False, optimizer)
        set_trainable([f for n, f in block_forms if n in on], True, optimizer)
        if optimizer is not None:
            set_trainable(self.always, True, optimizer)

    def after_optimizer_step(self, step: int, tuned: Tuned, optimizer: torch.optim.Optimizer) -> None:
        if step + 1 in self.boundaries:
            self._draw(optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {"selected": list(self.selected), "rounds_drawn": self.rounds_drawn,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.rounds_drawn = int(state["rounds_drawn"])
        self.selected = [str(n) for n in state["selected"]]
        self._apply(None)


# why it cannot train on a quantized base (deltatune.core.quantized): said in its one-line refusal
QUANTIZED_BASE = (
    "it trains half of each block's weights in place, and a quantized weight is packed storage, not "
    "values an optimizer can step"
)


@register("hft", HftConfig, "half fine-tuning: half of each block's attention, FFN and norm tensors train per round, in place",
          traits=Traits(quantized_base=QUANTIZED_BASE), family="full & layer-wise")
def build(model: nn.Module, cfg: HftConfig, *, loading: bool = False) -> Built:
    return Built(layerwise_forms(model, loading), HftPolicy(cfg))
