"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the native loop: the frozen base and the delta sharded.

Under data parallelism the loop wraps the ``Tuned`` in DDP; with FSDP2 asked for (``DELTATUNE_FSDP=1`` under torchrun,
or ``accelerate launch`` with an FSDP config of ``fsdp_version: 2``) it shards instead, after the delta is attached:

- one FSDP unit per transformer block (``core/architectures.blocks``), holding the block's frozen tensors and the
  forms that *share* a tensor with it (an in-place form trains the block's own weight: a tensor lives in one unit);
- the root unit, the ``Tuned``: the rest of the model (embeddings, final norm, head) and every other form (LoRA's
  factors, adapters, prefixes: they live in ``Tuned.deltas``, not in the blocks). The root's tensors are gathered
  when the forward starts and stay whole until its backward ends, so every hook a form put into a block reads the
  whole factor; FSDP reduce-scatters (averages) their gradients as DDP all-reduces them.

Outside the forward the delta's parameters are ``DTensor`` shards. ``gathered`` puts whole copies in their place,
on every rank, for what needs the whole delta (the artifact, checkpoints, the divergence check), and puts the shards
back after; ``full_optimizer_state`` / ``shard_optimizer_state`` do the same for the optimizer's state, so a
checkpoint holds whole tensors in the format of a single process and resumes under any world size.

A policy's hooks see the shards: one that only reads gradients or switches ``requires_grad`` (FSDP2 copies the flag
onto the gathered tensor at every forward) works; one that rewrites its tensors must gather them whole and write its
rank's part back in place (SpIEL's regrowth, ``methods/spiel.py``), never replace ``.data`` of a shard.
A policy's ``state_dict`` is read inside ``gathered`` for checkpoints (a prefix's carries its MLP's tensors).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from deltatune.core import architectures
from deltatune.core.tuned import Tuned
from deltatune.errors import DeltatuneError

ENV = "DELTATUNE_FSDP"  # "1": shard with FSDP2 under torchrun (or the run config's train.fsdp)
MIXED_ENV = "DELTATUNE_FSDP_MIXED_PRECISION"  # "bf16": FSDP2 computes in bf16, keeps fp32 shards, reduces in fp32
TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class FsdpSettings:
    """``train.fsdp`` as a mapping (``true`` is all the defaults): how FSDP2 shards."""

    # bf16: FSDP2 computes in bf16 (MixedPrecisionPolicy param_dtype), keeps fp32 shards, reduces gradients in fp32;
    # null: fp32
    mixed_precision: str | None = None
    reshard_after_forward: bool = True  # free the gathered blocks after the forward (false: keep them for backward)

    def __post_init__(self) -> None:
        if self.mixed_precision not in (None, "bf16"):
            raise DeltatuneError(f"mixed_precision={self.mixed_precision!r}: FSDP2 here computes in bf16 or fp32; "
                                 "use bf16 or null")
        if not isinstance(self.reshard_after_forward, bool):
            raise DeltatuneError(f"reshard_after_forward={self.reshard_after_forward!r}: should be true or false")


def resolve(field: bool | FsdpSettings | None, world: int, environ: dict[str, str] | None = None
            ) -> FsdpSettings | None:
    """What the run shards with: the run config's ``train.fsdp`` (``true`` takes the environment's mixed precision
    and resharding variables, if any; a mapping is used as written), else the launcher's environment
    (``requested``); None: DDP, or one process. ``train.fsdp`` in a single process is ignored with a warning
    (as accelerate ignores its FSDP settings there): the same run config then trains on one process or many."""
    if world <= 1:
        if field:
            warnings.warn("train.fsdp is set, but this is a single process: FSDP2 shards only under torchrun / "
                          "accelerate launch with 2 or more processes; training unsharded", stacklevel=3)
        return None
    if isinstance(field, FsdpSettings):
        requested(environ)  # still refuse an accelerate FSDP version 1 config
        return field
    if field:
        env = dict(os.environ if environ is None else environ)
        return requested({**env, ENV: "1"})
    return requested(environ)


def requested(environ: dict[str, str] | None = None) -> FsdpSettings | None:
    """The FSDP2 settings the launcher's environment asks for, or None (data parallel: DDP); an accelerate DeepSpeed
    config is refused (the loop would otherwise train unsharded with DDP while the user asked for ZeRO).

    ``DELTATUNE_FSDP=1`` (torchrun), or accelerate's own variables (``accelerate launch --use_fsdp
    --fsdp_version 2``, or a config file with ``distributed_type: FSDP``); accelerate's FSDP version 1 is refused
    (the native loop shards with FSDP2 only). Mixed precision: ``DELTATUNE_FSDP_MIXED_PRECISION=bf16``, or
    accelerate's ``--mixed_precision bf16`` under its FSDP config."""
    env = os.environ if environ is None else environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "").strip().lower() in TRUE:
        raise DeltatuneError(
            "accelerate asks for DeepSpeed, which deltatune's native loop does not run: shard with FSDP2 "
            "(examples/accelerate/fsdp2.yaml or train.fsdp: true), or train through DeltaTuneTrainer (docs/distributed.md)")
    ours = env.get(ENV, "").strip().lower() in TRUE
    accelerate = env.get("ACCELERATE_USE_FSDP", "").strip().lower() in TRUE
    if not (ours or accelerate):
        return None
    if accelerate and not ours and env.get("FSDP_VERSION", "1").strip() != "2":
        raise DeltatuneError(
            f"accelerate asks for FSDP version {env.get('FSDP_VERSION', '1')}, but deltatune's loop shards with FSDP2 "
            "only: set fsdp_version: 2 in the accelerate config (or --fsdp_version 2)"
        )
    mixed = env.get(MIXED_ENV, "").strip().lower() or None
    if mixed is None and accelerate:
        mixed = env.get("ACCELERATE_MIXED_PRECISION", "").strip().lower() or None
    if mixed in ("no", "fp32", "none"):
        mixed = None
    if mixed not in (None, "bf16"):
        raise DeltatuneError(f"FSDP mixed precision {mixed!r} is not supported; use bf16 or no")
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower()
    return FsdpSettings(mixed_precision=mixed, reshard_after_forward=reshard not in ("false", "0", "no"))


def shard(tuned: Tuned, settings: FsdpSettings) -> Tuned:
    """Apply FSDP2 to ``tuned`` in place (a unit per block, with the forms that share its tensors; the root holds
    the rest); every rank must call it, with the same delta attached. Returns ``tuned``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if tuned.merged:
        raise DeltatuneError("a merged delta cannot be sharded for training; unmerge first")
    # the base's fingerprint hashes whole tensors: computed (and cached) while they are still whole
    tuned.delta.fingerprint()
    if settings.mixed_precision == "bf16":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    kwargs: dict[str, Any] = {"mp_policy": mp, "reshard_after_forward": settings.reshard_after_forward}
    forms = list(tuned.deltas.values())
    claimed: set[int] = set()
    for block in architectures.blocks(tuned.model):
        inside = {id(p) for p in block.module.parameters()}
        sharing = [f for f in forms if id(f) not in claimed and any(id(p) in inside for p in f.parameters())]
        claimed |= {id(f) for f in sharing}
        fully_shard([block.module, *sharing] if sharing else block.module, **kwargs)
    fully_shard(tuned, **kwargs)
    return tuned


def is_sharded(tuned: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(tuned, FSDPModule)


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


@contextlib.contextmanager
def gathered(tuned: Tuned) -> Iterator[None]:
    """Whole copies of the delta's sharded parameters in their place, on every rank (a collective: every rank
    enters it, in the same order), so ``tuned.save``, ``delta_state_dict`` and checkpoints read the whole delta; the
    shards are put back on exit. Writes to the copies inside are not kept (read only, or load a delta with
    ``load_delta_state_dict`` on a process that saves it)."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for module in tuned.deltas.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and _is_dtensor(p):
                    whole = nn.Parameter(p.full_tensor().detach().clone(), requires_grad=p.requires_grad)
                    module._parameters[name] = whole
                    swapped.append((module, name, p))
        yield
    finally:
        for module, name, p in reversed(swapped):
            module._parameters[name] = p


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor gathered whole (a collective: every rank)."""
    state = optimizer.state_dict()  # its per-tensor dicts are the optimizer's own: copied, never written
    state["state"] = {key: {name: v.full_tensor() if _is_dtensor(v) else v for name, v in sorted(entry.items())}
                      for key, entry in sorted(state["state"].items())}
    return state


def shard_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> dict[str, Any]:
    """A whole-tensor optimizer state (a checkpoint's) cut to this rank's shards of the optimizer's parameters."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {"state": {}, "param_groups": saved["param_groups"]}
    for key, entry in saved["state"].items():
        p = params[int(key)]
        if not _is_dtensor(p):
            out["state"][key] = entry
            continue
        out["state"][key] = {
            name: distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements)
            if torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape) and v.dim() > 0 else v
            for name, v in entry.items()
        }
    return out
