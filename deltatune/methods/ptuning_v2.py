"""P-tuning v2 (Liu et al., 2022, arXiv 2110.07602): deep prompts, i.e. trainable prefix keys/values at
every layer, and a linear head on [CLS] / the pooled token instead of a verbaliser.

The prefix is prefix tuning's (``_prefix.py``) with P-tuning v2's defaults: no reparametrisation
(it is optional and task-dependent in the paper), prompt length 20 for simple classification
(~100+ for hard or sequence-labelling tasks). When the model has a classification head (a
``classifier`` / ``score`` module) that head trains too, as a dense delta. A fresh delta does not
reproduce the base model's outputs: the prefix changes attention from the first step, by design.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn as nn

from deltatune.core.registry import Built, Traits, register
from deltatune.methods._common import dense_forms
from deltatune.methods._prefix import head_parameters, prefix_forms


@dataclass
class PtuningV2Config:
    length: int = 20  # the paper's prompt length for simple classification (NLU); ~100+ for hard tasks
    reparam: bool = False  # the paper's reparametrisation is optional; off in most of its settings
    mid_dim: int = 512  # official code's prefix_hidden_size, used when reparam is on
    # N(0, 1) as the official code's nn.Embedding; "vocab": the keys/values of
    # sampled real tokens (Li & Liang's real-word init), at the model's own scale (with reparam: unused)
    init: Literal["random", "vocab"] = "random"
    layers: list[int] | str | None = None  # attention layers that get a prefix (None: all, "deep" prompts)
    train_head: bool = True  # the model's classification head (classifier / score) trains with the prompts
    modules_to_save: list[str] | None = None  # further base modules trained fully

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"length={self.length} must be at least 1")
        if self.mid_dim < 1:
            raise ValueError(f"mid_dim={self.mid_dim} must be at least 1")


@register("ptuning_v2", PtuningV2Config, "P-tuning v2: deep prompts (prefix keys/values at every layer) "
          "and the classification head, trained", mergeable=False,
          traits=Traits(quantized_base=True, starts_at_base=False), family="adapters & prompts")
def build(model: nn.Module, cfg: PtuningV2Config, *, loading: bool = False) -> Built:
    built = prefix_forms(model, cfg.length, cfg.reparam, cfg.mid_dim, method="ptuning_v2", loading=loading, layers=cfg.layers,
                         init=cfg.init)
    extra = head_parameters(model) if cfg.train_head else []
    if cfg.modules_to_save:
        extra += head_parameters(model, cfg.modules_to_save)
    built.forms.update(dense_forms(model, extra))
    return built
