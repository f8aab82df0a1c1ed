"""Trainable tokens: only the embedding rows of chosen token ids train, with Hugging Face PEFT's defaults and
arithmetic (``TrainableTokensConfig``, 0.21.2; ``peft.tuners.trainable_tokens``).

The delta is (len(token_indices), hidden) values on the rows of those ids in the input embedding (or the
embeddings ``targets`` names): the model sees W0 with those rows moved, every other row bit for bit W0. A weight the
LM head shares with the embedding (tied weights) is one tensor, so the head's rows of those tokens move with it, as
PEFT's tied adapter does. Rows start at the base (init) or at random normal values (PEFT's ``init_weights=False``).

The delta is a sparse one whose support is whole rows (``core.forms.sparse``: exact merge and unmerge, composition),
applied through a parametrisation at every module holding the tensor, so whatever reads the weight (the chunked
loss's fused head included) sees the trained rows. PEFT stores the rows' values (``trainable_tokens_delta``, under
the embedding and again under a tied head); deltatune stores their difference from W0 and converts both ways.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from deltatune.core.forms.base import Form
from deltatune.core.registry import Built, PeftFormat, Traits, register
from deltatune.errors import DeltatuneError
from deltatune.methods._token_rows import (
    PEFT_TENSOR,
    TokenRows,
    check_token_ids,
    input_embedding,
    row_modules,
    token_forms,
)

__all__ = ["PEFT_TENSOR", "TokenRows", "TrainableTokensConfig", "build"]


@dataclass
class TrainableTokensConfig:
    # the token ids whose embedding rows train, e.g. tokens added to the tokenizer (PEFT's token_indices); the rows of
    # an LM head tied to the embedding train with them
    token_indices: list[int] = field(default_factory=list)
    # embedding modules (or an LM head) whose rows train; None: the model's input embedding (PEFT's default)
    targets: list[str] | None = None
    init: bool = True  # True: the rows start at the base's (the base model); False: random normal (PEFT's init_weights)

    def __post_init__(self) -> None:
        check_token_ids(self.token_indices, "token_indices")


def build_forms(model: nn.Module, cfg: TrainableTokensConfig, loading: bool) -> dict[str, Form]:
    if not cfg.token_indices and not loading:
        raise DeltatuneError("token_indices is empty, so nothing would train: name the token ids whose embedding rows "
                             "train, e.g. token_indices=tokenizer.convert_tokens_to_ids(['<new>'])")
    modules = [input_embedding(model)] if cfg.targets is None else row_modules(model, cfg.targets)
    return token_forms(model, [(n, m, cfg.token_indices) for n, m in modules], init=cfg.init)


# -- PEFT's TRAINABLE_TOKENS adapters ---------------------------------------------------------------------------
def _module_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), n)
    return names


def _to_peft(cfg: TrainableTokensConfig, forms: dict[str, Form], model: nn.Module
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    names = _module_names(model)
    tensors: dict[str, Any] = {}
    targets = []
    for name, form in forms.items():
        if not isinstance(form, TokenRows):
            raise DeltatuneError(f"{name} is a {form.kind} delta, which PEFT's TRAINABLE_TOKENS adapter cannot hold")
        targets.append(name.rsplit(".", 1)[0])
        rows = form.rows().to(form.base.dtype)
        for module, _ in form.sites:  # PEFT saves the rows under the embedding and again under a tied head
            tensors[f"{names[id(module)]}.{PEFT_TENSOR}"] = rows
    # PEFT ties a head to the embedding only when it targets the input embedding (the default)
    return tensors, {"token_indices": list(cfg.token_indices), "target_modules": sorted(targets),
                     "init_weights": True}


def _from_peft(config: dict[str, Any], layers: dict[str, dict[str, Any]], extra: dict[str, Any],
               model: nn.Module) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    tokens = config.get("token_indices")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise DeltatuneError(f"the adapter's token_indices={tokens!r} is not a list of token ids (PEFT writes "
                             "a list of whole numbers; a mapping of modules to ids is LoRA's trainable_token_indices)")
    by_tensor: dict[int, list[str]] = {}  # modules that hold one tensor (a tied head with its embedding)
    for module in sorted(layers):
        weight = getattr(model.get_submodule(module), "weight", None)
        if weight is None:
            raise DeltatuneError(f"{module} holds trainable-token rows but has no weight in this model")
        by_tensor.setdefault(id(weight), []).append(module)
    embedding = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    targets: list[str] = []
    tensors: dict[str, dict[str, Any]] = {}
    for group in by_tensor.values():
        rows = layers[group[0]][PEFT_TENSOR]
        for other in group[1:]:
            if not torch.equal(layers[other][PEFT_TENSOR], rows):
                raise DeltatuneError(f"the adapter holds other rows for {other} than for {group[0]}, which share one "
                                     "weight (tied): it was not saved by PEFT")
        # the targeted module: the input embedding if it is in the group, else the first by name
        target = next((m for m in group if model.get_submodule(m) is embedding), group[0])
        targets.append(target)
        base = model.get_submodule(target).weight.detach()
        if rows.dim() != 2 or tuple(rows.shape) != (len(tokens), base.shape[1]):
            raise DeltatuneError(f"{target}.{PEFT_TENSOR} has shape {tuple(rows.shape)}, but {len(tokens)} token_indices "
                                 f"of a {base.shape[1]}-wide embedding need {(len(tokens), base.shape[1])}")
        if any(not 0 <= t < base.shape[0] for t in tokens):
            raise DeltatuneError(f"the adapter's token_indices reach past the {base.shape[0]} rows of {target}: it was "
                                 "trained on a resized vocabulary; resize this model's embeddings to its tokenizer "
                                 "(model.resize_token_embeddings(len(tokenizer))) before importing")
        # deltatune holds ΔW = rows − W0[tokens] (in the delta's dtype: float32 on a half-precision base)
        dtype = base.dtype if base.dtype in (torch.float32, torch.float64) else torch.float32
        tensors[f"{target}.weight"] = {"values": rows.to(dtype) - base[torch.tensor(tokens, dtype=torch.long)].to(dtype)}
    return {"token_indices": tokens, "targets": sorted(targets)}, tensors


QUANTIZED_BASE = "its rows are checked against PEFT on full-precision embeddings only"


@register("trainable_tokens", TrainableTokensConfig, "trainable tokens: only the embedding rows of chosen token ids "
          "train (and a tied LM head's); PEFT-compatible, mergeable", family="sparse",
          traits=Traits(quantized_base=QUANTIZED_BASE),
          peft=PeftFormat("TRAINABLE_TOKENS", (PEFT_TENSOR,), _to_peft, _from_peft,
                          config_fields=(("token_indices", "token_indices"), ("init_weights", "init"))))
def build(model: nn.Module, cfg: TrainableTokensConfig, *, loading: bool = False) -> Built:
    return Built(build_forms(model, cfg, loading))
