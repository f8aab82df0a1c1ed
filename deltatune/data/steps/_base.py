"""What every data step shares: the pool it reads, the outcome it returns, its options and its progress.

A step module (``gotd.py``, ``dealrec.py``, ``dart.py``, ``eda.py``) holds one algorithm: an ``Options`` dataclass (its
fields commented like the run config's, so ``docs/data.md`` can list them) and ``run(pool, options, *, seed,
progress) -> Outcome``. Reading the source, the manifest, the cache, the atomic write and the CLI are in
``deltatune.data.steps`` (``__init__.py`` and ``_manifest.py``); a step module never writes a file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from deltatune.errors import DeltatuneError

# (what, done, total): a step reports its long loops through this; the caller draws the bar (or nothing)
Progress = Callable[[str, int, int], None]


def no_progress(what: str, done: int, total: int) -> None:
    """A ``Progress`` that shows nothing (tests, library use)."""


@dataclass
class Pool:
    """The rows a step works on: a data source's training part, as plain dicts.

    ``text_field`` names the text of a row (classification and text tasks); ``label_field`` the class
    (classification; None for unlabelled pools); ``task`` the data section's task ("classification", "text",
    "chat", "edit"), so a step can refuse a pool it cannot use."""

    rows: list[dict[str, Any]]
    text_field: str = "text"
    label_field: str | None = "label"
    task: str = "classification"
    source: str = "rows"  # how errors name the pool (a file, "tweets", ...)

    def texts(self) -> list[str]:
        return [str(r[self.text_field]) for r in self.rows]

    def labels(self) -> list[Any] | None:
        if self.label_field is None:
            return None
        return [r.get(self.label_field) for r in self.rows]


@dataclass
class Outcome:
    """What a step made.

    ``rows``: the rows the step writes (the chosen rows in chosen order for select / prune; new rows for curate /
    augment). ``indices``: for select / prune, the chosen rows' indices into ``pool.rows`` (``rows[k] ==
    pool.rows[indices[k]]``); for augment, each written row's parent index; for curate, each written row's query
    index. ``scores``: one per index (select / prune: the score each chosen row was picked by) or None.
    ``info``: anything else worth keeping in the manifest (JSON-able: timings, convergence, unsolved queries, pass
    rates, per-row failures)."""

    rows: list[dict[str, Any]]
    indices: list[int] | None = None
    scores: list[float] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def options_from(cls: type, given: Mapping[str, Any] | None, where: str) -> Any:
    """An ``Options`` dataclass from a mapping; unknown keys are one error naming every known key."""
    given = dict(given or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise DeltatuneError(
            f"{where}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"the options are: {', '.join(sorted(known))}"
        )
    return cls(**given)


def per_label_counts(labels: list[Any], k: int) -> dict[Any, int]:
    """How many of k rows each label gets to keep its share of ``labels``: k split by the shares, the remainders to
    the largest fractions (ties to the label seen first). The baseline's and GOT-D's ``stratify``."""
    groups: dict[Any, int] = {}
    for y in labels:
        groups[y] = groups.get(y, 0) + 1
    exact = {y: k * n / len(labels) for y, n in groups.items()}
    counts = {y: int(v) for y, v in exact.items()}
    order = sorted(groups, key=lambda y: -(exact[y] - counts[y]))  # stable: ties keep first-seen label order
    for y in order[: k - sum(counts.values())]:
        counts[y] += 1
    return counts


def budget_count(budget: float | int, n: int, where: str) -> int:
    """How many rows a budget keeps from a pool of n: a share (0 < b < 1) or a count (an integer ≥ 1, at most n)."""
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise DeltatuneError(f"{where}.budget={budget!r} must be a share in (0, 1) or a whole count of rows")
    if n == 0:
        raise DeltatuneError(f"{where}: the pool is empty; give it a data source with rows")
    if isinstance(budget, float) and 0.0 < budget < 1.0:
        return max(1, int(budget * n + 0.5))
    if float(budget) != int(budget) or budget < 1:
        raise DeltatuneError(f"{where}.budget={budget!r} must be a share in (0, 1) or a whole count of rows")
    if budget > n:
        raise DeltatuneError(
            f"{where}.budget={budget} is larger than the pool ({n} rows); give a count up to {n} or a share"
        )
    return int(budget)
