"""Decoding-time transfer: a large, untouched model steered by small experts through their logits (``dt.fuse``).

Spec: ``shared/methods/logit-fusion.md`` (Fan et al., "On Giant's Shoulders: Effortless Weak to Strong by Dynamic
Logits Fusion", NeurIPS 2024; no public code) and ``docs/fusion.md``. At every position

    P_α = softmax(z_L + Σ_t α_t (z_t − z_S))

with z_L the large model's logits, z_S the small base's and z_t expert t's (the small base with delta t). A fixed α is
proxy tuning (α = 1, one expert); ``alpha="dynamic"`` chooses α per position and per expert by a KL-constrained
problem (``kl_constraints``, the spec's reconstruction; ``objective=`` takes another): the large model should move
from its base about as far as each expert moved from the small base, KL(P_α‖P_L) ≈ KL(P_t‖P_S), and stay as far from
the expert as the two bases are from each other, KL(P_α‖P_t) ≈ KL(P_L‖P_S). The solver is a grid over [0, α_max]
(one expert) or coordinate descent over the same grid (several), ties going to the smaller α.

The small base and its experts are one model in memory: the experts are named deltas on it (``Tuned.add``), and one
forward computes the base and every expert row by row when their forms allow it (low-rank forms: ``adapter_names``),
else one forward per expert with ``use(name)``. Each model keeps its own KV cache during ``generate``.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltatune.core import artifact
from deltatune.core.forms.base import WeightDelta
from deltatune.core.tenants import BASE, tenants_of
from deltatune.core.tuned import Tuned, load
from deltatune.errors import DeltatuneError

ALPHA_MAX = 2.0  # the spec's grid: 0 … 2 in steps of 0.05 [inferred there]
ALPHA_STEP = 0.05
SWEEPS = 3  # coordinate-descent sweeps over the experts (several experts)
_CANDIDATE_ELEMENTS = 2**25  # candidates × positions × vocabulary evaluated at once (128 MiB of float32)


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(P‖Q) over the last dimension from log-probabilities; 0·log 0 = 0 (a −inf entry of P contributes
    nothing, a −inf entry of Q under P's mass gives +inf)."""
    p = p_log.exp()
    terms = p * (p_log - q_log)
    return torch.where(p > 0, terms, torch.zeros_like(terms)).sum(-1)


@dataclass
class FusionStep:
    """The log-probabilities of one batch of positions (n, V): the large model, the small base and each expert
    (T, n, V), with the KL targets of the spec's constraints computed once."""

    large: torch.Tensor
    small: torch.Tensor
    experts: torch.Tensor
    _cache: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def shift_targets(self) -> torch.Tensor:
        """KL(P_t ‖ P_S), (T, n): how far each expert moved from the small base."""
        if "shift" not in self._cache:
            self._cache["shift"] = kl(self.experts, self.small.unsqueeze(0))
        return self._cache["shift"]

    @property
    def gap_target(self) -> torch.Tensor:
        """KL(P_L ‖ P_S), (n,): how far apart the two bases are."""
        if "gap" not in self._cache:
            self._cache["gap"] = kl(self.large, self.small)
        return self._cache["gap"]


Objective = Callable[[torch.Tensor, FusionStep], torch.Tensor]


def kl_constraints(fused: torch.Tensor, step: FusionStep) -> torch.Tensor:
    """The spec's objective for candidates ``fused`` (G, n, V) of log P_α: Σ_t (KL(P_α‖P_L) − KL(P_t‖P_S))² +
    (KL(P_α‖P_t) − KL(P_L‖P_S))², (G, n)."""
    shift = kl(fused, step.large.unsqueeze(0))  # (G, n)
    loss = torch.zeros_like(shift)
    for t in range(step.experts.shape[0]):
        gap = kl(fused, step.experts[t].unsqueeze(0))
        loss = loss + (shift - step.shift_targets[t]) ** 2 + (gap - step.gap_target) ** 2
    return loss


def grid(alpha_max: float = ALPHA_MAX, step: float = ALPHA_STEP) -> torch.Tensor:
    """0, step, …, alpha_max (float64 steps, so 1.0 is on the grid exactly)."""
    if not (alpha_max > 0 and step > 0):
        raise DeltatuneError(f"alpha_max={alpha_max} and alpha_step={step} must both be positive")
    n = int(math.floor(alpha_max / step + 1e-9))
    return torch.arange(n + 1, dtype=torch.float64) * step


def solve(large: torch.Tensor, small: torch.Tensor, experts: torch.Tensor, *, objective: Objective = kl_constraints,
          alphas: torch.Tensor | None = None, sweeps: int = SWEEPS) -> torch.Tensor:
    """The per-position weights (n, T) minimising ``objective`` over the grid ``alphas``, for logits ``large``,
    ``small`` (n, V) and ``experts`` (T, n, V). One expert: an exhaustive grid search; several: coordinate descent
    from α = 0, ``sweeps`` passes over the experts. Ties (within float noise) go to the smaller α."""
    alphas = grid() if alphas is None else alphas
    lz, sz, ez = large.float(), small.float(), experts.float()
    n, vocab = lz.shape
    T = ez.shape[0]
    step = FusionStep(F.log_softmax(lz, -1), F.log_softmax(sz, -1), F.log_softmax(ez, -1))
    directions = ez - sz.unsqueeze(0)  # (T, n, V)
    g = alphas.to(lz.dtype).to(lz.device)
    chosen = torch.zeros(n, T, dtype=lz.dtype, device=lz.device)
    rows = max(1, _CANDIDATE_ELEMENTS // (len(g) * vocab))
    # the chunks of positions, each with its KL targets computed once (they do not depend on α) for every sweep
    chunks = [(slice(lo, lo + rows), FusionStep(step.large[lo:lo + rows], step.small[lo:lo + rows],
                                                step.experts[:, lo:lo + rows])) for lo in range(0, n, rows)]
    for _ in range(sweeps if T > 1 else 1):
        for t in range(T):
            for sl, part in chunks:
                others = lz[sl] + torch.einsum("nt,tnv->nv", chosen[sl], directions[:, sl]) \
                    - chosen[sl, t:t + 1] * directions[t, sl]
                fused = F.log_softmax(others.unsqueeze(0) + g.view(-1, 1, 1) * directions[t, sl].unsqueeze(0), -1)
                loss = objective(fused, part)  # (G, rows)
                best = loss.min(0).values
                tol = 1e-9 * (1.0 + best.abs())
                first = (loss <= best + tol).float().argmax(0)  # the smallest α within float noise of the minimum
                chosen[sl, t] = g[first]
    return chosen


@dataclass
class FusedOutput:
    """``logits``: the fused log-probabilities (batch, kept positions, V); ``alpha``: the weights used
    (batch, kept positions, T)."""

    logits: torch.Tensor
    alpha: torch.Tensor


class Fused(nn.Module):
    """A large model steered by small experts (see the module docstring); made by ``dt.fuse``.

    ``forward`` gives fused log-probabilities (so ``task.evaluate`` scores label words through it), ``generate``
    decodes from the fused distribution. ``alpha_log`` holds the weights used: one (batch, T) tensor per step of
    the last ``generate``, or one (batch, kept positions, T) tensor per ``forward`` since then."""

    def __init__(self, large: nn.Module, small: Tuned, expert_names: Sequence[str],
                 alpha: str | float | Sequence[float] = "dynamic", *, objective: Objective = kl_constraints,
                 alpha_max: float = ALPHA_MAX, alpha_step: float = ALPHA_STEP) -> None:
        super().__init__()
        self.large = large
        self.small = small
        self.expert_names = list(expert_names)
        self.objective = objective
        self.alphas = grid(alpha_max, alpha_step)
        self.fixed = _fixed_alpha(alpha, len(self.expert_names))
        self.config = _unwrap(large).config  # tasks read it (pad ids, model type) as from any model
        self.mixed = _mixable(small, self.expert_names)
        self.alpha_log: list[torch.Tensor] = []
        _check_vocabularies(large, small)

    # -- logits of every model -------------------------------------------------------------------
    def _small_logits(self, caches: list[Any] | None, **inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The small base's logits and each expert's (T, ...), from one forward with a row per member when the
        experts' forms allow it, else one forward per member (``use(name)``)."""
        members: list[str | None] = [None, *self.expert_names]
        if self.mixed:
            b = inputs["input_ids"].shape[0]
            stacked = {k: v.repeat(len(members), *([1] * (v.dim() - 1))) if torch.is_tensor(v) else v
                       for k, v in inputs.items()}
            names = [BASE if m is None else m for m in members for _ in range(b)]
            extra = {"past_key_values": caches[0]} if caches is not None else {}
            logits = self.small(**stacked, **extra, adapter_names=names).logits
            parts = logits.view(len(members), b, *logits.shape[1:])
            return parts[0], parts[1:]
        outs = []
        current = tenants_of(self.small).active
        try:
            for i, m in enumerate(members):
                self.small.use(m)
                extra = {"past_key_values": caches[i]} if caches is not None else {}
                outs.append(self.small(**inputs, **extra).logits)
        finally:
            self.small.use(current)
        return outs[0], torch.stack(outs[1:])

    def _fuse(self, large: torch.Tensor, small: torch.Tensor, experts: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused log-probs and weights for logits (..., V) and experts (T, ..., V)."""
        shape = large.shape[:-1]
        lz, sz = large.float().reshape(-1, large.shape[-1]), small.float().reshape(-1, small.shape[-1])
        ez = experts.float().reshape(experts.shape[0], -1, experts.shape[-1])
        if self.fixed is not None:
            alpha = self.fixed.to(lz).expand(lz.shape[0], -1)
        else:
            alpha = solve(lz, sz, ez, objective=self.objective, alphas=self.alphas)
        fused = lz + torch.einsum("nt,tnv->nv", alpha, ez - sz.unsqueeze(0))
        return F.log_softmax(fused, -1).view(*shape, -1), alpha.view(*shape, -1)

    # -- a forward ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, logits_to_keep: int = 0, use_cache: bool = False,
                **kwargs: Any) -> FusedOutput:
        """Fused log-probabilities at every position (or the last ``logits_to_keep``); no cache."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "logits_to_keep": logits_to_keep or None, "use_cache": False, **kwargs}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        large = self.large(**inputs).logits
        small, experts = self._small_logits(None, **inputs)
        fused, alpha = self._fuse(large, small, experts)
        self.alpha_log.append(alpha.detach())
        return FusedOutput(fused, alpha)

    # -- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 64, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True, streamer: Any = None
                 ) -> torch.Tensor:
        """Decode from the fused distribution (greedy, or sampling with temperature / top-p applied after fusion);
        stops a row at an EOS of the fused choice. Left-padded batches: positions follow the attention mask, as
        transformers' ``generate`` does. ``use_cache=False`` recomputes every step from the whole sequence."""
        from transformers import DynamicCache

        if max_new_tokens < 1:
            raise DeltatuneError(f"max_new_tokens={max_new_tokens}: must be at least 1")
        ids = input_ids
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(ids.dtype)
        eos = _token_set(eos_token_id if eos_token_id is not None else self.config.eos_token_id)
        pad = pad_token_id if pad_token_id is not None else self.config.pad_token_id
        pad = pad if pad is not None else (min(eos) if eos else 0)
        n_small = 1 if self.mixed else 1 + len(self.expert_names)
        caches = ([DynamicCache(config=_unwrap(self.large).config)],
                  [DynamicCache(config=_unwrap(self.small).config) for _ in range(n_small)]) if use_cache else None
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        self.alpha_log = []
        step_ids, seen = ids, 0
        if streamer is not None:
            streamer.put(ids.cpu())
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            inputs = {"input_ids": step_ids, "attention_mask": mask, "position_ids": positions[:, seen:],
                      "use_cache": use_cache}
            large = self.large(**inputs, **({"past_key_values": caches[0][0]} if caches else {})).logits[:, -1]
            small, experts = self._small_logits(caches[1] if caches else None, **inputs)
            fused, alpha = self._fuse(large, small[:, -1], experts[:, :, -1])
            self.alpha_log.append(alpha)
            token = _choose(fused, do_sample, temperature, top_p, generator)
            token = torch.where(done, torch.full_like(token, pad), token)
            ids = torch.cat([ids, token[:, None]], 1)
            mask = torch.cat([mask, (~done).to(mask.dtype)[:, None]], 1)
            if streamer is not None:
                streamer.put(token.cpu())
            done |= torch.isin(token, torch.tensor(sorted(eos), device=token.device)) if eos else done
            if bool(done.all()):
                break
            if use_cache:
                seen, step_ids = ids.shape[1] - 1, token[:, None]
            else:
                step_ids = ids
        if streamer is not None:
            streamer.end()
        return ids


def _choose(log_probs: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
            generator: torch.Generator | None) -> torch.Tensor:
    if not do_sample:
        return log_probs.argmax(-1)
    if temperature <= 0:
        raise DeltatuneError(f"temperature={temperature}: must be positive (or do_sample=False for greedy)")
    probs = F.softmax(log_probs / temperature, -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest set reaching top_p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _token_set(eos: int | Sequence[int] | None) -> set[int]:
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(e) for e in eos}


def _fixed_alpha(alpha: str | float | Sequence[float], n: int) -> torch.Tensor | None:
    if isinstance(alpha, str):
        if alpha != "dynamic":
            raise DeltatuneError(f"alpha={alpha!r}: use 'dynamic' or a number (one per expert, or one for all)")
        return None
    values = [float(alpha)] * n if isinstance(alpha, int | float) else [float(a) for a in alpha]
    if len(values) != n:
        raise DeltatuneError(f"alpha has {len(values)} values for {n} experts: give one number, or one per expert")
    return torch.tensor(values, dtype=torch.float32)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, Tuned) else model


def _vocabulary(model: nn.Module) -> int:
    head = _unwrap(model).get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise DeltatuneError(f"{type(_unwrap(model)).__name__} has no language-model head: logit fusion needs "
                             "causal LMs (e.g. smollm2-135m)")
    return int(head.weight.shape[0])


def _check_vocabularies(large: nn.Module, small: nn.Module) -> None:
    a, b = _vocabulary(large), _vocabulary(small)
    if a != b:
        raise DeltatuneError(
            f"the large model has {a} output tokens and the small one {b}: logit fusion adds their logits token by "
            "token, so both must use one tokenizer (e.g. smollm2-135m and its depth-pruned copy "
            "smollm2-135m@layers=0-9)"
        )


def _mixable(small: Tuned, names: Sequence[str]) -> bool:
    """Whether one forward can compute the small base and every expert row by row (low-rank forms only)."""
    tenants = tenants_of(small)
    return all(isinstance(f, WeightDelta) and f.uses_output_path()
               for name in names for f in tenants.forms_of(name).values())


def fuse(large: str | nn.Module, small: str | nn.Module | None = None, experts: Sequence[str | os.PathLike] = (),
         *, alpha: str | float | Sequence[float] = "dynamic", objective: Objective = kl_constraints,
         alpha_max: float = ALPHA_MAX, alpha_step: float = ALPHA_STEP) -> Fused:
    """``dt.fuse``: the large model (a name, a folder or a loaded model) steered by ``experts``, deltatune
    artifacts or PEFT adapter folders trained on the small base (``small``: a name, folder or loaded model;
    default the base the first deltatune artifact names, e.g. ``smollm2-135m@layers=0-9``). ``alpha``:
    ``"dynamic"`` (the KL-constrained choice per position and expert), one number for every expert (1.0 with one
    expert is proxy tuning) or one per expert. The experts become named deltas of one small model."""
    from deltatune.data import models
    from deltatune.interop.peft import import_peft

    paths = [os.fspath(e) for e in experts]
    if not paths:
        raise DeltatuneError("logit fusion needs at least one expert: a deltatune artifact or PEFT adapter trained on "
                             "the small model")
    ours = [(Path(p) / artifact.META_FILE).is_file() for p in paths]
    for p, is_ours in zip(paths, ours, strict=True):
        if not is_ours and not (Path(p) / "adapter_config.json").is_file():
            raise DeltatuneError(f"expert {p} is neither a deltatune artifact (deltatune.json) nor a PEFT adapter "
                                 "(adapter_config.json)")
    if small is None:
        if not any(ours):
            raise DeltatuneError("give the small base model (small=... / --fuse-small): PEFT adapters do not name it "
                                 "in a way deltatune can load")
        meta = artifact.read_meta(paths[ours.index(True)])
        small = models.base_of(meta)[0]
    large_model = models.load_base(large) if not isinstance(large, nn.Module) else large
    small_model = models.load_base(small) if not isinstance(small, nn.Module) else small
    for what, m in (("large", large_model), ("small", small_model)):
        if isinstance(m, Tuned):
            raise DeltatuneError(f"give the {what} model without a delta attached (merge() it, or pass the base); "
                                 "the small model's deltas go in experts=[...]")
    _check_vocabularies(large_model, small_model)
    with tempfile.TemporaryDirectory(prefix="deltatune-fuse-") as tmp:
        for i, p in enumerate(paths):
            if not ours[i]:  # a PEFT adapter: imported once into an artifact, read below like any other
                imported = import_peft(small_model, p)
                paths[i] = os.path.join(tmp, f"expert{i}")
                imported.save(paths[i])
                imported.detach()
        host = load(small_model, paths[0])
        names = ["default"]
        for i, p in enumerate(paths[1:], 1):
            host.add(f"expert{i}", p)
            names.append(f"expert{i}")
    host.use(None)
    host.eval()
    return Fused(large_model, host, names, alpha, objective=objective, alpha_max=alpha_max, alpha_step=alpha_step)
