"""ComPEFT's density and α chosen on a dev split: ``dt.compress(ART, OUT, calibrate=DATA)``,
``deltatune compress ART --out OUT --calibrate --data NAME_OR_FILE``.

ComPEFT's 8–50× at about no loss rests on choosing α (and the density) on validation data (the paper searches
them per task). Here:

- **the dev split** comes from the *training* part of the data section given (``dev_split``): the same
  split as training and ``deltatune eval`` make (``data.eval_fraction``, ``data.seed``), minus the training
  examples a run on that section uses (``data.max_train``'s subsample, a mix's weighted draw) and minus any
  example whose tokens equal one of the eval split's (duplicate texts). The eval split is read only to drop
  those duplicates: no score is ever computed on it. ``dev_size`` examples (200) are drawn with ``data.seed``.
  Without ``data.max_train`` every training example may have trained the delta: the dev examples are then drawn
  from all of them, and the record and a warning say so.
- **the grid**: densities {0.05, 0.1, 0.2, 0.3} × α ∈ {0.5, 1, 2, …, 10} (the spec's range) × both scopes, or
  ``densities`` / ``alphas``; a ``density``, ``alpha`` or ``scope`` given fixes it. The scope is searched because
  a LoRA's factors differ in scale (B starts at zero and stays far smaller than A in a short run): one global top-k
  and σ over A and B keeps almost no entry of B and gives the few it keeps A's scale, while per-tensor top-k and
  σ keep both factors. With ``values="pruned"`` α has no effect: it is not searched.
- **the cost**: the base model is loaded once and the task vector read once. Per (scope, density) the kept entries are
  chosen and encoded once (the artifact's size depends on the density only: α changes one fp32 scale per group),
  its delta attached once, and each α loaded into the attached forms in place (the packed tensors with another
  scale, decoded as ``dt.load`` decodes them) before one pass over the dev split. These are searched from the
  smallest artifact up, and one whose artifact is larger than a point already within tolerance is skipped (it
  cannot be chosen); skipped points are recorded with no score.
- **the rule**: the reference is the uncompressed delta's dev score (accuracy for classification, else loss).
  The choice is the smallest artifact whose score is within ``tolerance`` of it (points of accuracy; percent of
  the loss for text and chat), ties broken by the better score (then the lower loss, then grid order). If no point
  is within tolerance, the best score (with a warning).
- **a size target** (``min_ratio``, ``--min-ratio R``): the artifact must be at least R× smaller than the
  uncompressed delta; every grid point that small is evaluated (none larger), and the choice is the best dev score
  among them (ties: the smaller artifact). The smallest-within-tolerance rule picks a point at the edge of the
  tolerance, whose dev score is the best of many noisy α at that density: on held-out data it tends to lose more
  than the tolerance (the winner's curse). With a size target, the tolerance only decides whether a warning says
  that the best point that small still loses more than it.

The written artifact is exactly ``dt.compress(ART, OUT, density=d, alpha=a, scope=s)`` of the chosen point, plus
``compression.calibration``: the data, the dev split, the reference, every point's size, ratio and dev metrics,
and the choice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from deltatune.core.delta import Delta
from deltatune.core.registry import problem_list
from deltatune.errors import DeltatuneError
from deltatune.ops.compress import SCOPES, Kept, Source, _base_model, keep, source_of

DENSITIES = (0.05, 0.1, 0.2, 0.3)
ALPHAS = (0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0)
EPS = 1e-9  # float slack of "within tolerance": an accuracy exactly one point below the reference qualifies


class CalibrationWarning(UserWarning):
    """A calibration's caveat (dev examples the delta may have trained on; no point within tolerance). The same
    lines are in the artifact's ``compression.calibration.warnings``; the CLI prints them from there."""


@dataclass(frozen=True)
class Grid:
    """What a calibration searches and how it chooses."""

    densities: tuple[float, ...]
    alphas: tuple[float, ...]
    scopes: tuple[str, ...]
    dev_size: int
    tolerance: float  # points of accuracy, or percent of the loss
    batch_size: int
    min_ratio: float | None = None  # a size target: the best dev score among points at least this many times smaller


def grid_of(density: float | None, alpha: float | None, scope: str | None, densities: list[float] | None,
            alphas: list[float] | None, values: str, dev_size: int, tolerance: float, batch_size: int,
            min_ratio: float | None = None) -> Grid:
    """The grid from ``compress``'s options (a given density / alpha / scope fixes it), every problem in one error."""
    problems = []
    if density is not None and densities is not None:
        problems.append("give density (one) or densities (a grid), not both")
    if alpha is not None and alphas is not None:
        problems.append("give alpha (one) or alphas (a grid), not both")
    d_grid = _numbers(densities, "densities", lambda x: 0 < x <= 1, "in (0, 1]", problems)
    a_grid = _numbers(alphas, "alphas", lambda x: math.isfinite(x) and x > 0, "positive", problems)
    if _bad_int(dev_size, 1):
        problems.append(f"dev_size={dev_size!r} must be a whole number of at least 1 (dev examples)")
    if _bad_int(batch_size, 1):
        problems.append(f"batch_size={batch_size!r} must be a whole number of at least 1")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int | float) or not (
            math.isfinite(tolerance) and tolerance >= 0):
        problems.append(f"tolerance={tolerance!r} must be a number >= 0 (points of dev accuracy, or percent of the "
                        "dev loss for text and chat)")
    if min_ratio is not None and (isinstance(min_ratio, bool) or not isinstance(min_ratio, int | float) or not (
            math.isfinite(min_ratio) and min_ratio >= 1)):
        problems.append(f"min_ratio={min_ratio!r} must be a number >= 1 (how many times smaller than the "
                        "uncompressed delta the artifact must be, e.g. 10)")
    if problems:
        raise DeltatuneError(problem_list("bad calibration options", problems))
    d_grid = (float(density),) if density is not None else d_grid or DENSITIES
    a_grid = (float(alpha),) if alpha is not None else a_grid or ALPHAS
    if values == "pruned":  # pruned values keep τ: α changes nothing, so searching it would only repeat points
        a_grid = a_grid[:1]
    scopes = SCOPES if scope is None else (scope,)
    return Grid(d_grid, a_grid, scopes, int(dev_size), float(tolerance), int(batch_size),
                None if min_ratio is None else float(min_ratio))


def _numbers(items: list[float] | None, name: str, ok: Any, rule: str, problems: list[str]) -> tuple[float, ...]:
    if items is None:
        return ()
    bad = [x for x in items if isinstance(x, bool) or not isinstance(x, int | float) or not ok(x)]
    if not items or bad:
        problems.append(f"{name}={list(items)!r} must be a non-empty list of numbers {rule}")
        return ()
    return tuple(dict.fromkeys(float(x) for x in items))  # in the order given, each once


def _bad_int(value: Any, least: int) -> bool:
    return isinstance(value, bool) or not isinstance(value, int) or value < least


def data_config(calibrate: Any) -> Any:
    """``calibrate`` as a ``DataConfig``: one as is, a mapping as a run config's data section (a list: a mix)."""
    from deltatune.data.config import DataConfig

    if isinstance(calibrate, DataConfig):
        cfg = calibrate
    elif isinstance(calibrate, dict | list):
        values = {"mix": calibrate} if isinstance(calibrate, list) else dict(calibrate)
        try:
            cfg = DataConfig(**values)
        except TypeError as e:  # an unknown key
            raise DeltatuneError(f"calibrate: {e}; it takes the keys of a run config's data section "
                                 "(docs/config.md)") from e
    else:
        raise DeltatuneError(f"calibrate={calibrate!r} must be a data section: a mapping such as "
                             "{'name': 'tweets', 'labels': ['negative', 'positive']} or a DataConfig")
    problems = cfg.problems()
    if problems:
        raise DeltatuneError("calibrate: " + "; ".join(problems))
    return cfg


# -- the dev split ---------------------------------------------------------------------------------------------------
def dev_split(cfg: Any, tokenizer: Any, model: nn.Module, size: int) -> tuple[Any, dict[str, Any]]:
    """A copy of the task of ``cfg`` whose eval part is the dev split (see the module's docstring), and its
    record: ``examples``, ``requested``, ``available``, ``seed``, ``seen_in_training``."""
    from deltatune.data import tasks

    if cfg.task == "edit":
        raise DeltatuneError("task 'edit' trains and evaluates on the edits themselves, so no held-out dev split "
                             "exists: compress an edit delta with a fixed --density / --alpha")
    every = tasks.build_task(_derived(cfg, max_train=None, max_eval=None, weight=1.0, packing=False), tokenizer, model)
    subsampled = any(p.max_train is not None or p.weight != 1.0 for p in cfg.parts())
    used = tasks.build_task(_derived(cfg, packing=False), tokenizer, model) if subsampled else every
    held = {_key(f) for f in every.eval}
    trained = {_key(f) for f in used.train}
    pool = _unique(f for f in every.train if _key(f) not in held and _key(f) not in trained)
    seen = not pool
    if seen:  # every training example may have trained the delta: draw from them (said in the record)
        pool = _unique(f for f in every.train if _key(f) not in held)
    if not pool:
        raise DeltatuneError("no training example differs from the eval split's, so there is nothing to carve a dev "
                             "split from: use more data or another data.seed")
    dev = random.Random(cfg.seed).sample(pool, min(size, len(pool)))
    task = _with_eval(every, dev)
    return task, {"examples": len(dev), "requested": size, "available": len(pool), "seed": cfg.seed,
                  "seen_in_training": seen}


def _derived(cfg: Any, **changes: Any) -> Any:
    """``cfg`` with ``changes`` in every part (a mix's shared keys must agree across its parts)."""
    from deltatune.data.config import DataConfig

    if cfg.mix is None:
        return dataclasses.replace(cfg, **changes)
    return DataConfig(mix=[dataclasses.replace(p, **changes) for p in cfg.mix])


def _key(feature: dict[str, Any]) -> tuple[int, ...]:
    # an example is its tokens: a text that also is in the eval split (or trains) is that example, whatever its label
    return tuple(feature["input_ids"])


def _unique(features: Any) -> list[dict[str, Any]]:
    seen: set[tuple[int, ...]] = set()
    out = []
    for f in features:
        if _key(f) not in seen:
            seen.add(_key(f))
            out.append(f)
    return out


def _with_eval(task: Any, dev: list[dict[str, Any]]) -> Any:
    import copy

    out = copy.copy(task)
    out.train, out.eval = [], dev
    return out


# -- the search ------------------------------------------------------------------------------------------------------
def calibrated(path: str | os.PathLike, delta: Delta, base: str | nn.Module | None, data: Any, grid: Grid,
               options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The compressed artifact (description, tensors) at the grid point chosen on the dev split of ``data``, its
    description recording the search under ``compression.calibration``."""
    from deltatune.core.tuned import load

    model = _base_model(path, delta.record, base)
    dev, dev_record = dev_split(data, _tokenizer(delta.record, base, model), model, grid.dev_size)
    metric = "accuracy" if data.task == "classification" else "loss"
    src = source_of(path, delta, model, options["lowrank"])
    tuned = load(model, path)  # the reference: the source as `dt.load` attaches it
    try:
        reference = dev.evaluate(tuned, grid.batch_size)
    finally:
        tuned.detach()
    kept = {(sc, d): keep(src.pieces, d, sc) for sc in grid.scopes for d in grid.densities}
    points = _search(src, dev, kept, grid, options, metric, reference[metric])
    index, rule = choose(points, reference[metric], metric, grid.tolerance, grid.min_ratio)
    chosen = points[index]
    record = {
        "data": dataclasses.asdict(data), "dev": dev_record, "metric": metric,
        "reference": {"stored_bytes": src.original, "score": reference[metric], "metrics": reference},
        "tolerance": grid.tolerance, "tolerance_unit": "points" if metric == "accuracy" else "percent",
        "min_ratio": grid.min_ratio,
        "grid": {"scopes": list(grid.scopes), "densities": list(grid.densities), "alphas": list(grid.alphas)},
        "points": points, "chosen": {**{k: chosen[k] for k in ("scope", "density", "alpha")}, "rule": rule},
        "warnings": [],
    }
    _warn(record, dev_record, rule)
    final = {**options, "scope": chosen["scope"], "density": chosen["density"], "alpha": chosen["alpha"]}
    meta, tensors = src.compressed(kept[(chosen["scope"], chosen["density"])], final)
    meta["compression"]["calibration"] = record
    return meta, tensors


def _search(src: Source, dev: Any, kept: dict[tuple[str, float], Kept], grid: Grid, options: dict[str, Any],
            metric: str, reference: float) -> list[dict[str, Any]]:
    """Every grid point (scope, then density, then α, in the grid's order) with its size, ratio and dev metrics.
    The points of a (scope, density) that cannot be chosen are skipped, with ``metrics`` None: without a size target,
    those larger than a point already within tolerance; with one (``grid.min_ratio``), those not that many times
    smaller (an error when that leaves none)."""
    encoded = {key: src.compressed(k, {**options, "scope": key[0], "density": key[1], "alpha": grid.alphas[0]})
               for key, k in kept.items()}
    size = {key: meta["sizes"]["stored_bytes"] for key, (meta, _) in encoded.items()}
    ratio = {key: meta["compression"]["ratio"] for key, (meta, _) in encoded.items()}
    if grid.min_ratio is not None and not any(r >= grid.min_ratio for r in ratio.values()):
        raise DeltatuneError(f"no grid point is at least {grid.min_ratio:g}x smaller than the uncompressed delta (the "
                             f"smallest is {max(ratio.values()):.1f}x): lower min_ratio (--min-ratio) or add smaller "
                             "densities (--densities)")
    scores: dict[tuple[str, float, float], dict[str, float]] = {}
    smallest_ok: int | None = None
    for key in sorted(kept, key=lambda k: (size[k], k[1], grid.scopes.index(k[0]))):  # the smallest artifacts first
        if grid.min_ratio is not None and ratio[key] < grid.min_ratio:
            continue  # not small enough for the size target
        if grid.min_ratio is None and smallest_ok is not None and size[key] > smallest_ok:
            continue  # larger than a point already within tolerance: it cannot be chosen
        meta, tensors = encoded[key]
        with _attached(src, meta, tensors) as candidate:
            for a in grid.alphas:
                candidate.load_state_dict(_with_alpha(tensors, kept[key], a, options["values"]))
                metrics = scores[(*key, a)] = dev.evaluate(src.model, grid.batch_size)
                if _within(metrics[metric], reference, metric, grid.tolerance):
                    smallest_ok = size[key] if smallest_ok is None else min(smallest_ok, size[key])
    points = []
    for key in kept:
        compression = encoded[key][0]["compression"]
        for a in grid.alphas:
            metrics = scores.get((*key, a))
            points.append({"scope": key[0], "density": key[1], "alpha": a, "stored_bytes": size[key],
                           "ratio": compression["ratio"], "kept": compression["kept"],
                           "score": None if metrics is None else metrics[metric], "metrics": metrics})
    return points


@contextlib.contextmanager
def _attached(src: Source, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Iterator[Delta]:
    """A compressed candidate held in memory, attached to the source's model as ``dt.load`` attaches an artifact
    (its base was checked once, against the source's: not hashed again per candidate); detached afterwards."""
    from deltatune.core import registry

    method = registry.get(meta["method"])
    delta = Delta(method, registry.make_config(method, meta["config"]), tensors=dict(tensors), record=meta)
    delta.build(src.model, shapes=src.shapes, loading=True, load=False)
    attached = []
    try:
        for form in delta.forms.values():
            form.attach()
            attached.append(form)
        delta.load_tensors()
        yield delta
    finally:
        for form in attached:
            form.detach()


def _with_alpha(tensors: dict[str, torch.Tensor], kept: Kept, alpha: float, values: str) -> dict[str, torch.Tensor]:
    """The packed tensors of the same kept entries at another α: only each group's fp32 scale α·σ differs (computed
    as ``Kept.values`` computes it, so the tensors equal a fresh compression at that α bit for bit)."""
    if values == "pruned":
        return tensors
    scales = kept.scales(alpha)
    out = dict(tensors)
    for key in tensors:
        if key.endswith(".scale"):
            out[key] = scales[key.removesuffix(".scale")].reshape(1)
    return out


def _within(score: float, reference: float, metric: str, tolerance: float) -> bool:
    if metric == "accuracy":
        return score >= reference - tolerance / 100 - EPS
    return score <= reference * (1 + tolerance / 100) + EPS


def _better_first(point: dict[str, Any], metric: str) -> tuple[float, ...]:
    """A sort key, best dev score first: accuracy then the lower loss; or the lower loss."""
    metrics = point["metrics"]
    return (-metrics["accuracy"], metrics["loss"]) if metric == "accuracy" else (metrics["loss"],)


def choose(points: list[dict[str, Any]], reference: float, metric: str, tolerance: float,
           min_ratio: float | None = None) -> tuple[int, str]:
    """The index of the chosen point among the evaluated ones, and the rule that chose it: the smallest artifact
    within tolerance of the reference (ties: the better score, then grid order), else the best score. With a size
    target ``min_ratio``: the best score among the points at least that many times smaller (ties: the smaller
    artifact, then grid order)."""
    scored = [i for i, p in enumerate(points) if p["metrics"] is not None]
    if min_ratio is not None:
        small = [i for i in scored if points[i]["ratio"] >= min_ratio]
        best = min(small, key=lambda i: (_better_first(points[i], metric), points[i]["stored_bytes"], i))
        within = _within(points[best]["score"], reference, metric, tolerance)
        return best, f"best score at >= {min_ratio:g}x" + ("" if within else " (not within tolerance)")
    ok = [i for i in scored if _within(points[i]["score"], reference, metric, tolerance)]
    if ok:
        best = min(ok, key=lambda i: (points[i]["stored_bytes"], _better_first(points[i], metric), i))
        return best, "smallest within tolerance"
    best = min(scored, key=lambda i: (_better_first(points[i], metric), points[i]["stored_bytes"], i))
    return best, "best score (none within tolerance)"


def _warn(record: dict[str, Any], dev: dict[str, Any], rule: str) -> None:
    """The calibration's caveats, in the record and as ``CalibrationWarning``s."""
    lines = []
    if dev["seen_in_training"]:
        lines.append("data.max_train is unset, so any training example may have trained the delta: the dev examples "
                     "are drawn from them and may favour the uncompressed delta; pass the run's data section with its "
                     "data.max_train to hold the others out")
    if dev["examples"] < dev["requested"]:
        lines.append(f"the dev split has {dev['examples']} examples, fewer than the {dev['requested']} asked for: "
                     "every training example the run did not use")
    unit = "points" if record["metric"] == "accuracy" else "percent"
    if rule.endswith("(not within tolerance)"):
        lines.append(f"the best grid point at least {record['min_ratio']:g}x smaller is not within "
                     f"{record['tolerance']:g} {unit} of the uncompressed delta's dev {record['metric']}: lower "
                     "--min-ratio, or search more densities / alphas")
    elif rule.startswith("best score (none"):
        lines.append(f"no grid point is within {record['tolerance']:g} {unit} of the uncompressed delta's dev "
                     f"{record['metric']}: chose the best dev score; try larger densities (--densities) or a larger "
                     "--tolerance")
    record["warnings"] = lines
    for line in lines:
        warnings.warn(line, CalibrationWarning, stacklevel=4)


def _tokenizer(meta: dict[str, Any], base: str | nn.Module | None, model: nn.Module) -> Any:
    """The tokenizer of the base: ``base``'s when it is a name, else the artifact's recorded base or the model's."""
    from deltatune.data import models

    name = base if isinstance(base, str) else (meta.get("fingerprint", {}).get("name_or_path")
                                               or getattr(getattr(model, "config", None), "_name_or_path", None))
    if not name:
        raise DeltatuneError("calibration tokenizes its data with the base model's tokenizer, but neither the artifact "
                             "nor the model names one: pass base as a shipped name or a folder with a tokenizer")
    return models.load_tokenizer(str(name))
