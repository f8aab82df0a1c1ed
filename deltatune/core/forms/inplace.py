"""In-place dense form: the base tensor itself trains; ΔW = W − W0 exists only when asked for.

Full-parameter methods (full fine-tuning, layer-wise policies) would pay for a second copy of every
tensor with the ``Dense`` form (Δ next to W0, and W0 + Δ rebuilt at every forward). Here the optimizer
updates W directly, as plain fine-tuning does, and W0 is copied only for the tensors that actually
can receive a gradient, at the first forward that builds one (before any optimizer step writes them). A tensor
that never trains costs nothing and is absent from the artifact.

W0 is the weight as it was at attach: a write to W before the copy (a hand edit, ``load_state_dict`` on the model
after attaching) would make the copy a base that never existed, and the artifact's fingerprint would name it. So
attach records W's identity (its version counter, and the content hash the fingerprint uses) and the copy is
refused when W was written since. The counter is free to check; the hash settles a write that left the values as
they were (DDP's broadcast at wrap moves the counter of every parameter). Copying W0 at attach instead would
double the memory of full fine-tuning.

The artifact is the same as ``Dense``'s (``delta`` = W − W0), so either form loads it. Attached means
the weight holds W0 + Δ; ``detach`` puts W0 back and keeps Δ aside, ``attach`` adds it again;
``merge`` / ``unmerge`` only change the bookkeeping, since the weight already is the merged one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from deltatune.core.artifact import tensor_hash
from deltatune.core.forms.base import WeightDelta
from deltatune.errors import DeltatuneError


class InPlace(WeightDelta):
    kind = "dense"

    def __init__(self, sites: list[tuple[nn.Module, str]], param_name: str) -> None:
        super().__init__(sites, param_name)
        weight = self.base
        if not isinstance(weight, nn.Parameter):
            raise DeltatuneError(f"{param_name!r} is not a parameter; an in-place delta trains parameters only")
        self.weight = weight  # the same Parameter as the model's: the optimizer trains the model's tensor
        # plain attributes, not buffers: DDP would broadcast every buffer at every forward; _apply moves them
        self.w0: torch.Tensor | None = None  # W0, copied at the first forward that can train W
        self._parked: torch.Tensor | None = None  # Δ while detached
        self._settled_version = -1
        self._remember_base()

    def _remember_base(self) -> None:
        """W's identity now, what ``snapshot`` checks W0 against (the version counter moves at every write)."""
        self._base_version = self.weight._version
        self._base_dtype = self.weight.dtype
        self._base_hash = tensor_hash(self.weight)

    def _check_base_unwritten(self) -> None:
        if self.weight._version == self._base_version or tensor_hash(self.weight) == self._base_hash:
            return
        raise DeltatuneError(
            f"{self.param_name} was written after the in-place delta was attached and before training started, so "
            "its W0 (the base the artifact records) would be a model that never existed; change or load the model's "
            "weights before attaching (dt.attach), or attach again to the changed model"
        )

    def _apply(self, fn: Any, recurse: bool = True) -> InPlace:  # .to(device) / .half() move W0 along
        super()._apply(fn, recurse)
        self.w0 = None if self.w0 is None else fn(self.w0)
        self._parked = None if self._parked is None else fn(self._parked)
        if self.w0 is None and self.weight._version == self._base_version and self.weight.dtype != self._base_dtype:
            self._remember_base()  # converted, not written (the counter stayed): the hash reads the new bits
        return self

    # -- W0 snapshot ------------------------------------------------------------------------
    @property
    def touched(self) -> bool:
        return self.w0 is not None

    def snapshot(self) -> None:
        """Copy W0 now (a no-op once copied). Called by the first forward that can train W, and before a load
        writes W; refused when W was written since attach."""
        if self.w0 is None:
            self._check_base_unwritten()
            self.w0 = self.weight.detach().clone()

    # -- the delta ---------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        if self._parked is not None:
            return self._parked
        if self.w0 is None:
            return torch.zeros_like(self.weight)
        return self.weight.detach() - self.w0

    def settle(self, force: bool = False) -> None:
        """Round W onto a point where W == W0 + (W − W0) holds exactly in the weight's dtype, so a model
        loaded from the artifact (which computes W0 + Δ) is bit-identical to this one. Each round changes
        W by at most one rounding; one or two rounds reach the fixed point."""
        if self.w0 is None or not self.attached:
            return
        if not force and self.weight._version == self._settled_version:
            return
        with torch.no_grad():
            for _ in range(4):
                again = self.w0 + (self.weight - self.w0)
                if torch.equal(again, self.weight):
                    break
                self.weight.copy_(again)
        self._settled_version = self.weight._version

    def _forward_pre_hook(self, module: nn.Module, args: Any) -> None:
        if self.w0 is None and self.weight.requires_grad and torch.is_grad_enabled():
            self.snapshot()  # a forward that can produce W's gradient: no optimizer step has written W yet
        # after an optimizer step wrote W (its version counter moved), settle it: the model always computes
        # with a W that its artifact reproduces bit for bit
        self.settle()

    # the hook only readies the weight and never reads the input: a caller that reads the weight itself (the
    # chunked loss's fused head, deltatune.data.lm_loss) may run it once instead of calling the module
    _forward_pre_hook.prepares_weight = True  # type: ignore[attr-defined]

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        # forced: a fused optimizer kernel (the Trainer's default AdamW) may write W without moving its version
        self.settle(force=True)
        delta = self.delta_weight().detach()
        return {"delta": delta.clone()} if self.touched and bool(delta.any()) else {}

    def stored_tensors_names(self) -> list[str]:
        return ["delta"]

    def optional_tensors(self) -> set[str]:
        return {"delta"}

    def load_stored(self, tensors: dict[str, torch.Tensor]) -> None:
        if "delta" not in tensors:
            return
        delta = tensors["delta"]
        if delta.shape != self.weight.shape:
            raise DeltatuneError(
                f"tensor 'delta' has shape {tuple(delta.shape)} in the artifact but the model needs "
                f"{tuple(self.weight.shape)}: the artifact was made with another config or base model"
            )
        self.snapshot()
        delta = delta.to(self.weight.dtype)
        if not self.attached:  # kept aside until attach() adds it
            self._parked = delta.clone()
            return
        with torch.no_grad():
            self.weight.copy_(self.w0 + delta)

    def base_tensors(self) -> dict[str, torch.Tensor]:
        return {"": self.w0 if self.w0 is not None else self.weight}

    def num_trainable(self) -> int:
        return self.weight.numel() if self.weight.requires_grad else 0

    # -- checkpoints: the trained W of touched tensors only (W0 comes from the fresh base on resume) ----
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        if self.touched:
            destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        key = prefix + "weight"
        if key in state_dict:
            self.snapshot()
            with torch.no_grad():
                self.weight.copy_(state_dict[key])

    # -- effect on the model -----------------------------------------------------------------
    def attach(self) -> None:
        if self.attached:
            return
        if self._parked is not None:
            with torch.no_grad():
                self.weight.copy_(self.w0 + self._parked)
            self._parked = None
        self._install_hooks()
        self.attached = True

    def _install_hooks(self) -> None:
        self._hooks = [module.register_forward_pre_hook(self._forward_pre_hook) for module, _ in self._sites]

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def detach(self) -> None:
        if not self.attached:
            return
        self._remove_hooks()
        if self.w0 is not None:
            with torch.no_grad():
                self._parked = self.weight.detach() - self.w0
                self.weight.copy_(self.w0)
        self.attached = False

    def merge(self) -> None:
        if self.merged:
            raise DeltatuneError("this delta is already merged; unmerge it before merging again")
        if not self.attached:
            self.attach()
        self.settle(force=True)
        self._remove_hooks()  # a merged model is a plain model: no hooks left on it
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            raise DeltatuneError("this delta is not merged; there is nothing to unmerge")
        self._install_hooks()
        self.merged = False
