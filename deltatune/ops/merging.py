"""Merging deltas trained on different tasks into one delta: task arithmetic, TIES, DARE, magnitude pruning, and
the exact low-rank concatenation (``dt.merge_deltas``, ``deltatune merge-deltas``).

Words: *merge deltas* (this module) makes one new delta of several; *combine* is its rule on one tensor's task
vectors. Folding a delta into the base weights is ``Tuned.merge`` / ``deltatune merge``, and applying several deltas
at once, each removable, is ``deltatune.ops.compose``.

Every weight-side delta (low-rank, dense, sparse, sums of them) becomes its task vector per base tensor,
ΔW_i = the sum of that delta's forms on the tensor, and the merge combines the ΔW_i of the deltas that touch
the tensor (a delta that does not touch it takes no part there, as in PEFT):

- ``task_arithmetic`` (Ilharco et al., 2023): Σ w_i ΔW_i.
- ``ties`` (Yadav et al., 2023): trim each ΔW_i to its top ``density`` fraction by magnitude
  (k = ⌊density · numel⌋), elect the sign of the summed trimmed values per entry (majority by mass;
  ``majority="frequency"``: by count), then the disjoint mean Σ_agree w_i ΔW_i / #agree over the entries whose
  sign agrees. The weights enter after the election, as PEFT's ``ties`` does.
- ``dare_linear`` / ``dare_ties`` (Yu et al., 2024): drop each entry with probability 1 − density and rescale the
  rest by 1/density (masks drawn from ``torch.Generator().manual_seed(seed)``, tensor by tensor in model order,
  delta by delta), then the weighted sum, or TIES' election and disjoint mean.
- ``magnitude_prune``: trim as TIES does, then the weighted sum.
- ``cat`` (low-rank deltas only): A = [w_1 s_1 A_1; w_2 s_2 A_2; …], B = [B_1 B_2 …] at scale 1, so
  B A = Σ w_i s_i B_i A_i exactly: task arithmetic at the sum of the ranks, kept low-rank.

The result is one artifact that ``dt.load`` takes: a dense delta per touched tensor (method ``full`` with those
tensors as targets: the format of a full fine-tune), with ``rank=r`` the SVD truncation of every merged ΔW to
rank r (a LoRA artifact, B = U_r S_r, A = V_rᵀ, scale 1), and for ``cat`` a LoRA artifact of rank Σ r_i. Its
``deltatune.json`` carries the base fingerprint and says what was merged (``merged_from``, with a ``note``
when the default for low-rank inputs chose the form).

Low-rank inputs stay low-rank by default. When every input is a plain LoRA (ΔW = s·B·A on each tensor it
touches) and neither ``rank``, ``space="factors"`` nor ``dense=True`` is given, a dense result would be the size
of the touched weights (two 1.8 MiB LoRAs of SmolLM2 gave a 50 MiB artifact), so instead:

- ``task_arithmetic`` is done as ``cat``: the same ΔW exactly, at rank Σ r_i (the inputs' total size);
- ``ties`` / ``dare_*`` / ``magnitude_prune`` merge ΔW as above and keep the truncated SVD of each merged ΔW at
  the total rank Σ r_i of the inputs touching that tensor: its best rank-Σr_i approximation (Eckart–Young),
  PEFT's ``ties_svd`` / ``dare_ties_svd`` / ... with ``svd_rank`` = Σ r_i. We merge ΔW and not the factors
  because TIES' trim and sign election and DARE's drop-and-rescale are defined on the task vector's entries,
  and the entries of A and B are not determined by ΔW (B·A = (B·R)(R⁻¹·A) for any invertible R), so a
  merge of the factors depends on their basis (PEFT offers it as its non-SVD ``ties``: ``space="factors"``
  here). The total rank, not PEFT's default max r_i, because task arithmetic's ΔW has rank up to Σ r_i: at that
  rank nothing is lost before trimming, and the result is the size of the inputs together.

``dense=True`` (``--dense``) gives the full-rank dense result; ``rank=r`` another rank.

PEFT's ``add_weighted_adapter`` (peft 0.21.2) and how to get the same merged model here:

=========================================  ====================================================================
PEFT combination_type                      deltatune
=========================================  ====================================================================
``svd``, ``ties_svd``, ``dare_linear_svd``  how = task_arithmetic / ties / dare_linear / dare_ties /
``dare_ties_svd``, ``magnitude_prune_svd``  magnitude_prune: the same ΔW merge; PEFT then truncates with an SVD to
                                           ``svd_rank`` (default: the largest input rank): pass ``rank=svd_rank``.
                                           Without ``rank`` nothing is truncated (PEFT's result at full rank).
``cat``                                    how="cat" (identical factors)
``linear``, ``ties``, ``dare_linear``,      the same ``how`` (linear = task_arithmetic) with ``space="factors"``:
``dare_ties``, ``magnitude_prune``          PEFT applies the merge to the A's and to the B's separately (weights
                                           √|w s| on both, the sign on A), not to ΔW. Equal ranks per layer.
=========================================  ====================================================================

With equal masks PEFT's random draws come out the same: PEFT draws from torch's global generator (seeded by
``torch.manual_seed``), in the same order, but its new adapter's initialisation draws from it first, so a test
swaps PEFT's ``random_pruning`` for one drawing from a generator seeded as here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn as nn

from deltatune.core import artifact, registry
from deltatune.core.delta import Delta
from deltatune.core.forms.base import WeightDelta
from deltatune.core.forms.lowrank import LowRank
from deltatune.core.tuned import DeltaSource, Tuned, attach, carried_by, delta_of
from deltatune.errors import DeltatuneError
from deltatune.interop.peft import svd_factors

HOWS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune", "cat")
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SPACES = ("delta", "factors")
Majority = Literal["total", "frequency"]


# -- the merge rules on a list of task tensors (one base tensor, or one factor) ----------------------------
def trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ⌊density · numel⌋ entries of largest magnitude (TIES' trim; ties broken by torch.topk)."""
    if density >= 1:
        return t
    mask = torch.zeros_like(t).reshape(-1)
    mask[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True).indices] = 1
    return t * mask.reshape(t.shape)


def drop(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale by 1/density (E[drop(t)] = t)."""
    if density >= 1:
        return t  # nothing dropped, and no random draw (PEFT's prune returns early too)
    return t * torch.bernoulli(torch.full_like(t, density), generator=generator) / density


def elect(stacked: torch.Tensor, majority: Majority = "total") -> torch.Tensor:
    """Per entry, whether each task's sign agrees with the elected sign (that of the summed values, or of the
    count of signs); a zero entry never agrees. Ties of the vote go to +."""
    sign = stacked.sign()
    if majority == "total":
        vote = stacked.sum(dim=0)
    elif majority == "frequency":
        vote = sign.sum(dim=0)
    else:
        raise DeltatuneError(f"majority={majority!r}: use 'total' (sign of the summed values) or 'frequency'")
    return sign == torch.where(vote >= 0, 1, -1)


def combine(tensors: list[torch.Tensor], weights: list[float], how: str, density: float | None,
            generator: torch.Generator | None = None, majority: Majority = "total") -> torch.Tensor:
    """The merge of one tensor's task vectors (same shape) with per-task weights."""
    if how in ("ties", "magnitude_prune"):
        tensors = [trim(t, density) for t in tensors]  # type: ignore[arg-type]
    elif how in ("dare_linear", "dare_ties"):
        tensors = [drop(t, density, generator) for t in tensors]  # type: ignore[arg-type]
    stacked = torch.stack(tensors, dim=0)
    w = torch.tensor(weights, device=stacked.device).to(stacked.dtype).view(-1, *[1] * (stacked.dim() - 1))
    if how in ("ties", "dare_ties"):
        agree = elect(stacked, majority)
        return (stacked * w * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)
    return (stacked * w).sum(dim=0)


# -- merge_deltas -----------------------------------------------------------------------------------------
def merge_deltas(
    deltas: Sequence[DeltaSource],
    out: str | os.PathLike | None = None,
    *,
    how: str = "task_arithmetic",
    weights: Sequence[float] | None = None,
    density: float | None = None,
    seed: int = 0,
    majority: Majority = "total",
    rank: int | None = None,
    space: str = "delta",
    dense: bool = False,
    base: str | nn.Module | None = None,
    overwrite: bool = False,
) -> Tuned:
    """Combine deltas (artifact paths or ``Tuned`` models of one base model) into one delta (see the module
    docstring for ``how``, ``space`` and ``rank``) and return it attached to the base model, as ``dt.load``
    would; with ``out``, also save it there.

    ``weights``: one per delta (default 1.0 each); ``density``: the kept fraction for ties / dare_* /
    magnitude_prune (required there; TIES' paper keeps 0.2); ``seed``: DARE's masks. ``base``: the base model
    (a module without a delta attached, or a name / folder as for ``deltatune merge``); by default the model named
    in the first delta's fingerprint is loaded. ``dense``: a dense result even for LoRA inputs (which otherwise
    stay low-rank: see the module docstring). ``out`` is new, empty or an artifact (replaced atomically);
    ``overwrite`` replaces any other folder."""
    weights = _check_options(deltas, how, weights, density, majority, rank, space)
    if dense and (rank is not None or how == "cat" or space == "factors"):
        raise DeltatuneError("dense=True asks for the full-rank ΔW; rank=, how='cat' and space='factors' give a "
                             "low-rank result: pass one or the other")
    parts = [delta_of(d) for d in deltas]  # every artifact is read (and checked) before a model is loaded
    combine_args = dict(weights=weights, density=density, seed=seed, majority=majority)
    if out is None:
        return _merged(parts, base, how, space, rank, dense, combine_args)[0]
    with artifact.destination(out, "artifact", inputs=[*deltas, base], overwrite=overwrite):
        tuned, result, note = _merged(parts, base, how, space, rank, dense, combine_args)
        record = {"how": how, "space": space, "weights": list(weights), "density": density, "seed": seed,
                  "majority": majority, "rank": rank, "result": result,
                  "sources": [{"name": part.name, "method": part.method.name} for part in parts],
                  **({"note": note} if note else {})}
        artifact.write_artifact(out, {**tuned.describe(), "merged_from": record}, tuned.delta_state_dict())
    return tuned


def _merged(parts: list[Delta], base: str | nn.Module | None, how: str, space: str, rank: int | None, dense: bool,
            combine_args: dict[str, Any]) -> tuple[Tuned, str, str | None]:
    """The deltas combined into one, attached to the base model; what the result is ("dense", "cat", "svd",
    "factors") and, when the default for LoRA inputs chose it, one line saying so and how to get the other."""
    weights = combine_args["weights"]
    model = _base_model(parts[0], base)
    shapes = artifact.shapes_hash(model)
    for part in parts:
        part.build(model, shapes=shapes, fix="Merge deltas of one base model (see `deltatune inspect`).")
    for part in parts:
        for fname, form in part.forms.items():
            if not isinstance(form, WeightDelta) or not form.mergeable:
                raise DeltatuneError(f"{part.name}: its {form.kind} delta at {fname} changes activations, not "
                                     "weights; only weight-side deltas (low-rank, dense, sparse) can be merged")
    by_tensor = _by_tensor(model, parts)
    keep_lowrank = not dense and rank is None and space == "delta" and _all_plain_lora(by_tensor)
    if how == "cat":
        return _cat(model, by_tensor, weights), "cat", None
    if space == "factors":
        return _factorwise(model, by_tensor, how, **combine_args), "factors", None  # type: ignore[arg-type]
    if keep_lowrank and how == "task_arithmetic":
        return _cat(model, by_tensor, weights), "cat", (
            "LoRA inputs: merged as how='cat' (the same ΔW exactly, at the sum of their ranks; a dense result: "
            "--dense / dense=True)")
    merged = _combine_task_vectors(by_tensor, how, **combine_args)  # type: ignore[arg-type]
    if keep_lowrank:
        ranks = {name: sum(f.r for _, forms in touching for f in forms) for name, touching in by_tensor.items()}
        total = max(ranks.values(), key=list(ranks.values()).count)
        return _as_lowrank(model, by_tensor, merged, ranks), "svd", (
            f"LoRA inputs: each merged ΔW kept as its best rank-{total} approximation (truncated SVD at the sum of "
            "the inputs' ranks); the full-rank dense result: --dense / dense=True")
    if rank:
        return _as_lowrank(model, by_tensor, merged, rank), "svd", None
    return _as_dense(model, by_tensor, merged), "dense", None


def _all_plain_lora(by_tensor: dict[str, list[tuple[int, list[WeightDelta]]]]) -> bool:
    """Every input's delta on every tensor is one plain LoRA form (ΔW = s·B·A on one weight matrix)."""
    return bool(by_tensor) and all(
        len(forms) == 1 and isinstance(forms[0], LowRank) and type(forms[0]).delta_weight is LowRank.delta_weight
        and len(forms[0].sites) == 1 and forms[0].sites[0][1] == "weight"
        for touching in by_tensor.values() for _, forms in touching)


def _check_options(deltas: Sequence[DeltaSource], how: str, weights: Sequence[float] | None, density: float | None,
                   majority: str, rank: int | None, space: str) -> list[float]:
    if isinstance(deltas, str | os.PathLike | Tuned) or not deltas:
        raise DeltatuneError("merge_deltas takes a list of deltas: dt.merge_deltas(['runs/a', 'runs/b'], how='ties', "
                             "density=0.2)")
    if how not in HOWS:
        raise DeltatuneError(f"how={how!r} is not a merge: use one of {list(HOWS)}")
    if space not in SPACES:
        raise DeltatuneError(f"space={space!r}: use 'delta' (merge ΔW per tensor) or 'factors' (PEFT's merge of "
                             "LoRA factors)")
    if how in NEEDS_DENSITY:
        if density is None:
            raise DeltatuneError(f"how={how!r} needs density (the fraction of entries kept, in (0, 1]; "
                                 "the TIES paper keeps 0.2)")
        if not 0 < density <= 1:
            raise DeltatuneError(f"density={density} must be in (0, 1] (the fraction of entries kept)")
    elif density is not None:
        raise DeltatuneError(f"density is an option of {', '.join(NEEDS_DENSITY)}; how={how!r} keeps every entry")
    if majority not in ("total", "frequency"):
        raise DeltatuneError(f"majority={majority!r}: use 'total' (sign of the summed values) or 'frequency'")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise DeltatuneError(f"rank={rank!r} must be a positive integer (or None: no truncation)")
    if rank is not None and (how == "cat" or space == "factors"):
        raise DeltatuneError("rank= truncates a merged ΔW; cat and space='factors' already give a low-rank delta")
    w = [1.0] * len(deltas) if weights is None else [float(x) for x in weights]
    if len(w) != len(deltas):
        raise DeltatuneError(f"{len(w)} weights for {len(deltas)} deltas: give one weight per delta")
    return w


def _base_model(first: Delta, base: str | nn.Module | None) -> nn.Module:
    from deltatune.data import models

    if base is None:
        base = first.fingerprint().get("name_or_path")
        if not base:
            raise DeltatuneError("the deltas do not say which base model they belong to: pass base=<the base model "
                                 "or its name>")
    model = models.load_base(base, first.head)
    if isinstance(model, Tuned) or carried_by(model) is not None:
        raise DeltatuneError("base must be the base model without a delta attached (tuned.detach() returns it)")
    return model


def _by_tensor(model: nn.Module, parts: list[Delta]) -> dict[str, list[tuple[int, list[WeightDelta]]]]:
    """Base tensor name (model order) -> [(delta index, its forms on that tensor)] for the deltas touching it."""
    names = {id(p): n for n, p in model.named_parameters()}
    found: dict[str, dict[int, list[WeightDelta]]] = {}
    for i, part in enumerate(parts):
        for form in part.forms.values():
            found.setdefault(names[id(form.base)], {}).setdefault(i, []).append(form)  # type: ignore[union-attr]
    order = {n: k for k, n in enumerate(names.values())}
    return {n: sorted(found[n].items()) for n in sorted(found, key=order.__getitem__)}


def _task_vector(forms: list[WeightDelta]) -> torch.Tensor:
    with torch.no_grad():
        total = forms[0].delta_weight().detach().float()
        for f in forms[1:]:
            total = total + f.delta_weight().detach().float()
    return total


def _combine_task_vectors(by_tensor: dict[str, list[tuple[int, list[WeightDelta]]]], how: str, weights: list[float],
                       density: float | None, seed: int, majority: Majority) -> dict[str, torch.Tensor]:
    generator: torch.Generator | None = None
    merged = {}
    for name, touching in by_tensor.items():
        # a delta whose forms cover a tensor but leave it unchanged (a sparse method's empty tensors) takes no part
        vectors = [(i, t) for i, forms in touching if bool((t := _task_vector(forms)).any())]
        if not vectors:
            continue
        if generator is None:
            generator = torch.Generator(device=vectors[0][1].device).manual_seed(seed)
        merged[name] = combine([t for _, t in vectors], [weights[i] for i, _ in vectors], how, density, generator,
                               majority)
    return merged


def _as_dense(model: nn.Module, by_tensor: dict[str, Any], merged: dict[str, torch.Tensor]) -> Tuned:
    if not merged:
        raise DeltatuneError("the deltas change no tensor: there is nothing to merge")
    for name in merged:
        touching = by_tensor[name]
        for _, forms in touching:
            if any(getattr(f, "unties_on_merge", False) for f in forms):
                raise DeltatuneError(
                    f"{name} is tied to another module but the delta applies at one of them only (LoRA on a tied "
                    "embedding); a dense merged delta would change both: pass rank=... (a low-rank result keeps "
                    "the tie as LoRA does) or how='cat'"
                )
    method = registry.get("full")
    tuned = attach(model, registry.make_config(method, {"targets": list(merged)}), _loading=True)
    forms = tuned.forms()
    with torch.no_grad():
        for name, delta in merged.items():
            forms[name].delta.copy_(delta)  # type: ignore[union-attr, operator]
    return tuned


# -- low-rank results -------------------------------------------------------------------------------------
def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _lora(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Tuned:
    """A LoRA delta at scale 1 with the given (A, B) per module name (rank per module; the most common as r)."""
    ranks = {n: a.shape[0] for n, (a, _) in factors.items()}
    r = max(ranks.values(), key=list(ranks.values()).count)
    pattern = {_exact(n): k for n, k in ranks.items() if k != r}
    cfg = {"r": r, "alpha": r, "targets": list(factors), "rank_pattern": pattern,
           "alpha_pattern": {k: float(v) for k, v in pattern.items()}}
    tuned = attach(model, registry.make_config(registry.get("lora"), cfg), _loading=True)
    forms = tuned.forms()
    with torch.no_grad():
        for name, (a, b) in factors.items():
            form = forms[f"{name}.weight"]
            form.A.copy_(a)  # type: ignore[union-attr, operator]
            form.B.copy_(b)  # type: ignore[union-attr, operator]
    return tuned


def _exact(module_name: str) -> str:
    """A LoRA rank_pattern key that matches this module only (PEFT semantics: a regex on the name's end)."""
    import re

    return "^" + re.escape(module_name)


def _plain_lowrank(name: str, forms: list[WeightDelta], what: str) -> LowRank:
    form = forms[0]
    if len(forms) != 1 or not isinstance(form, LowRank) or type(form).delta_weight is not LowRank.delta_weight:
        kinds = ", ".join(f.kind for f in forms)
        raise DeltatuneError(f"{what} needs LoRA deltas (ΔW = s·B·A): {name} has {kinds}. Use how='task_arithmetic' "
                             "(or ties / dare_*) on ΔW instead")
    return form


def _as_lowrank(model: nn.Module, by_tensor: dict[str, Any], merged: dict[str, torch.Tensor],
                rank: int | dict[str, int]) -> Tuned:
    """Each merged ΔW truncated by an SVD (PEFT's *_svd): B = U_r S_r, A = V_rᵀ. ``rank``: one rank for every
    tensor (zero-padded where a matrix has fewer singular values, as PEFT), or a rank per tensor name (at most
    the matrix's own)."""
    factors = {}
    for name, delta in merged.items():
        module, layout = _matrix_module(model, name, by_tensor[name])
        m = delta if layout == "linear" else delta.T  # (out, in) as B A is
        r = min(rank[name], min(m.shape)) if isinstance(rank, dict) else rank
        top_a, top_b = svd_factors(m, r)  # the export's SVD (interop.peft): k = min(r, out, in) factors
        k = top_a.shape[0]
        a = torch.zeros(r, m.shape[1], dtype=m.dtype, device=m.device)
        b = torch.zeros(m.shape[0], r, dtype=m.dtype, device=m.device)
        a[:k], b[:, :k] = top_a, top_b
        factors[module] = (a, b)
    return _lora(model, factors)


def _matrix_module(model: nn.Module, name: str, touching: list[tuple[int, list[WeightDelta]]]) -> tuple[str, str]:
    from deltatune.core.forms.lowrank import layout_of

    form = touching[0][1][0]
    if any(len(f.sites) != 1 for _, forms in touching for f in forms):
        raise DeltatuneError(f"{name} is a tied weight changed at all its modules; a low-rank result would change "
                             "one of them only. Leave rank unset (a dense result)")
    module = form.sites[0][0]
    try:
        layout = layout_of(module)
    except DeltatuneError:
        layout = ""
    if form.sites[0][1] != "weight" or not layout:
        raise DeltatuneError(f"rank= keeps the merge low-rank, which needs the weight matrix of a Linear, GPT-2 Conv1D "
                             f"or Embedding; {name} is not one. Leave rank unset (a dense result)")
    return _module_name(model, module), layout


def _cat(model: nn.Module, by_tensor: dict[str, Any], weights: list[float]) -> Tuned:
    """PEFT's ``cat``: A = [w_i s_i A_i], B = [B_i] (w_i s_i multiplied in PEFT's order)."""
    factors = {}
    for name, touching in by_tensor.items():
        forms = [(weights[i], _plain_lowrank(name, fs, "how='cat'")) for i, fs in touching]
        a = torch.cat([f.A.detach() * w * f.scale for w, f in forms], dim=0)
        b = torch.cat([f.B.detach() for _, f in forms], dim=1)
        factors[_module_name(model, forms[0][1].sites[0][0])] = (a, b)
    return _lora(model, factors)


def _factorwise(model: nn.Module, by_tensor: dict[str, Any], how: str, weights: list[float], density: float | None,
                seed: int, majority: Majority) -> Tuned:
    """PEFT's non-SVD merges of LoRA factors: ``how`` applied to the A's with weights sign·√|w s| and to the
    B's with √|w s|, layer by layer (A's, then B's: the order of DARE's draws)."""
    generator: torch.Generator | None = None
    factors = {}
    for name, touching in by_tensor.items():
        forms = [(weights[i], _plain_lowrank(name, fs, "space='factors'")) for i, fs in touching]
        if len({f.r for _, f in forms}) != 1:
            raise DeltatuneError(f"space='factors' needs equal ranks at each layer (PEFT's rule); {name} has "
                                 f"{[f.r for _, f in forms]}: use how='cat' or the ΔW merge (space='delta')")
        ws = [w * f.scale for w, f in forms]
        wa = [math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in ws]
        wb = [math.sqrt(abs(x)) for x in ws]
        a_s = [f.A.detach() for _, f in forms]
        b_s = [f.B.detach() for _, f in forms]
        if generator is None:
            generator = torch.Generator(device=a_s[0].device).manual_seed(seed)
        a = combine(a_s, wa, how, density, generator, majority).to(a_s[0].dtype)
        b = combine(b_s, wb, how, density, generator, majority).to(b_s[0].dtype)
        factors[_module_name(model, forms[0][1].sites[0][0])] = (a, b)
    return _lora(model, factors)
