"""CorDA (Yang et al., NeurIPS 2024, arXiv 2406.05223): context-oriented decomposition adaptation.

A data-driven LoRA initialisation. For each target Linear / GPT-2 Conv1D the uncentred covariance C of
its inputs is collected on calibration data; the SVD of W·C′ (C′ = C damped until it inverts) rewrites
W exactly as U Σ (Vᵀ C′⁻¹) = U Σ V̂ᵀ. The r components with the largest singular values (``mode="ipa"``,
instruction-previewed: calibrate on the task's own data) or the smallest (``mode="kpa"``,
knowledge-preserved: calibrate on questions of the knowledge to keep, e.g. a QA set) become the
trainable factors, as in PEFT: with s = α/r and σ′ = σ_r / s,

    A₀ = diag(√σ′) V̂_rᵀ  (r × in),   B₀ = U_r diag(√σ′)  (out × r),   s·B₀A₀ = U_r Σ_r V̂_rᵀ.

PEFT (and the official code) then rewrite the base weight into the residual W − s·B₀A₀ and train a LoRA
on it. Here the base weight is never written: the form keeps the initial factors A₀, B₀ as frozen buffers
and adds ΔW = s·(B·A − B₀·A₀) on the input path, which is the spec's option C (a LoRA of rank 2r,
A′ = [A; A₀], B′ = [B, −B₀], on the *untouched* base). So

- the outputs are those of PEFT's residual model (W − s·B₀A₀)·x + s·B·A·x up to float rounding, and at
  initialisation ΔW is exactly zero (the two branches are the same computation on equal tensors);
- detach / unmerge give back the original W, and the fingerprint is that of the original base;
- the artifact carries A, B, A₀, B₀ (twice a LoRA's bytes, tiny next to PEFT's residual model or SVD
  cache), so ``dt.load`` needs no calibration data: rebuilding the residual from the base would need the
  same data, tokenizer and the same SVD on the same hardware, and is not bit-reproducible across devices;
- ``to_lora`` writes the artifact as a plain ``lora`` artifact of rank 2r (α′ = 2α, or √2·α with rsLoRA),
  which merges like any LoRA and exports to PEFT's adapter format (``deltatune export``).

On a quantized base (``deltatune.data.models.load(name, quantize="nf4")``) the SVD is of the dequantized W·C′,
the weights the layer computes with; the dequantized matrix is dropped once decomposed.

Calibration (``data``, one of):

- a mapping in the format of the run's ``data`` section (``deltatune.data.tasks.DataConfig``): the first
  ``samples`` examples of a seeded shuffle of its training split, tokenized with the model's tokenizer and
  run through the task's own forward (``deltatune.methods._calibration.task_batches``, shared with SPT / IST). In
  YAML an alias reuses the run's section: ``data: &data {...}`` and ``method: {name: corda, data: *data}``;
- ``"random"``: ``samples`` sequences of ``random_length`` uniform token ids (seeded) — a data-free way to
  exercise the method (tests, the method matrix); it is not a meaningful context;
- a list of token-id lists (JSON, in memory): each list is one sample.

The hook follows PEFT / the official code: each call's input X (tokens × d_in) is cast to fp32 and
divided by ``max(X).abs()`` (the signed maximum, not max|X|: kept for fidelity, it reweights calls
relative to each other), C += XᵀX, and C is divided by the number of calls. Calibration runs one sample
per call by default (``batch_size=1``, the official setting, so the per-call scaling is per sample); with
larger batches the rows of padding tokens are left out (PEFT's hook would ``squeeze(0)`` and fail).
Damping: λ = 0.01; C′ = C + λ·mean(diag C)·I until ‖C′C′⁻¹ − I‖_F < 0.05, doubling λ; the damped C′ is
used for both W·C′ and the inverse, so W is reconstructed exactly. The builder records the calibration
it did (batches, tokens, the damping of each layer) in the config's ``calibration``.

Defaults: r = 128 and every Linear of the blocks (the official LLaMA-2-7B scripts: every nn.Linear but
lm_head), α = r (scale 1: the official code does not scale; PEFT's LoraConfig default lora_alpha is 8),
``mode="ipa"`` (PEFT's ``corda_method="ipm"``), 256 calibration samples (official). PEFT calls the
modes ``ipm`` / ``kpm``; both spellings are accepted.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from deltatune.core import artifact, quantized, registry
from deltatune.core.forms.base import Form
from deltatune.core.forms.lowrank import layout_of
from deltatune.core.registry import Built, Traits, register
from deltatune.core.targeting import sites_of
from deltatune.core.tuned import Tuned
from deltatune.errors import DeltatuneError
from deltatune.methods._calibration import data_config, padded_batches, task_batches
from deltatune.methods._common import block_matrices, dense_forms, from_rank0
from deltatune.methods._lowrank import FrozenStartLowRank, pattern_value

log = logging.getLogger(__name__)

RANDOM = "random"  # the reserved value of ``data`` for seeded random token ids
DAMP = 0.01  # initial damping λ (official code and PEFT)
INV_TOL = 0.05  # ‖C′C′⁻¹ − I‖_F accepted (official code and PEFT)
MAX_DOUBLINGS = 64  # λ·2^64 swamps any covariance: past it the covariance itself is broken
_MODES = {"ipa": "ipa", "kpa": "kpa", "ipm": "ipa", "kpm": "kpa"}  # PEFT's names -> ours


@dataclass
class CordaConfig:
    r: int = 128  # official scripts for LLaMA-2-7B
    alpha: float | None = None  # None: alpha = r, scale 1 as the official code (PEFT's lora_alpha default is 8)
    mode: Literal["ipa", "kpa", "ipm", "kpm"] = "ipa"  # ipa: largest r components train; kpa: smallest (PEFT: ipm)
    targets: list[str] | None = None  # None: every Linear / Conv1D in the numbered blocks (official: all but lm_head)
    layers: list[int] | str | None = None  # blocks: an index, a list, or 'start:stop' (None: all)
    exclude: list[str] | None = None  # name patterns left out (as in targets)
    dropout: float = 0.0  # on the trainable branch's input (PEFT's lora_dropout default)
    use_rslora: bool = False  # scale = alpha / sqrt(r), as PEFT applies it to the CorDA init too
    rank_pattern: dict[str, int] = field(default_factory=dict)  # PEFT semantics: module-name regex -> r
    # PEFT semantics: module-name regex -> alpha
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None  # trained fully (e.g. a fresh classification head)
    # calibration: a run-config data section, "random", or a list of token-id lists (one per sample)
    data: str | dict[str, Any] | list[list[int]] | None = None
    samples: int = 256  # calibration samples (official: 256 of 2048 tokens); rounded down to whole batches
    batch_size: int = 1  # samples per forward call (official: 1; the max(X) scaling is per call)
    random_length: int = 32  # tokens per sample for data="random" (capped at the model's positions)
    tokenizer: str | None = None  # for a data section: tokenizer name or folder; None: the model's own
    seed: int = 0  # the order of the calibration samples / the random tokens
    device: str = "auto"  # where calibration and SVD run: auto (CUDA if available) | cpu | cuda | cuda:N
    calibration: dict[str, Any] | None = None  # written by the builder: batches, tokens, damping λ per layer

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r={self.r} must be a positive integer")
        if self.alpha is not None and self.alpha <= 0:
            raise ValueError(f"alpha={self.alpha} must be positive (or null: alpha = r)")
        if self.mode not in _MODES:
            raise ValueError(f"mode={self.mode!r}: use 'ipa' (instruction-previewed) or 'kpa' (knowledge-preserved)")
        self.mode = _MODES[self.mode]  # type: ignore[assignment]
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.samples < 1 or self.batch_size < 1 or self.random_length < 1:
            raise ValueError("samples, batch_size and random_length must be >= 1")
        if isinstance(self.data, str) and self.data != RANDOM:
            raise ValueError(
                f"data={self.data!r}: give a data section (a mapping like the run's data), 'random', or a list "
                "of token-id lists"
            )
        if isinstance(self.data, dict):
            data_config(self.data)  # bad keys fail when the config is read, not after the model loaded
        if isinstance(self.data, list) and not (
            self.data and all(isinstance(s, list) and s and all(_is_token(t) for t in s) for s in self.data)
        ):
            raise ValueError("data as a list must hold non-empty lists of token ids (ints), one per sample")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError as e:
                raise ValueError(f"device={self.device!r} is not a device: use auto, cpu, cuda or cuda:N") from e


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


# ---------------------------------------------------------------- the form


class CordaLowRank(FrozenStartLowRank):
    """CorDA's form: A₀, B₀ from the covariance-oriented decomposition (``set_factors``). With dropout in train
    mode the first step's forward is not the base model's (it is not in PEFT either)."""

    kind = "corda"  # not a plain LoRA: PEFT export goes through ``to_lora``

    def set_factors(self, a0: torch.Tensor, b0: torch.Tensor) -> None:
        """Start training at A = A₀, B = B₀."""
        with torch.no_grad():
            for dst, src in ((self.A, a0), (self.B, b0), (self.A0, a0), (self.B0, b0)):
                if dst.shape != src.shape:
                    raise DeltatuneError(f"factor of shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
                dst.copy_(src.to(dst.dtype))


# ---------------------------------------------------------------- covariance, damping, decomposition


def covariances(
    model: nn.Module,
    modules: list[tuple[str, nn.Module]],
    batches: Iterable[dict[str, torch.Tensor]],
    forward: Callable[[nn.Module, dict[str, torch.Tensor]], Any] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """C = Σ_calls (X/max(X))ᵀ(X/max(X)) / calls for each module's input X (fp32), and the number of
    token rows each module saw. ``forward(model, batch)`` runs one batch (default ``model(**batch)``);
    a batch's ``attention_mask`` drops padding rows. The model runs in eval mode without gradients; its
    modes are restored afterwards."""
    forward = forward or (lambda m, b: m(**b))
    acc: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {name: 0 for name, _ in modules}
    tokens: dict[str, int] = {name: 0 for name, _ in modules}
    mask: list[torch.Tensor | None] = [None]
    # modules fed the same tensor (q/k/v, gate/up) are called one after another: XᵀX is computed once for them.
    # The cache holds the input itself, so its memory cannot be reused by another tensor while it is the key.
    last: dict[str, Any] = {}

    def scaled_gram(name: str, raw: torch.Tensor) -> tuple[torch.Tensor, int]:
        x = raw.detach()
        m = mask[0]
        if m is not None and tuple(x.shape[:-1]) == tuple(m.shape):
            x = x[m.bool()]
        x = x.reshape(-1, x.shape[-1]).float()
        if x.shape[0] == 0:
            return x.new_zeros(x.shape[1], x.shape[1]), 0
        x = x / torch.max(x).abs()
        if not torch.isfinite(x).all():
            raise DeltatuneError(
                f"the calibration input of {name} is non-finite or all zero (max(X) = 0): check the data "
                "and the model's dtype, or leave this module out of the targets"
            )
        return x.t().matmul(x), x.shape[0]

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if last.get("input") is not args[0]:
                last["input"], last["gram"] = args[0], scaled_gram(name, args[0])
            c, rows = last["gram"]
            if rows == 0:
                return
            acc[name] = c.clone() if name not in acc else acc[name].add_(c)
            calls[name] += 1
            tokens[name] += rows

        return hook

    modes = [(m, m.training) for m in model.modules()]
    handles = [module.register_forward_hook(hook_for(name)) for name, module in modules]
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                mask[0] = batch.get("attention_mask") if isinstance(batch, dict) else None
                forward(model, batch)
                last.clear()
    finally:
        last.clear()
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    missing = [name for name, n in calls.items() if n == 0]
    if missing:
        raise DeltatuneError(
            f"{missing[0]} ({len(missing)} module(s) in all) saw no calibration input: leave it out of the targets "
            "(exclude=[...]) or give calibration data that reaches it"
        )
    return {name: c / calls[name] for name, c in acc.items()}, tokens


def damped_inverse(cov: torch.Tensor, damp: float = DAMP, tol: float = INV_TOL
                   ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(C′, C′⁻¹, λ): C′ = C + λ·mean(diag C)·I with the smallest λ = damp·2^k whose inverse is accurate
    (‖C′C′⁻¹ − I‖_F < tol). The same operations as PEFT's ``collect_eigens_for_layer``."""
    n = cov.size(0)
    eye = torch.eye(n, device=cov.device)
    for _ in range(MAX_DOUBLINGS):
        compensate = torch.diag(torch.ones(n, device=cov.device) * torch.mean(torch.diag(cov)) * damp)
        fixed = cov + compensate
        try:
            inv = torch.linalg.inv(fixed)
        except RuntimeError:  # exactly singular: damp more
            damp *= 2
            continue
        if torch.dist(fixed @ inv, eye).item() < tol:
            return fixed, inv, damp
        damp *= 2
    raise DeltatuneError(
        "the calibration covariance cannot be inverted even with heavy damping (is it zero or non-finite?): "
        "give more, and more varied, calibration samples"
    )


def decompose(weight: torch.Tensor, cov: torch.Tensor,
              damped: tuple[torch.Tensor, torch.Tensor, float] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """W (out, in) = U diag(S) V̂ᵀ from the SVD of W·C′ (descending S), V̂ = (Vᵀ C′⁻¹)ᵀ (in, min(out, in)),
    and the damping λ used. ``damped``: ``damped_inverse(cov)`` when already known (modules sharing an input)."""
    fixed, inv, damp = damped or damped_inverse(cov.float())
    u, s, vh = torch.linalg.svd(weight.float() @ fixed, full_matrices=False)
    v = (vh @ inv).transpose(0, 1)
    return u, s, v, damp


def select(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, r: int, mode: str
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The r components that train: the largest (ipa) or the smallest (kpa) singular values."""
    if mode == "ipa":
        return u[:, :r], s[:r], v[:, :r]
    if mode == "kpa":
        return u[:, -r:], s[-r:], v[:, -r:]
    raise DeltatuneError(f"mode={mode!r}: use 'ipa' (instruction-previewed) or 'kpa' (knowledge-preserved)")


def init_factors(u_r: torch.Tensor, s_r: torch.Tensor, v_r: torch.Tensor, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``corda_init``: σ′ = σ_r / s, A₀ = diag(√σ′) V̂_rᵀ, B₀ = U_r diag(√σ′), so s·B₀A₀ = U_r Σ_r V̂_rᵀ."""
    s_r = s_r / scale
    a0 = v_r.t().mul(s_r.sqrt().view(-1, 1)).contiguous()
    b0 = u_r.mul(s_r.sqrt()).contiguous()
    return a0, b0


# ---------------------------------------------------------------- calibration data


def _max_positions(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def random_samples(model: nn.Module, cfg: CordaConfig) -> list[list[int]]:
    """``samples`` seeded sequences of uniform token ids (the calibration of ``data="random"``)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise DeltatuneError("data='random' needs the model's config.vocab_size: give token-id lists or a data section")
    length = min(cfg.random_length, _max_positions(model) or cfg.random_length)
    g = torch.Generator().manual_seed(cfg.seed)
    return torch.randint(0, vocab, (cfg.samples, length), generator=g).tolist()


def calibration_batches(model: nn.Module, cfg: CordaConfig) -> tuple[list[dict[str, torch.Tensor]], Callable | None]:
    """The batches the covariance is collected on, and how to run one (None: ``model(**batch)``)."""
    if cfg.data is None:
        raise DeltatuneError(
            "corda initialises from the input covariance of calibration data and needs it: set the method's data "
            "to a data section (in YAML `data: &data {...}` and `method: {name: corda, data: *data}`; for "
            "mode=kpa, data of the knowledge to preserve), 'random' (seeded random tokens: tests only), or a "
            "list of token-id lists"
        )
    if isinstance(cfg.data, dict):
        batches, loss_fn = task_batches(model, cfg.data, tokenizer=cfg.tokenizer,
                                        batches=max(1, cfg.samples // cfg.batch_size),
                                        batch_size=cfg.batch_size, seed=cfg.seed)
        return batches, loss_fn
    seqs = random_samples(model, cfg) if cfg.data == RANDOM else [list(s) for s in cfg.data][:cfg.samples]
    return padded_batches(seqs, cfg.batch_size, always_mask=False), None


def _device(cfg: CordaConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _weight_out_in(module: nn.Module) -> torch.Tensor:
    if quantized.is_quantized(module):  # the values it computes with; dropped once decomposed
        return quantized.dequantize(module)
    w = module.weight.detach()
    return w.T if layout_of(module) == "conv1d" else w  # GPT-2 Conv1D stores (in, out)


def corda_factors(
    model: nn.Module, modules: list[tuple[str, nn.Module, int, float]], cfg: CordaConfig
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, Any]]:
    """(A₀, B₀) for each (name, module, r, scale), on the model's device, and what the calibration did."""
    batches, forward = calibration_batches(model, cfg)
    home = next(model.parameters()).device
    device = _device(cfg)
    model.to(device)  # calibration and SVD run where the training will (attach precedes the loop's move)
    try:
        moved = [{k: v.to(device) for k, v in b.items()} for b in batches]
        covs, tokens = covariances(model, [(n, m) for n, m, _, _ in modules], moved, forward)
        factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        damping: dict[str, float] = {}
        shared: tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, float]] | None = None
        for name, module, r, scale in modules:
            cov = covs.pop(name)
            if shared is None or not torch.equal(shared[0], cov):  # q/k/v (gate/up) share C: invert it once
                shared = (cov, damped_inverse(cov.float()))
            u, s, v, damping[name] = decompose(_weight_out_in(module), cov, shared[1])
            a0, b0 = init_factors(*select(u, s, v, r, cfg.mode), scale)
            factors[name] = (a0.to(home), b0.to(home))
    finally:
        model.to(home)
    _same_on_every_rank(factors)
    first = modules[0][0]
    info = {"batches": len(batches), "tokens": tokens[first], "damping": damping}
    log.info("corda: calibrated on %d batches (%d tokens at %s)", len(batches), tokens[first], first)
    return factors, info


def _same_on_every_rank(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Data parallelism: every rank must start from the same factors, so all take rank 0's."""
    for name in sorted(factors):
        factors[name] = (from_rank0(factors[name][0]), from_rank0(factors[name][1]))


# ---------------------------------------------------------------- the method


def _targets(model: nn.Module, cfg: CordaConfig) -> list[tuple[str, nn.Module]]:
    modules = block_matrices(model, cfg.targets, cfg.layers, cfg.exclude)
    if not modules:
        raise DeltatuneError("corda found no Linear / Conv1D to adapt: widen targets / layers / exclude")
    return modules


def _rank_and_alpha(cfg: CordaConfig, name: str) -> tuple[int, float]:
    r = int(pattern_value(cfg.rank_pattern, name, cfg.r))
    return r, float(pattern_value(cfg.alpha_pattern, name, cfg.alpha if cfg.alpha is not None else r))


@register("corda", CordaConfig,
          "CorDA: LoRA initialised from the SVD of W·C (input covariance of calibration data), ipa / kpa",
          traits=Traits(quantized_base=True), family="low-rank")
def build(model: nn.Module, cfg: CordaConfig, *, loading: bool = False) -> Built:
    forms: dict[str, Form] = {}
    specs = []
    for name, module in _targets(model, cfg):
        r, alpha = _rank_and_alpha(cfg, name)
        shape = quantized.features(module) if quantized.is_quantized(module) else _weight_out_in(module).shape
        if r > min(shape):
            raise DeltatuneError(
                f"r={r} exceeds the rank of {name} ({tuple(shape)}): CorDA's SVD has min(out, in) = "
                f"{min(shape)} components; lower r (or set rank_pattern for this module)"
            )
        form = CordaLowRank(module, r, alpha, use_rslora=cfg.use_rslora, dropout=cfg.dropout,
                            tied=[s for s in sites_of(model, module.weight) if s[0] is not module])
        forms[f"{name}.weight"] = form
        specs.append((name, module, r, form.scale))
    if not loading:  # an artifact carries A₀, B₀: loading needs no calibration data
        factors, cfg.calibration = corda_factors(model, specs, cfg)
        for name, _, _, _ in specs:
            forms[f"{name}.weight"].set_factors(*factors[name])  # type: ignore[union-attr]
    if cfg.modules_to_save:
        from deltatune.core.targeting import select_modules

        saved = select_modules(model, cfg.modules_to_save)
        extra = [(f"{n}.{pn}", p) for n, m in saved for pn, p in m.named_parameters()]
        for name, form in dense_forms(model, extra).items():
            if name in forms:
                raise DeltatuneError(f"{name} is both a CorDA target and fully trained: drop it from modules_to_save")
            forms[name] = form
    return Built(forms)


# ---------------------------------------------------------------- option C: a plain LoRA on the untouched base


def to_lora(source: Tuned | str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a CorDA delta (a tuned model or a saved artifact) as a ``lora`` artifact on the same, untouched
    base: rank 2r with A′ = [A; A₀], B′ = [B, −B₀] and α′ = 2α (√2·α with rsLoRA), so s′·B′A′ = s·(BA − B₀A₀).
    It loads with ``dt.load``, merges like any LoRA and exports to PEFT (``deltatune export``)."""
    if isinstance(source, Tuned):
        if source.method.name != "corda":
            raise DeltatuneError(f"to_lora converts a corda delta, not a {source.method.name!r} one")
        if source.merged:
            raise DeltatuneError("the delta is merged into the base; unmerge() before converting it")
        meta, tensors = source.describe(), source.delta_state_dict()
    else:
        meta, tensors = artifact.read_artifact(source)
        if meta["method"] != "corda":
            raise DeltatuneError(f"{source} is a {meta['method']!r} artifact; to_lora converts corda artifacts")
    lora_meta, lora_tensors = lora_artifact(meta, tensors)
    artifact.write_artifact(out, lora_meta, lora_tensors)
    return Path(out)


def lora_artifact(meta: dict[str, Any], tensors: dict[str, torch.Tensor]
                  ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``lora`` artifact (description, tensors) equal to a corda one."""
    cfg = registry.make_config(registry.get("corda"), meta["config"])
    out: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    forms = sorted(k[: -len(".A0")] for k in tensors if k.endswith(".A0"))
    added = 0  # A₀, B₀ become trainable rows / columns of the LoRA
    for form in forms:
        module = form.rsplit(".", 1)[0]
        a, b, a0, b0 = (tensors[f"{form}.{t}"] for t in ("A", "B", "A0", "B0"))
        out[f"{form}.A"] = torch.cat([a, a0], 0)
        out[f"{form}.B"] = torch.cat([b, -b0], 1)
        r, alpha = _rank_and_alpha(cfg, module)
        if a.shape[0] != r:
            raise DeltatuneError(f"{form}.A has rank {a.shape[0]} but the config says r={r}: the artifact is damaged")
        ranks[module], alphas[module] = 2 * r, alpha * (math.sqrt(2) if cfg.use_rslora else 2)
        added += a0.numel() + b0.numel()
    factors = {f"{f}.{t}" for f in forms for t in ("A", "B", "A0", "B0")}
    out.update({k: v for k, v in tensors.items() if k not in factors})  # modules_to_save: dense, unchanged
    lora_values = {
        "r": 2 * cfg.r, "alpha": (cfg.alpha if cfg.alpha is not None else cfg.r) * (math.sqrt(2) if cfg.use_rslora else 2),
        "dropout": cfg.dropout, "targets": sorted(ranks), "use_rslora": cfg.use_rslora,
        "rank_pattern": {re.escape(m): r for m, r in ranks.items()},
        "alpha_pattern": {re.escape(m): a for m, a in alphas.items()},
        "modules_to_save": cfg.modules_to_save,
    }
    lora_cfg = registry.make_config(registry.get("lora"), lora_values)
    trainable = int(meta.get("sizes", {}).get("trainable", 0)) + added
    new = {k: v for k, v in meta.items() if k not in ("files",)}
    new.update({
        "method": "lora",
        "config": registry.config_to_dict(lora_cfg),
        "sizes": {"trainable": trainable, "stored_bytes": sum(t.numel() * t.element_size() for t in out.values())},
        "converted_from": {"method": "corda", "config": meta["config"]},
    })
    return new, out
