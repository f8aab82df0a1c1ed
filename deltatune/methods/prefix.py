"""Prefix tuning (Li & Liang, 2021, arXiv 2101.00190; the unified view of He et al., 2022, arXiv 2110.04366).

Every attention layer gets l trainable key and value vectors per key/value head, put in front of its
own keys and values and visible to every query; the base model stays frozen. Training uses Li &
Liang's reparametrisation (embedding -> Linear(d, mid) -> tanh -> Linear(mid, 2·L·d_kv)), which is
folded away when the delta is saved: the artifact holds P_k, P_v per layer only (2·L·l·d_kv values),
and the MLP's parameters count as trainable while training only. A prefix changes attention from
the first step (by design), so a fresh delta does not reproduce the base model's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn as nn

from deltatune.core.registry import Built, Traits, register
from deltatune.methods._common import dense_forms
from deltatune.methods._prefix import head_parameters, prefix_forms


@dataclass
class PrefixConfig:
    # l = 30: the MAM adapter's prefix (He et al. 2022, unified view); Li & Liang use 10 (table-to-text)
    # to 200 (XSum); 30 suits the short classification / generation tasks deltatune ships
    length: int = 30
    # Li & Liang train through an MLP for stability (direct optimisation of P is sensitive to lr / init)
    reparam: bool = True
    mid_dim: int = 800  # the MLP's hidden size in Li & Liang and in the unified-view repo
    # direct P_k, P_v (reparam: false) start N(0, 1), or at the keys/values
    # of sampled real tokens ("vocab": Li & Liang's real-word initialisation, §7.2)
    init: Literal["random", "vocab"] = "random"
    layers: list[int] | str | None = None  # attention layers that get a prefix (None: all)
    modules_to_save: list[str] | None = None  # base modules trained fully, e.g. ["classifier"] (a fresh head)

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"length={self.length} must be at least 1")
        if self.mid_dim < 1:
            raise ValueError(f"mid_dim={self.mid_dim} must be at least 1")


@register("prefix", PrefixConfig, "prefix tuning: learned keys/values before every attention layer's own "
          "(reparametrisation MLP while training, folded away in the artifact)", mergeable=False,
          traits=Traits(quantized_base=True, starts_at_base=False), family="adapters & prompts")
def build(model: nn.Module, cfg: PrefixConfig, *, loading: bool = False) -> Built:
    built = prefix_forms(model, cfg.length, cfg.reparam, cfg.mid_dim, method="prefix", loading=loading, layers=cfg.layers,
                         init=cfg.init)
    if cfg.modules_to_save:
        built.forms.update(dense_forms(model, head_parameters(model, cfg.modules_to_save)))
    return built
