"""Rows of an embedding that train (token ids' rows): ``TokenRows``, the sparse form whose support is whole rows, and
the forms for a {module: token ids} mapping, shared by the ``trainable_tokens`` method and lora's
``trainable_token_indices`` option (PEFT's LoraConfig field of that name). A weight the LM head shares with the input
embedding is one tensor: its rows move in both (PEFT's tied adapter)."""

from __future__ import annotations

import torch
import torch.nn as nn

from deltatune.core.forms.base import Form
from deltatune.core.forms.sparse import Sparse
from deltatune.core.targeting import select_modules, sites_of
from deltatune.errors import DeltatuneError

PEFT_TENSOR = "trainable_tokens_delta"  # PEFT's key of the rows' values, under every module holding the tensor


class TokenRows(Sparse):
    """Whole rows of one embedding (or LM head) weight: ``values`` is (k · hidden) in token order, the k rows' ΔW."""

    kind = "token_rows"

    def __init__(self, sites: list[tuple[nn.Module, str]], tokens: list[int], *, init: bool = True) -> None:
        weight = sites[0][0].weight
        rows, width = int(weight.shape[0]), int(weight.shape[1])
        bad = [t for t in tokens if not 0 <= t < rows]
        if bad:
            raise DeltatuneError(
                f"token id {bad[0]} is outside the embedding's {rows} rows: resize the model's embeddings to the "
                "tokenizer first (model.resize_token_embeddings(len(tokenizer))), or drop the id from token_indices"
            )
        self.tokens = list(tokens)
        self.width = width
        ids = torch.tensor(self.tokens, dtype=torch.long, device=weight.device)
        indices = (ids.unsqueeze(1) * width + torch.arange(width, device=weight.device)).reshape(-1)
        super().__init__(sites, "weight", indices=indices)
        if not init:  # PEFT's init_weights=False: the rows start at torch.randn
            with torch.no_grad():
                rows_now = torch.randn(len(tokens), width, dtype=weight.dtype, device=weight.device)
                self.values.copy_((rows_now - self.base[ids]).reshape(-1).to(self.values.dtype))

    def _functional(self) -> bool:
        return False  # a parametrisation at every site: every reader of the weight sees the rows

    def added_to(self, weight: torch.Tensor) -> torch.Tensor:
        # W0 with the k rows added (one copy of W0, as PEFT's index_copy): no dense ΔW, and the backward to the
        # values gathers k rows of the weight's gradient
        ids = torch.tensor(self.tokens, dtype=torch.long, device=weight.device)
        rows = self.values.view(len(self.tokens), self.width).to(weight.dtype)
        return weight.index_add(0, ids, rows * self.scale if self.scale != 1.0 else rows)

    # -- the rows as (k, hidden) ------------------------------------------------------------------------------
    def rows(self) -> torch.Tensor:
        """The trained rows' values W0[tokens] + ΔW, (k, hidden), as PEFT holds them."""
        ids = torch.tensor(self.tokens, dtype=torch.long, device=self.base.device)
        return self.base.detach()[ids].to(self.values.dtype) + self.values.detach().view(len(self.tokens), -1)

    # the artifact holds the rows' ΔW (k, hidden); their positions follow from the config's token_indices
    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {"values": self.values.detach().view(len(self.tokens), self.width)}

    def stored_tensors_names(self) -> list[str]:
        return ["values"]

    def stored_bytes(self) -> int:
        return self.values.numel() * self.values.element_size()

    def load_stored(self, tensors: dict[str, torch.Tensor]) -> None:
        shape = (len(self.tokens), self.width)
        value = tensors.get("values")
        if set(tensors) != {"values"} or value is None or tuple(value.shape) != shape:
            got = ", ".join(f"{n} {tuple(t.shape)}" for n, t in tensors.items())
            raise DeltatuneError(f"the trainable-token rows of {self.param_name} need 'values' of shape {shape}; got "
                                 f"{got}: the artifact was made with other token_indices or another base model")
        with torch.no_grad():
            self.values.copy_(value.reshape(-1).to(self.values.dtype))

    def extra_repr(self) -> str:
        shown = ", ".join(map(str, self.tokens[:8])) + (", ..." if len(self.tokens) > 8 else "")
        return f"tokens=[{shown}], hidden={self.width}, sites={len(self.sites)}"


def input_embedding(model: nn.Module) -> tuple[str, nn.Module]:
    """(name, module) of the model's input embedding (``get_input_embeddings()``)."""
    embedding = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    name = next((n for n, m in model.named_modules() if m is embedding and embedding is not None), None)
    if name is None:
        raise DeltatuneError(f"{type(model).__name__} has no input embedding (get_input_embeddings()): name the "
                             "embedding with targets=[...], e.g. targets=['embed_tokens']")
    return name, embedding  # type: ignore[return-value]


def row_modules(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module]]:
    """The embeddings (or LM head) ``targets`` names, each checked to hold rows of tokens."""
    modules = select_modules(model, targets)
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    wrong = [n for n, m in modules if not (isinstance(m, nn.Embedding) or (m is head and isinstance(m, nn.Linear)))]
    if wrong:
        raise DeltatuneError(f"{wrong[0]} is a {type(model.get_submodule(wrong[0])).__name__}: trainable tokens take "
                             "the rows of an nn.Embedding (or of the LM head); narrow targets to embeddings")
    return modules


def token_forms(model: nn.Module, modules: list[tuple[str, nn.Module, list[int]]], *, init: bool = True
                ) -> dict[str, Form]:
    """One ``TokenRows`` per weight tensor among ``modules`` ((name, module, token ids)), named "<module>.weight",
    the input embedding first. A head tied to a targeted input embedding shares its form (its ids must be the
    embedding's); a tied head targeted without its embedding is refused."""
    embedding = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    forms: dict[str, Form] = {}
    done: dict[int, tuple[str, list[int]]] = {}
    for name, module, tokens in sorted(modules, key=lambda nmt: nmt[1] is not embedding):  # the embedding first
        if id(module.weight) in done:
            first, ids = done[id(module.weight)]
            if list(ids) != list(tokens):
                raise DeltatuneError(
                    f"{name} shares its weight with {first} (tied) but names other token ids ({tokens} vs {ids}): "
                    "one tensor has one set of trained rows; give both the same ids, or name the embedding only"
                )
            continue  # the head tied to an embedding already targeted: one tensor, one delta (PEFT's tied adapter)
        done[id(module.weight)] = (name, list(tokens))
        sites = sites_of(model, module.weight)
        if len(sites) > 1 and module is not embedding:
            others = sorted(names[id(m)] for m, _ in sites if m is not module)
            raise DeltatuneError(
                f"{name} shares its weight with {', '.join(others)} (tied): target the input embedding, whose rows "
                "then train in both (as PEFT ties its adapter), or untie the weights of the base model"
            )
        forms[f"{name}.weight"] = TokenRows(sites, tokens, init=init)
    return forms


def check_token_ids(tokens: object, what: str) -> None:
    """``tokens`` is a list of distinct token ids (ValueError naming ``what`` otherwise)."""
    if not isinstance(tokens, list | tuple):
        raise ValueError(f"{what}={tokens!r} must be a list of token ids")
    seen: set[int] = set()
    for t in tokens:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"{what} holds {t!r}: each must be a token id (a whole number >= 0)")
        if t in seen:
            raise ValueError(f"{what} names token {t} twice: each id may appear once")
        seen.add(t)
