"""ComPEFT (Yadav et al., TMLR 2024, arXiv 2311.13171): compress any saved weight-side delta.

    dt.compress("runs/lora", "runs/lora-compeft", density=0.2, alpha=1.0)
    tuned = dt.load(model, "runs/lora-compeft")      # loads, merges and composes like any other artifact

The delta's task vector τ is materialised per base tensor (low-rank: ΔW = s·B·A; dense: Δ; sparse: its
values; several forms on one tensor: their sum), the ⌊density·d⌋ largest |τ_i| are kept (over all
tensors at once, as the official code, or per tensor) and each becomes sign(τ_i)·α·σ(τ), σ the standard
deviation of the unpruned τ. The result is stored bit-packed, per tensor: positions as a Golomb-Rice code
of the gaps between kept entries or as a bitmap, whichever is smaller, one sign bit per kept entry, and
one fp32 scale. The artifact is a registered method (``compeft``, deltatune/methods/compeft.py) whose
forms decode that payload into sparse (or, when most entries are kept, dense) deltas of ±scale.

Choices:

- density rule: exactly n = ⌊density·d⌋ entries are kept (strict top-n; ties at the threshold go to the
  lower flat position in sorted-name order). The official ``kthvalue`` rule keeps n+1 and more on ties, an
  off-by-one not reproduced here. Entries with τ_i = 0 are never kept (they have no sign), so a zero
  task vector compresses to an empty delta.
- density 1.0 keeps every non-zero entry and still ternarises it (pruning-free ComPEFT); the official
  code's k=100 returns the model unchanged, which would not compress anything.
- scope "global" (default): one top-n and one σ over the whole task vector, as the official code; scope
  "tensor": each tensor its own top-n and σ (results differ from the global scope).
- low-rank deltas: ``lowrank="factors"`` (the default when the delta has plain LoRA factors) compresses A and
  B themselves (the paper's LoRA experiments, θ_init = 0) and keeps a low-rank form with ternary factors:
  r·(in+out) entries instead of in·out, the paper's compression ratios. ``lowrank="delta"`` (the default for
  every other delta) compresses ΔW = s·B·A, so the result is a sparse ternary ΔW that composes with every other
  form; for a LoRA it barely shrinks (it keeps a fraction of in·out entries, each with its position, where the
  LoRA holds r·(in+out) values). The artifact's ``compression.note`` says which was chosen and how to get the
  other.
- ``values="pruned"``: the paper's pruning-only baseline (``replace_factor=-1``): kept entries keep τ_i
  (fp32 each), positions packed the same way.

Golomb-Rice stream: the code of gap g with parameter b is q = g >> b in unary (q ones, one zero) and the
b low bits of g. We write the k fixed-width remainders first and the k unary parts after them (the same
number of bits as interleaving them), so decoding is vectorised: the remainders are a (k, b) bit matrix
and the unary parts end at the first k zeros of the rest.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from deltatune.core.delta import Delta
from deltatune.errors import DeltatuneError
from deltatune.methods._bitpack import (
    encode,
)

DENSE_ABOVE = 0.5  # a tensor with more kept entries than this is held as a dense delta (less memory than k pairs)
MODES = ("ternary", "pruned")
SCOPES = ("global", "tensor")
LOWRANK = ("delta", "factors")


# -- the task vector and the kept entries ----------------------------------------------------------------------
@dataclass
class Piece:
    """One tensor of the task vector: its entries (fp32, flat) over a domain of the base tensor's flat
    positions (``domain`` None: all ``numel`` of them, in order)."""

    key: str  # the stored tensor's name prefix: "<form>" or "<form>.A"
    values: torch.Tensor
    numel: int
    domain: torch.Tensor | None = None

    def positions(self, kept: torch.Tensor) -> torch.Tensor:
        return kept if self.domain is None else self.domain[kept]


def keep_count(density: float, d: int) -> int:
    """⌊density·d⌋ with density read as written (0.29·100 is 29, not 28 as in binary floating point)."""
    return math.floor(Fraction(repr(float(density))) * d)


def std(values: list[torch.Tensor]) -> float:
    """Unbiased standard deviation of all entries together, in float64 (two passes, no concatenation)."""
    d = sum(v.numel() for v in values)
    if d == 0:
        return 0.0
    mean = sum(float(v.double().sum()) for v in values) / d
    ss = sum(float((v.double() - mean).pow(2).sum()) for v in values)
    return math.sqrt(ss / max(1, d - 1))


def _as_keys(values: torch.Tensor) -> torch.Tensor:
    # |τ| of finite fp32 values as int32: for non-negative floats the bit patterns sort as the numbers
    return values.abs().contiguous().view(torch.int32)


def top_n(values: list[torch.Tensor], n: int) -> list[torch.Tensor]:
    """For each tensor, the sorted positions of its entries among the n largest |value| of all tensors
    together; exactly min(n, non-zeros) in all, zeros never. The threshold is found by bisection on the
    fp32 bit patterns (32 counting passes, no concatenated copy of a large task vector); ties at it go to
    the earliest tensors and positions."""
    keys = [_as_keys(v) for v in values]

    def count(t: int) -> int:
        return sum(int((k >= t).sum()) for k in keys)

    n = min(n, count(1))
    if n <= 0:
        return [torch.empty(0, dtype=torch.long) for _ in keys]
    lo, hi = 1, 0x7F800000  # count(lo) >= n; count(hi) = 0 < n, every value being finite
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if count(mid) >= n:
            lo = mid
        else:
            hi = mid
    need = n - count(lo + 1)
    out = []
    for k in keys:
        sel = k > lo
        if need > 0:
            ties = torch.nonzero(k == lo).view(-1)[:need]
            sel[ties] = True
            need -= ties.numel()
        out.append(torch.nonzero(sel).view(-1))
    return out


@dataclass
class Kept:
    """The entries one density keeps, before their values: per scope group its pieces, each piece's kept
    local positions, and the group's σ (the std of its unpruned entries). A calibration keeps them once per
    density and gives them every α."""

    groups: list[tuple[list[Piece], list[torch.Tensor], float]]

    def values(self, alpha: float, mode: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{key: (positions, values)}`` of the kept entries (pieces that keep none are left out). Ternary
        values are sign(τ)·α·σ; pruned ones keep τ (α has no effect)."""
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for group, kept, sigma in self.groups:
            scale = torch.tensor(alpha * sigma, dtype=torch.float32)
            if mode == "ternary" and float(scale) == 0.0:
                continue  # a constant task vector: α·σ = 0, the compressed delta is zero
            for piece, positions in zip(group, kept, strict=True):
                if positions.numel() == 0:
                    continue
                tau = piece.values[positions]
                values = tau.clone() if mode == "pruned" else torch.where(tau < 0, -scale, scale)
                out[piece.key] = (piece.positions(positions), values)
        return out

    def scales(self, alpha: float) -> dict[str, torch.Tensor]:
        """Each piece's ternary scale α·σ (fp32, as ``values`` computes it), by piece key."""
        return {p.key: torch.tensor(alpha * sigma, dtype=torch.float32) for group, _, sigma in self.groups
                for p in group}


def keep(pieces: list[Piece], density: float, scope: str) -> Kept:
    """ComPEFT's top-n of the pieces, one per scope group ("global": all pieces; "tensor": each)."""
    groups = [pieces] if scope == "global" else [[p] for p in pieces]
    out = []
    for group in groups:
        vals = [p.values for p in group]
        out.append((group, top_n(vals, keep_count(density, sum(v.numel() for v in vals))), std(vals)))
    return Kept(out)


def select(pieces: list[Piece], density: float, alpha: float, scope: str, mode: str
           ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """ComPEFT on the pieces: ``{key: (positions, values)}`` of the kept entries (pieces that keep none
    are left out). Ternary values are sign(τ)·α·σ, σ the std of the unpruned entries of the scope."""
    return keep(pieces, density, scope).values(alpha, mode)


# -- from an artifact to its compressed artifact ---------------------------------------------------------------
def _check_options(density: Any, alpha: Any, scope: str, lowrank: str, values: str) -> None:
    problems = []
    if isinstance(density, bool) or not isinstance(density, int | float) or not 0 < density <= 1:
        problems.append(f"density={density!r} must be in (0, 1] (the fraction of task-vector entries kept; "
                        "ComPEFT's default k=20% is 0.2)")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not (math.isfinite(alpha) and alpha > 0):
        problems.append(f"alpha={alpha!r} must be a positive number (kept entries become ±alpha·std)")
    for name, value, allowed in (("scope", scope, SCOPES), ("lowrank", lowrank, LOWRANK), ("values", values, MODES)):
        if value not in allowed:
            problems.append(f"{name}={value!r} must be one of {', '.join(allowed)}")
    if problems:
        raise DeltatuneError("bad compress options: " + "; ".join(problems))


def _base_model(path: str | os.PathLike, meta: dict, base: str | nn.Module | None) -> nn.Module:
    if isinstance(base, nn.Module):
        from deltatune.core.tuned import Tuned, carried_by

        if isinstance(base, Tuned) or carried_by(base) is not None:
            raise DeltatuneError("base must be the base model without a delta attached (tuned.detach() returns it)")
        return base
    name = base or meta.get("fingerprint", {}).get("name_or_path")
    if not name:
        raise DeltatuneError(f"{path} does not say which base model it belongs to: pass base=... (a model or a name)")
    from deltatune.data import models

    return models.load_base(str(name), meta.get("fingerprint", {}).get("head"))


def names_of(model: nn.Module) -> tuple[dict[int, str], dict[int, str]]:
    """The first name of every parameter and module of a model with nothing attached (a parametrisation
    renames the tensors it holds), by object id."""
    params: dict[int, str] = {}
    for name, p in model.named_parameters():
        params.setdefault(id(p), name)
    return params, {id(m): n for n, m in model.named_modules(remove_duplicate=False)}


def task_vector(delta: Delta, lowrank: str, names: tuple[dict[int, str], dict[int, str]]
                ) -> tuple[list[Piece], dict[str, dict]]:
    """The pieces of a built delta's task vector and, per compressed form, its record skeleton:
    ``{"form": "sparse" | "dense", "shape"}`` for a materialised ΔW (named by the base tensor's first
    parameter name), ``{"form": "lowrank", "r", "scale", "shape"}`` for kept factors (named by the module).
    ``names``: ``names_of`` the model with nothing attached."""
    from deltatune.core.forms.sparse import Sparse

    param_names, module_names = names
    pieces: list[Piece] = []
    layout: dict[str, dict] = {}
    for forms in _by_base_tensor(delta).values():
        first = forms[0]
        if lowrank == "factors" and _plain_factors(forms):
            module = first.sites[0][0]
            key = f"{module_names[id(module)]}.weight"
            layout[key] = {"form": "lowrank", "r": first.r, "scale": first.scale, "shape": list(first.base.shape)}
            for part in ("A", "B"):
                t = getattr(first, part).detach().float().reshape(-1).cpu()
                pieces.append(Piece(f"{key}.{part}", t, t.numel()))
            continue
        if any(f.unties_on_merge for f in forms):
            raise DeltatuneError(
                f"the low-rank delta of {first.param_name} applies to a tied embedding only (not to the tied head): a "
                "compressed ΔW would change both. Compress it with lowrank='factors', which keeps it low-rank"
            )
        with torch.no_grad():
            dense = sum(f.delta_weight().detach().float() for f in forms).reshape(-1).cpu()
        if not bool(torch.isfinite(dense).all()):
            raise DeltatuneError(f"the delta of {first.param_name} holds NaN or infinite values: it cannot be compressed")
        key = param_names[id(first.base)]
        layout[key] = {"form": "sparse", "shape": list(first.base.shape)}
        domain = _sparse_domain(forms, dense) if all(isinstance(f, Sparse) for f in forms) else None
        values = dense if domain is None else dense[domain]
        pieces.append(Piece(key, values, dense.numel(), domain))
    pieces.sort(key=lambda p: p.key)  # the official code's sorted keys: ties go to the first names
    return pieces, layout


def _by_base_tensor(delta: Delta) -> dict[int, list]:
    """A built delta's forms grouped by the base tensor they change (refusing activation-side forms)."""
    from deltatune.core.forms.base import WeightDelta

    groups: dict[int, list] = {}
    for name, form in delta.forms.items():
        if not isinstance(form, WeightDelta) or not form.mergeable:
            raise DeltatuneError(
                f"{delta.method.name!r} has a {form.kind} delta at {name}, which changes activations, not weights: "
                "ComPEFT compresses weight deltas (low-rank, dense, sparse and their sums)"
            )
        groups.setdefault(id(form.base), []).append(form)
    return groups


def _plain_factors(forms: list) -> bool:
    """The tensor's delta is one plain LoRA form (ΔW = s·B·A), whose factors can be compressed themselves."""
    from deltatune.core.forms.lowrank import LowRank

    return len(forms) == 1 and type(forms[0]) is LowRank


def lowrank_choice(delta: Delta, lowrank: str | None) -> tuple[str, str | None]:
    """``lowrank`` resolved for a built delta (None: "factors" when some tensor holds plain LoRA factors, else
    "delta") and, when the default chose for a low-rank delta, one line saying so and how to get the other."""
    if lowrank is not None:
        return lowrank, None
    if not any(_plain_factors(forms) for forms in _by_base_tensor(delta).values()):
        return "delta", None
    return "factors", ("low-rank input: compressed its factors A and B, so the result stays low-rank "
                       "(lowrank='delta' / --lowrank delta compresses ΔW = s·B·A instead: a sparse delta, larger)")


def _sparse_domain(forms: list, dense: torch.Tensor) -> torch.Tensor | None:
    """The union of the sparse forms' entries when ΔW is zero outside it (DSEE's pruning mask is not)."""
    idx = torch.unique(torch.cat([f.entries()[0].detach().long().cpu() for f in forms]))
    outside = dense.clone()
    outside[idx] = 0
    return None if bool(outside.any()) else idx


DENSITY, ALPHA = 0.2, 1.0  # the official code's defaults (k=20, replace_factor=1)


def compress(path: str | os.PathLike, out: str | os.PathLike, *, density: float | None = None,
             alpha: float | None = None, scope: str | None = None, lowrank: str | None = None, values: str = "ternary",
             base: str | nn.Module | None = None, overwrite: bool = False, calibrate: Any = None,
             densities: list[float] | None = None, alphas: list[float] | None = None, dev_size: int = 200,
             tolerance: float = 1.0, batch_size: int = 16, min_ratio: float | None = None) -> Path:
    """Compress the weight-side delta saved at ``path`` with ComPEFT and write the result at ``out``.

    ``density``: the fraction of task-vector entries kept (the paper's k/100; default 0.2, the code's);
    ``alpha``: kept entries become ±alpha·std(τ) (default 1); ``scope``: "global" (one top-k and σ over all
    tensors, as the official code; the default, but for a LoRA's factors) or "tensor" (each tensor its own; the
    default for a LoRA's factors, whose B a global top-k would empty); ``lowrank``: "factors" (compress A and B, the paper's LoRA setting;
    the result stays low-rank) or "delta" (compress ΔW = s·B·A), None: factors where the delta has plain LoRA
    factors, else delta (``compression.note`` in the result says what was chosen); ``values``: "ternary" or
    "pruned" (top-k only, values kept); ``base``: the base model or its name (default: the one the artifact
    records). ``out`` is new, empty or an artifact (replaced atomically); ``overwrite`` replaces any other folder.

    ``calibrate``: a data section (a mapping or a ``DataConfig``): choose density, α and scope on a dev split carved
    from its training part (``deltatune.ops.compress_calibrate``): ``densities`` × ``alphas`` × both scopes (defaults:
    0.05, 0.1, 0.2, 0.3 × 0.5, 1, 2, …, 10; a ``density``, ``alpha`` or ``scope`` given fixes it), ``dev_size`` dev
    examples, the smallest artifact within ``tolerance`` (points of dev accuracy, or percent of dev loss for text and chat) of
    the uncompressed delta; or, with ``min_ratio`` (a size target, e.g. 10), the best dev score among the grid points at
    least that many times smaller. The search is recorded in the artifact (``compression.calibration``). Returns ``out``."""
    from deltatune.core import artifact

    options = {"density": DENSITY if density is None else density, "alpha": ALPHA if alpha is None else alpha,
               "scope": "global" if scope is None else scope, "lowrank": lowrank, "values": values}
    _check_options(options["density"], options["alpha"], options["scope"], lowrank or "delta", values)
    options["density"], options["alpha"] = float(options["density"]), float(options["alpha"])
    grid, data = None, None
    if calibrate is not None:
        from deltatune.ops import compress_calibrate

        grid = compress_calibrate.grid_of(density, alpha, scope, densities, alphas, values, dev_size, tolerance,
                                          batch_size, min_ratio)
        data = compress_calibrate.data_config(calibrate)
    elif densities is not None or alphas is not None or min_ratio is not None:
        raise DeltatuneError("densities / alphas / min_ratio are the grid and rule of a calibration: pass "
                             "calibrate=DATA (--calibrate --data NAME_OR_FILE), or one density= / alpha=")
    delta = Delta.read(path)
    source = delta.method
    if source.traits.made_by == "compress":
        raise DeltatuneError(f"{path} is already ComPEFT-compressed: compress the artifact it was made from")
    if source.mergeable is False:
        raise DeltatuneError(f"{path} holds a {source.name!r} delta, which changes activations, not weights: ComPEFT "
                             "compresses weight deltas (low-rank, dense, sparse and their sums)")
    inputs = [path, base, *(data.paths() if data is not None else [])]
    with artifact.destination(out, "artifact", inputs=inputs, overwrite=overwrite):
        if grid is None:
            src = source_of(path, delta, _base_model(path, delta.record, base), lowrank)
            if scope is None and src.lowrank == "factors":
                # one top-k over all of A and B keeps almost nothing of B (it starts at zero and stays far smaller
                # than A), and a factor pair with an empty B changes nothing: each tensor keeps its own share
                options["scope"] = "tensor"
                src.note = f"{src.note}; factors are compressed per tensor (--scope global: one top-k over all)"
            meta, tensors = src.compressed(keep(src.pieces, options["density"], options["scope"]), options)
            _warn_lost(src, meta, options)
        else:
            meta, tensors = compress_calibrate.calibrated(path, delta, base, data, grid, options)
        artifact.write_artifact(out, meta, tensors)
    return Path(out)


def _warn_lost(src: Source, meta: dict[str, Any], options: dict[str, Any]) -> None:
    """Say so when tensors that changed keep nothing at this density and scope (a low-rank form whose A or B lost
    every entry is left out): their change is lost, which the size alone would not show."""
    changed = {p.key if p.key in src.layout else p.key.rsplit(".", 1)[0]  # "<form>.A" / "<form>.B" -> "<form>"
               for p in src.pieces if bool(p.values.any())}
    lost = sorted(k for k in changed if k not in meta["config"]["tensors"])
    if lost:
        warnings.warn(f"{len(lost)} of {len(src.layout)} changed tensors keep nothing at density {options['density']} "
                      f"({options['scope']} scope) and are left out, their change lost (e.g. {lost[0]}); "
                      "scope='tensor' (--scope tensor) keeps a share of every tensor", stacklevel=3)


@dataclass
class Source:
    """A saved delta built (not attached) on its base model, with its task vector: what every compression of it
    starts from (a calibration compresses it at many grid points)."""

    path: str | os.PathLike
    delta: Delta
    model: nn.Module
    shapes: str
    pieces: list[Piece]
    layout: dict[str, dict]
    lowrank: str
    note: str | None  # what the default chose for a low-rank delta, and how to get the other
    original: int  # the source's stored bytes
    fingerprint: dict[str, Any]  # the base's, over every tensor a compression of it may touch

    def compressed(self, kept: Kept, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The compressed artifact's description and tensors for ``options``' alpha and values (``kept``: the
        entries its density and scope keep)."""
        from deltatune.core import artifact, registry
        from deltatune.version import __version__

        alpha, scope, values = options["alpha"], options["scope"], options["values"]
        chosen = kept.values(alpha, values)
        tensors, records = _encode_all(chosen, self.pieces, self.layout, values)
        method, meta = registry.get("compeft"), self.delta.record
        cfg = registry.make_config(method, {
            "source_method": self.delta.method.name, "source_config": meta["config"], "source_bytes": self.original,
            "density": float(options["density"]), "alpha": float(alpha), "scope": scope, "lowrank": self.lowrank,
            "values": values, "tensors": records,
        })
        fp = {**self.fingerprint, "tensors": {k: v for k, v in self.fingerprint["tensors"].items() if k in records}}
        stored = sum(t.numel() * t.element_size() for t in tensors.values())
        entries = sum(p.values.numel() for p in self.pieces)
        n_kept = sum(int(v[0].numel()) for v in chosen.values())
        out_meta = {
            "format": "deltatune", "format_version": artifact.FORMAT_VERSION, "deltatune_version": __version__,
            "method": method.name, "config": registry.config_to_dict(cfg), "fingerprint": fp,
            "sizes": {"trainable": 0, "stored_bytes": stored, "original_bytes": self.original},
            "compression": {
                "source": str(self.path), "source_method": self.delta.method.name, "entries": entries, "kept": n_kept,
                "density": n_kept / max(1, entries), "ratio": self.original / max(1, stored),
                **({"note": self.note} if self.note else {}),
            },
        }
        return out_meta, tensors


def source_of(path: str | os.PathLike, delta: Delta, model: nn.Module, lowrank: str | None) -> Source:
    """Build ``delta`` (read, not built) on ``model`` without attaching it, check the base and read its task
    vector. ``model`` must carry no delta."""
    from deltatune.core import artifact

    meta = delta.record
    shapes, names = artifact.shapes_hash(model), names_of(model)
    delta.build(model, shapes=shapes)  # not attached: only its task vector is read
    lowrank, note = lowrank_choice(delta, lowrank)
    pieces, layout = task_vector(delta, lowrank, names)
    original = int(meta.get("sizes", {}).get("stored_bytes") or delta.stored_bytes())
    fp = artifact.fingerprint(model, {k: _base_of(model, k, layout[k]) for k in layout}, shapes)
    _check_same_base(meta.get("fingerprint", {}), fp, path)
    return Source(path, delta, model, shapes, pieces, layout, lowrank, note, original, fp)


def _base_of(model: nn.Module, key: str, record: dict) -> torch.Tensor:
    if record["form"] == "lowrank":
        return model.get_submodule(key.rpartition(".")[0]).weight
    return model.get_parameter(key)


def _check_same_base(source: dict, new: dict, path: str | os.PathLike) -> None:
    """The compressed delta touches a subset of the source's base tensors: they must hash the same."""
    from deltatune.core import artifact

    same = {k: v for k, v in source.get("tensors", {}).items() if k in new["tensors"]}
    diffs = artifact.compare_fingerprints({**source, "tensors": same}, new)
    if diffs:
        raise DeltatuneError(f"{path}: the base model given does not match the artifact's ({'; '.join(diffs)})")


def _encode_all(kept: dict[str, tuple[torch.Tensor, torch.Tensor]], pieces: list[Piece], layout: dict[str, dict],
                mode: str) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Stored tensors ``<form>.<part>.<name>`` and the config's per-form records (forms that keep nothing
    are left out: a low-rank form needs both factors)."""
    numel = {p.key: p.numel for p in pieces}
    tensors: dict[str, torch.Tensor] = {}
    records: dict[str, dict] = {}
    for key, rec in layout.items():
        parts = ["A", "B"] if rec["form"] == "lowrank" else [""]
        names = [f"{key}.{p}" if p else key for p in parts]
        if not all(n in kept for n in names):
            continue
        record = dict(rec)
        for part, name in zip(parts, names, strict=True):
            stored, enc = encode(*kept[name], numel[name], mode)
            tensors.update({f"{name}.{t}": v for t, v in stored.items()})
            if part:
                record[part] = enc
            else:
                record.update(enc)
                record["form"] = "dense" if enc["k"] > DENSE_ABOVE * numel[name] else "sparse"
        records[key] = record
    return tensors, records

