"""Pareto front and hypervolume of a search's trials, every objective turned into one to minimise.

The hypervolume is optuna's own (``optuna._hypervolume.compute_hypervolume``, exact, any dimension); the front is a
plain O(n²) dominance check, as a search has hundreds of trials at most. ``tests/test_search.py`` checks both
against brute force.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# how far past the worst value seen the default reference point lies, as a share of the objective's spread: a
# trial at the worst value still adds to the hypervolume (with the worst value itself it would add nothing)
MARGIN = 0.1


def minimized(values: Sequence[Sequence[float]], directions: Sequence[str]) -> np.ndarray:
    """Objective values as an (n, d) array where lower is better in every column (maximised ones negated)."""
    points = np.asarray(values, dtype=float).reshape(len(values), len(directions))
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in directions])
    return points * signs


def pareto_mask(points: np.ndarray) -> np.ndarray:
    """Which rows no other row dominates (lower or equal everywhere and lower somewhere); equal rows are all kept."""
    points = np.asarray(points, dtype=float)
    n = len(points)
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        others = np.delete(points, i, axis=0)
        dominated = np.all(others <= points[i], axis=1) & np.any(others < points[i], axis=1)
        mask[i] = not dominated.any()
    return mask


def reference_point(points: np.ndarray, given: Sequence[float | None] | None = None) -> np.ndarray:
    """The hypervolume's reference (minimised values): where ``given`` has a value, that; elsewhere the worst value
    seen, moved out by ``MARGIN`` of the column's spread (by 1 when every value is the same)."""
    points = np.asarray(points, dtype=float)
    worst = points.max(axis=0)
    spread = worst - points.min(axis=0)
    ref = worst + np.where(spread > 0, MARGIN * spread, 1.0)
    for i, value in enumerate(given or []):
        if value is not None:
            ref[i] = value
    return ref


def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """The volume dominated by ``points`` and bounded by ``reference`` (minimised values); points not better than the
    reference in every objective add nothing."""
    from optuna._hypervolume import compute_hypervolume

    points = np.asarray(points, dtype=float).reshape(-1, len(reference))
    inside = points[np.all(points < reference, axis=1)]
    if len(inside) == 0:
        return 0.0
    if inside.shape[1] == 1:  # one objective: the distance from the best value to the reference
        return float(reference[0] - inside.min())
    return float(compute_hypervolume(inside, np.asarray(reference, dtype=float)))


def hypervolume_history(points: np.ndarray, reference: np.ndarray) -> list[float]:
    """The hypervolume of the first k points, for k = 1 .. n (the order of the trials)."""
    points = np.asarray(points, dtype=float)
    return [hypervolume(points[: k + 1], reference) for k in range(len(points))]
