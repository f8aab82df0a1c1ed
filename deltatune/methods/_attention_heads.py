"""Removing whole attention heads from BERT-style blocks (query / key / value and ``output.dense``), and where the
entries of a matrix that lost rows or columns land: the model surgery behind DSEE's head pruning."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from deltatune.core.targeting import layer_index
from deltatune.errors import DeltatuneError


@dataclass
class Attention:
    """A BERT-style attention block: ``self`` holds query/key/value, ``output.dense`` mixes the heads."""

    layer: int
    core: nn.Module
    out: nn.Module


def attention_blocks(model: nn.Module) -> list[Attention]:
    found = []
    for name, m in model.named_modules():
        core, out = m._modules.get("self"), m._modules.get("output")
        if (core is not None and out is not None and hasattr(core, "attention_head_size")
                and all(isinstance(getattr(core, a, None), nn.Linear) for a in ("query", "key", "value"))
                and isinstance(getattr(out, "dense", None), nn.Linear) and layer_index(name) is not None):
            found.append(Attention(layer_index(name), core, out))
    if len({a.layer for a in found}) != len(found):
        raise DeltatuneError("head pruning supports one attention block per layer (no cross-attention); set prune_heads=0")
    if not found:
        raise DeltatuneError(
            f"head pruning needs BERT-style attention (query/key/value and output.dense, as BERT, RoBERTa, "
            f"ELECTRA); {type(model).__name__} has none. Set prune_heads=0 and prune unstructured instead."
        )
    return found


def slice_linear(layer: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A frozen copy of ``layer`` keeping ``keep`` along ``dim`` (0: outputs, 1: inputs), same dtype/device.
    (transformers' prune_linear_layer makes an fp32 layer with trainable weights: wrong for a frozen base.)"""
    w = layer.weight.detach().index_select(dim, keep.to(layer.weight.device))
    # skip_init: no random init (a draw from the global RNG here would shift every later dropout mask)
    new = nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], bias=layer.bias is not None, device=w.device,
                             dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if layer.bias is not None:
            new.bias.copy_(layer.bias.detach()[keep.to(w.device)] if dim == 0 else layer.bias.detach())
    new.requires_grad_(False)
    return new


def cut_heads(model: nn.Module, positions: dict[int, list[int]]) -> dict[int, tuple[nn.Module, int, torch.Tensor]]:
    """Remove heads (current positions per layer) from the model; returns id(old module) -> (new module,
    dim cut, kept indices along it), for moving the forms that lived on the old modules."""
    replaced: dict[int, tuple[nn.Module, int, torch.Tensor]] = {}
    for att in attention_blocks(model):
        drop = sorted(set(positions.get(att.layer, [])))
        if not drop:
            continue
        heads, size = att.core.num_attention_heads, att.core.attention_head_size
        if drop[-1] >= heads or len(drop) >= heads:
            raise DeltatuneError(
                f"cannot remove heads {drop} of layer {att.layer}: it has {heads}; a layer keeps at least one"
            )
        kept_heads = [h for h in range(heads) if h not in drop]
        keep = torch.cat([torch.arange(h * size, (h + 1) * size) for h in kept_heads])
        for owner, attr, dim in ((att.core, "query", 0), (att.core, "key", 0), (att.core, "value", 0),
                                 (att.out, "dense", 1)):
            old = getattr(owner, attr)
            new = slice_linear(old, keep, dim)
            setattr(owner, attr, new)
            replaced[id(old)] = (new, dim, keep)
        att.core.num_attention_heads = len(kept_heads)
        att.core.all_head_size = len(kept_heads) * size
    return replaced


def remap_positions(indices: torch.Tensor, shape: tuple[int, int], dim: int, keep: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions in a (rows, cols) matrix after keeping ``keep`` along ``dim``: the new positions of
    the entries that survive, and which of the old ones do."""
    cols = shape[1]
    new_pos = torch.full((shape[dim],), -1, dtype=torch.long)
    new_pos[keep.cpu()] = torch.arange(keep.numel())
    idx = indices.long().cpu()
    r, c = idx // cols, idx % cols
    if dim == 0:
        r, new_cols = new_pos[r], cols
        alive = r >= 0
    else:
        c, new_cols = new_pos[c], keep.numel()
        alive = c >= 0
    return (r * new_cols + c)[alive].to(indices.device), alive


def original_ids(removed: list[int], heads_now: int) -> list[int]:
    """The original index of each head still present, given the original indices removed before."""
    total = heads_now + len(removed)
    return [h for h in range(total) if h not in set(removed)]
