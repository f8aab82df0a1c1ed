"""What the LoRA-like methods share (LoRA, DoRA, KaSA, CorDA, DSEE, the adapters): where they go by default,
PEFT's rank / alpha patterns, PEFT's ``bias`` / ``modules_to_save`` options, and the inits that PEFT applies by
rewriting the base weight (PiSSA, OLoRA: ``ResidualLowRank``, used by lora)."""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import torch
import torch.nn as nn

from deltatune.core import architectures
from deltatune.core.forms.lowrank import LowRank
from deltatune.core.targeting import match_name, module_types, select_modules
from deltatune.errors import DeltatuneError
from deltatune.methods._common import dense_forms, from_rank0


def pattern_value(patterns: dict, module_name: str, default: float) -> float:
    """PEFT's rank/alpha pattern lookup: a key matches a module name or a dotted suffix of it."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def check_alpha(alpha: float) -> None:
    """LoRA's alpha (the scale is alpha/r) must be finite. A non-positive one only draws a warning: PEFT accepts
    any ``lora_alpha`` (its adapters must import), a negative alpha just flips the sign of B·A, which training
    absorbs into B, and alpha = 0 silences the delta."""
    if not math.isfinite(alpha):
        raise ValueError(f"alpha={alpha} must be a finite number")
    if alpha < 0:
        warnings.warn(f"alpha={alpha:g} is negative: the delta is scaled by alpha/r < 0, which trains like "
                      f"alpha={-alpha:g} with B negated (PEFT accepts it too); use a positive alpha", stacklevel=3)
    elif alpha == 0:
        warnings.warn("alpha=0 scales the delta to zero: it changes nothing and its factors get no gradient; "
                      "use a positive alpha, e.g. alpha = r", stacklevel=3)


# The LoRA paper adapts W_q and W_v; PEFT's per-architecture defaults are those (or the fused q/k/v projection
# where a model has one). Rather than copy PEFT's table (which misses architectures and ages), find them in the
# model: the Linear / Conv1D layers inside its attention modules, recognised by the role their names give them.
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)  # a module's attribute or class name
_QUERY = re.compile(r"(q|query|wq)(_?proj|_lin)?", re.IGNORECASE)
_VALUE = re.compile(r"(v|value|wv)(_?proj|_lin)?", re.IGNORECASE)
_FUSED_QKV = re.compile(r"c_attn|query_key_value|w?qkv(_?proj)?|in_proj|w_pack", re.IGNORECASE)


def _attention_projections(model: nn.Module) -> dict[str, str]:
    """Full name -> leaf name of every Linear / Conv1D layer inside an attention module of ``model``."""
    linear = module_types()["linear"] + module_types()["conv1d"]
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if not name or not (_ATTENTION.search(leaf) or _ATTENTION.search(type(module).__name__)):
            continue
        for sub, child in module.named_modules(prefix=name):
            if sub != name and isinstance(child, linear):
                found[sub] = sub.rsplit(".", 1)[-1]
    return found


def _as_patterns(model: nn.Module, chosen: list[str], leaves: dict[str, str]) -> list[str]:
    """The leaf names of ``chosen`` (PEFT's list style, e.g. ["q_proj", "v_proj"]) when they select exactly those
    modules; else the full names (a leaf name also used outside attention must not widen the selection)."""
    names = list(dict.fromkeys(leaves[n] for n in chosen))
    selected = {n for n, _ in model.named_modules() if any(match_name(p, n) for p in names)}
    return names if selected == set(chosen) else chosen


def default_targets(model: nn.Module) -> list[str]:
    """The attention's query and value projections (or its fused q/k/v projection) of ``model``, as PEFT's
    default ``target_modules`` name them for the architectures it knows: found by their names, else where the
    architecture table (``core/architectures.py``) puts them."""
    leaves = _attention_projections(model)
    query = [n for n, leaf in leaves.items() if _QUERY.fullmatch(leaf)]
    value = [n for n, leaf in leaves.items() if _VALUE.fullmatch(leaf)]
    if query and value:
        return _as_patterns(model, query + value, leaves)
    fused = [n for n, leaf in leaves.items() if _FUSED_QKV.fullmatch(leaf)]
    if fused:
        return _as_patterns(model, fused, leaves)
    roles = architectures.projections(model)  # the architecture table's names, where the model's are unusual
    chosen = roles.get("query", []) + roles.get("value", []) if roles.get("query") and roles.get("value") \
        else roles.get("qkv", [])
    if chosen:
        return _as_patterns(model, chosen, {n: n.rsplit(".", 1)[-1] for n in chosen})
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    seen = ", ".join(sorted(set(leaves.values()))[:12]) or "no Linear layer inside a module named like attention"
    raise DeltatuneError(
        f"no default LoRA targets for {type(model).__name__} (model_type={model_type!r}): its attention has no "
        f"recognisable query/value or fused qkv projection (found: {seen}); pass targets=[...], e.g. "
        "targets=['q_proj', 'v_proj'] or targets=['all-linear']"
    )


def add_trained_extras(model: nn.Module, modules: list[tuple[str, nn.Module]], bias: str,
                       modules_to_save: list[str] | None, forms: dict, what: str) -> None:
    """PEFT's ``bias`` ("all" / "lora_only") and ``modules_to_save`` options, shared by the LoRA-like methods:
    dense deltas on those tensors, added to ``forms`` (``modules``: the low-rank targets)."""
    extra: list[tuple[str, nn.Parameter]] = []
    if bias == "all":
        extra += [(n, p) for n, p in model.named_parameters() if n == "bias" or n.endswith(".bias")]
    elif bias == "lora_only":
        extra += [(f"{n}.bias", m.bias) for n, m in modules if getattr(m, "bias", None) is not None]
    if modules_to_save:
        saved = select_modules(model, modules_to_save)
        extra += [(f"{n}.{pn}", p) for n, m in saved for pn, p in m.named_parameters()]
    for name, form in dense_forms(model, extra).items():
        if name in forms:
            raise DeltatuneError(f"{name} is both a {what} target and fully trained: drop it from modules_to_save")
        forms[name] = form



# -- inits that PEFT applies by rewriting the base weight: PiSSA, OLoRA -------------------------------------------
# PEFT (tuners/lora/layer.py ``pissa_init`` / ``olora_init``, 0.21.2) sets A₀, B₀ from the base weight W (out, in)
# and rewrites W into the residual W − s·B₀A₀, so the model starts at the base:
#   pissa:          W = U S Vᵀ (full SVD);  S′ = S_r / s;  A₀ = diag(√S′) V_rᵀ,  B₀ = U_r diag(√S′)
#   pissa_niter_K:  the same from torch.svd_lowrank(W, r, niter=K) (randomised: Halko et al.)
#   olora:          W = Q R (QR);  A₀ = R_r (first r rows),  B₀ = Q_r (first r columns)
# Here W is never written: ``ResidualLowRank`` keeps A₀, B₀ as frozen buffers and adds s·(B·A − B₀·A₀), as CorDA
# does (methods/corda.py), so the fingerprint, detach and unmerge all refer to the original base.

RESIDUAL_INITS = ("pissa", "pissa_niter_K", "olora")  # as PEFT's init_lora_weights names them (K: an integer)
_NITER = re.compile(r"pissa_niter_(\d+)")


def residual_init(init: object) -> str | None:
    """``init`` if it is one of PEFT's base-rewriting inits that deltatune keeps as a residual (``pissa``,
    ``pissa_niter_K``, ``olora``), else None."""
    if isinstance(init, str) and (init in ("pissa", "olora") or _NITER.fullmatch(init)):
        return init
    return None


class FrozenStartLowRank(LowRank):
    """ΔW = s·(B·A − B₀·A₀): a LoRA whose initial factors A₀, B₀ (frozen buffers, stored in the artifact) are
    subtracted, so a fresh delta is exactly zero and the base weight is never rewritten (PEFT's residual
    W − s·B₀A₀, kept implicit). Dropout acts on the trainable branch only, as in PEFT, whose residual weight sees
    the undropped input. The factors come from the subclass (``ResidualLowRank.start``, CorDA's ``set_factors``)
    or an artifact."""

    def __init__(self, module: nn.Module, r: int, alpha: float, **options: Any) -> None:
        super().__init__(module, r, alpha, **options)
        self.register_buffer("A0", torch.zeros_like(self.A))
        self.register_buffer("B0", torch.zeros_like(self.B))

    def reset(self, init: str | bool = True) -> None:
        """No random draw (it would move the global RNG for nothing): the subclass or an artifact fills the factors."""
        with torch.no_grad():
            self.A.zero_()
            self.B.zero_()

    def delta_weight(self) -> torch.Tensor:
        ba = (self.B @ self.A - self.B0 @ self.A0) * self.scale
        return ba if self.layout == "linear" else ba.T

    def output_delta(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.A.dtype)
        trained = self.dropout(x) @ self.A.T @ self.B.T
        initial = x @ self.A0.T @ self.B0.T  # PEFT's residual weight sees the input without dropout
        return (trained - initial) * self.scale


class ResidualLowRank(FrozenStartLowRank):
    """PiSSA / OLoRA (``init``): A₀, B₀ from an SVD or QR of W. They are stored in the artifact: neither is
    bit-reproducible across devices and libraries (the randomised SVD not even on one), and a loaded delta must
    give the trained model's outputs."""

    kind = "residual-low-rank"  # not a plain LoRA: a PEFT LoRA adapter holds B·A only

    def __init__(self, module: nn.Module, r: int, alpha: float, *, init: str, use_rslora: bool = False,
                 dropout: float = 0.0, tied: list[tuple[nn.Module, str]] | None = None) -> None:
        super().__init__(module, r, alpha, use_rslora=use_rslora, dropout=dropout, init=init, tied=tied)
        self.init = init

    def start(self) -> None:
        """A = A₀ and B = B₀ from the base weight, by the form's init (PEFT's arithmetic, in float32)."""
        a0, b0 = residual_factors(self._oriented_base(), self.r, self.scale, self.init)
        a0, b0 = from_rank0(a0), from_rank0(b0)  # data parallelism: every rank starts from rank 0's factors
        with torch.no_grad():
            for dst, src in ((self.A, a0), (self.B, b0), (self.A0, a0), (self.B0, b0)):
                dst.copy_(src.to(dst.dtype))

    def _oriented_base(self) -> torch.Tensor:
        """W0 as an (out, in) float32 matrix (GPT-2's Conv1D stores (in, out); a quantized weight dequantized)."""
        w = self.dense_base(torch.float32)
        return w.T if self.layout == "conv1d" else w

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, init={self.init}"


def residual_factors(w: torch.Tensor, r: int, scale: float, init: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₀ (r, in), B₀ (out, r)) of the float32 matrix ``w`` (out, in) for a base-rewriting init, with PEFT's
    operations in PEFT's order (so a full SVD or QR gives PEFT's factors bit for bit on the same machine)."""
    if init == "olora":
        q, rr = torch.linalg.qr(w)
        return rr[:r].contiguous(), q[:, :r].contiguous()
    niter = _NITER.fullmatch(init)
    if niter:
        u_r, s_r, v_r = torch.svd_lowrank(w, r, niter=int(niter.group(1)))
        vh_r = v_r.t()
    elif init == "pissa":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u_r, s_r, vh_r = u[:, :r], s[:r], vh[:r]
    else:
        raise DeltatuneError(f"init={init!r} is not a residual init: use one of {', '.join(RESIDUAL_INITS)}")
    s_r = s_r / scale
    return torch.diag(torch.sqrt(s_r)) @ vh_r, u_r @ torch.diag(torch.sqrt(s_r))


def check_residual_rank(r: int, shape: tuple[int, int], name: str, init: str) -> None:
    """PiSSA and OLoRA take r components of W (out, in): there are min(out, in)."""
    if r > min(shape):
        raise DeltatuneError(
            f"r={r} exceeds the rank of {name} ({shape[0]}x{shape[1]}): init={init!r} takes r components of the "
            f"weight and it has min(out, in) = {min(shape)}; lower r (or set rank_pattern for this module)"
        )
