"""Several named deltas on one loaded model: ``tuned.add(name, artifact)``, ``tuned.use(name)`` and per-row
selection in one batch with ``tuned(**batch, adapter_names=[...])`` (serving several tenants, as PEFT users do).

The delta a ``Tuned`` was made with is named ``"default"`` (PEFT's name). ``add`` loads another delta onto the
same model the way ``dt.load`` does (its base fingerprint is checked) and keeps it *parked*: built, frozen, not
attached. ``use(name)`` swaps which delta is the Tuned's own (its forms, method, config and policy; ``save``,
``merge`` and training then act on it) and attaches it; ``use(None)`` takes every delta off, so the model
computes the base. This works for every form, weight-side or not.

Mixed batches: with ``adapter_names`` (one name per row; ``"__base__"`` or None for the base model) the delta in
use is taken off for that call, and every named delta's forms act through one forward hook per module that adds
``form.output_delta(module, x[rows])`` to the rows of that delta only. So each row gets exactly what its own delta
alone computes. That needs the *output path* (a form that computes its contribution from the module's input:
low-rank forms on Linear / GPT-2 Conv1D / Embedding); a delta that changes the weight itself (dense, sparse) or the
activations elsewhere cannot differ per row, and is refused with a clear message: serve it with ``use(name)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from deltatune.core.delta import Delta
from deltatune.core.forms.base import Form, WeightDelta
from deltatune.core.tuned import DeltaSource, Tuned, _module_key, delta_of
from deltatune.errors import DeltatuneError

BASE = "__base__"  # PEFT's name for "no adapter" in adapter_names
DEFAULT = "default"  # the name of the delta the Tuned was made with (PEFT's first adapter)


@dataclass
class Entry:
    """A named delta: the Tuned holds it while it is in use, the parking while it is not."""

    delta: Delta
    set_up: bool = True  # whether policy.setup(tuned) ran (a parked delta's policy is set up at its first use)
    trainable: dict[int, bool] = field(default_factory=dict)  # requires_grad of its parameters while parked


class Tenants(nn.Module):
    """The named deltas of one ``Tuned`` (``tuned.tenants``; made by the first ``add``). Parked deltas' tensors
    live in ``parked`` so ``.to(device)`` moves them with the model."""

    def __init__(self, tuned: Tuned) -> None:
        super().__init__()
        object.__setattr__(self, "tuned", tuned)  # a back-reference, not a submodule
        self.parked = nn.ModuleDict()
        self.entries: dict[str, Entry] = {DEFAULT: Entry(tuned.delta)}
        self.current = DEFAULT  # the delta the Tuned holds now

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    @property
    def active(self) -> str | None:
        """The delta acting on the model now (None: the base model)."""
        return self.current if self.tuned.attached else None

    def forms_of(self, name: str) -> dict[str, Form]:
        return self.entries[name].delta.forms  # the one in use is the Tuned's own Delta: always current

    def _check(self, what: str) -> None:
        if self.tuned.merged:
            raise DeltatuneError(f"the delta in use is merged into the weights: unmerge() before {what}")

    # -- add ----------------------------------------------------------------------------------------
    def add(self, name: str, delta: DeltaSource) -> None:
        self._check("adding a delta")
        if not isinstance(name, str) or not name or name == BASE or "." in name:
            raise DeltatuneError(f"a delta's name must be a non-empty string without dots, not {name!r} "
                                 f"({BASE!r} names the base model)")
        if name in self.entries:
            raise DeltatuneError(f"a delta named {name!r} is already on this model ({self.names}); pick another name")
        if delta is self.tuned:
            raise DeltatuneError("this Tuned's own delta is already on the model, as 'default'")
        tuned = self.tuned
        # build with the model as it is without any delta: parametrisations rename the tensors builders look for
        on = self.active
        self._take_off()
        try:
            added = delta_of(delta).build(tuned.model, shapes=tuned.delta.base_shapes,
                                          fix="Add deltas of the model they were made for (see `deltatune inspect`).")
        finally:
            if on is not None:
                self._put_on()
        self._park(name, Entry(added, set_up=False))

    # -- use ----------------------------------------------------------------------------------------
    def use(self, name: str | None) -> None:
        self._check("switching deltas")
        if name == BASE:
            name = None
        if name is not None and name not in self.entries:
            raise DeltatuneError(f"no delta named {name!r} on this model; it has {self.names} (add it first)")
        self._take_off()
        if name is not None and name != self.current:
            self._swap(name)
        if name is not None:
            self._put_on()

    def check_in_use(self) -> None:
        """Called by ``Tuned.merge``: after ``use(None)`` there is no delta to merge."""
        if self.active is None:
            raise DeltatuneError(f"no delta is in use (use(None) was called): use(name) one of {self.names} "
                                 "before merging")

    # -- mixed batches ------------------------------------------------------------------------------
    def mixed(self, adapter_names: Sequence[str | None], run: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``run(*args, **kwargs)`` (the model's forward or generate) with row i computed by delta
        ``adapter_names[i]`` alone."""
        with self.rows(adapter_names):
            return run(*args, **kwargs)

    @contextlib.contextmanager
    def rows(self, adapter_names: Sequence[str | None]) -> Iterator[None]:
        self._check("serving a mixed batch")
        groups = self._groups(adapter_names)
        by_module: dict[int, tuple[nn.Module, list[tuple[WeightDelta, list[int]]]]] = {}
        for name, rows in groups.items():
            for fname, form in self.forms_of(name).items():
                if not (isinstance(form, WeightDelta) and form.uses_output_path()):
                    raise DeltatuneError(
                        f"adapter_names selects deltas per row, which needs deltas computed from a layer's input "
                        f"(low-rank forms): {name!r} has a {form.kind} delta at {fname} that changes "
                        f"{'the weight itself' if isinstance(form, WeightDelta) else 'activations'}. Serve it with "
                        f"tuned.use({name!r}), one batch per delta"
                    )
                module = form.sites[0][0]
                by_module.setdefault(id(module), (module, []))[1].append((form, rows))
        n = len(adapter_names)
        on = self.active
        self._take_off()
        handles = [module.register_forward_hook(_row_hook(parts, n)) for module, parts in by_module.values()]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            if on is not None:
                self._put_on()

    def _groups(self, adapter_names: Sequence[str | None]) -> dict[str, list[int]]:
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence) or not adapter_names:
            raise DeltatuneError("adapter_names takes one delta name per row of the batch, e.g. "
                                 "['default', 'b', '__base__']")
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(adapter_names):
            if name is None or name == BASE:
                continue
            if name not in self.entries:
                raise DeltatuneError(f"adapter_names[{i}] = {name!r} is not on this model; it has {self.names} "
                                     f"and {BASE!r} (or None) for the base model")
            groups.setdefault(name, []).append(i)
        return groups

    # -- moving deltas between the Tuned and the parking ---------------------------------------------
    def _take_off(self) -> None:
        self.tuned.detach()

    def _put_on(self) -> None:
        tuned = self.tuned
        entry = self.entries[self.current]
        tuned.reattach()
        if not entry.set_up:
            entry.set_up = True
            entry.delta.policy.setup(tuned)

    def _park(self, name: str, entry: Entry) -> None:
        forms = entry.delta.forms
        params = {id(p): p for f in forms.values() for p in f.parameters()}
        entry.trainable = {k: p.requires_grad for k, p in params.items()}
        for p in params.values():
            p.requires_grad_(False)  # a parked delta must not train (nor reach an optimizer)
        self.parked[name] = nn.ModuleDict({_module_key(k): f for k, f in forms.items()})
        self.entries[name] = entry

    def _swap(self, name: str) -> None:
        """Make delta ``name`` the Tuned's own (detached); park the one it held."""
        self._park(self.current, self.entries[self.current])
        new = self.entries[name]
        del self.parked[name]
        for p in {id(p): p for f in new.delta.forms.values() for p in f.parameters()}.values():
            p.requires_grad_(new.trainable.get(id(p), p.requires_grad))
        self.tuned.swap_delta(new.delta)
        self.current = name


def _row_hook(parts: list[tuple[WeightDelta, list[int]]], n: int) -> Callable[..., torch.Tensor]:
    """A forward hook adding each form's contribution to its own rows. Generation may run more rows than names
    (beams, num_return_sequences: each row repeated in place), so row i of the names covers rows
    i·k … i·k + k − 1."""
    cache: dict[tuple[int, torch.device], list[torch.Tensor]] = {}

    def indices(rows: int, device: torch.device) -> list[torch.Tensor]:
        key = (rows, device)
        if key not in cache:
            if rows % n:
                raise DeltatuneError(f"the batch has {rows} rows but adapter_names has {n} names: give one per row")
            k = rows // n
            cache[key] = [torch.tensor([i * k + j for i in ix for j in range(k)], device=device) for _, ix in parts]
        return cache[key]

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        out = output
        for (form, _), idx in zip(parts, indices(x.shape[0], x.device), strict=True):
            delta = form.output_delta(module, x.index_select(0, idx))
            # as WeightDelta's own hook: add at the higher precision, round once
            out = out.index_copy(0, idx, (output.index_select(0, idx) + delta).to(output.dtype))
        return out

    return hook


def tenants_of(tuned: Tuned) -> Tenants:
    """The tuned model's ``Tenants`` (made at the first call)."""
    found = tuned._modules.get("tenants")
    if found is None:
        if tuned.merged:
            raise DeltatuneError("the delta is merged into the weights: unmerge() before adding or switching deltas")
        found = Tenants(tuned)
        tuned.tenants = found
    return found  # type: ignore[return-value]
