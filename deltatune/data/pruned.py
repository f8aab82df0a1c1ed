"""Depth-pruned copies of a model: ``dt.models.load("smollm2-135m", keep_layers=range(10))``.

Only one size of SmolLM2 can be installed here, and weak-to-strong methods (logit fusion, ``docs/fusion.md``) need a
weaker model with the same tokenizer. Keeping the first k transformer blocks (and the embeddings, final norm and
head) gives one, in the spirit of depth-pruning studies; it is a small-scale analogue, not a trained smaller model.

The copy is named ``NAME@layers=SPEC`` (``smollm2-135m@layers=0-9``), which becomes the model's ``_name_or_path`` and
so the base name an artifact's fingerprint records: an artifact trained on the pruned model loads it again by name,
and the tensor hashes of the fingerprint tell it from the full model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch.nn as nn

from deltatune.errors import DeltatuneError

_PRUNED = re.compile(r"^(?P<base>.+)@layers=(?P<spec>[0-9][0-9,\-]*)$")


def parse_layers(spec: str) -> list[int]:
    """``"0-3,8"`` → ``[0, 1, 2, 3, 8]``."""
    keep: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise DeltatuneError(f"layers={spec!r}: write block indices and ranges, e.g. 0-9 or 0-5,28,29")
        keep.extend(range(int(lo), int(hi or lo) + 1))
    return keep


def spec(keep: Iterable[int]) -> str:
    """The canonical ranges of sorted block indices: ``[0, 1, 2, 5]`` → ``"0-2,5"``."""
    parts: list[str] = []
    run: list[int] = []
    for i in sorted(set(keep)):
        if run and i != run[-1] + 1:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(i)
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def split(name: str) -> tuple[str, list[int] | None]:
    """``"smollm2-135m@layers=0-9"`` → ``("smollm2-135m", [0, ..., 9])``; a plain name → ``(name, None)``."""
    m = _PRUNED.match(name)
    if m is None:
        return name, None
    return m["base"], parse_layers(m["spec"])


def name(base: str, keep: Iterable[int]) -> str:
    return f"{base}@layers={spec(keep)}"


def checked(keep: Iterable[int] | None, from_name: list[int] | None, base: str) -> list[int] | None:
    """The blocks to keep, from ``keep_layers=`` or the name (both given: they must agree)."""
    given = None if keep is None else sorted({int(i) for i in keep})
    named = None if from_name is None else sorted(set(from_name))
    if given is not None and named is not None and given != named:
        raise DeltatuneError(f"keep_layers={spec(given)} disagrees with the name's @layers={spec(named)} for {base}: "
                             "give one of them")
    return given if given is not None else named


def prune(model: nn.Module, keep: list[int]) -> None:
    """Keep blocks ``keep`` of ``model`` (in place): the longest ``nn.ModuleList`` is the block list, each kept
    block's attention is renumbered (its ``layer_idx`` addresses the KV cache) and the config follows."""
    best: tuple[nn.Module, str, nn.ModuleList] | None = None
    for parent in model.modules():
        for attr, child in parent.named_children():
            if isinstance(child, nn.ModuleList) and len(child) and (best is None or len(child) > len(best[2])):
                best = (parent, attr, child)
    if best is None:
        raise DeltatuneError(f"{type(model).__name__} has no list of transformer blocks to prune")
    parent, attr, layers = best
    if not keep or keep[-1] >= len(layers) or keep[0] < 0:
        raise DeltatuneError(f"keep_layers={spec(keep)}: {type(model).__name__} has blocks 0-{len(layers) - 1}; "
                             "keep at least one of them")
    kept = nn.ModuleList([layers[i] for i in keep])
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    setattr(parent, attr, kept)
    config = model.config
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == len(layers):
        config.layer_types = [types[i] for i in keep]
    config.num_hidden_layers = len(keep)
