"""The baseline every selection is measured against: a seeded random subset of the pool at the same budget.

``deltatune data select --method random`` and ``prune --method random`` (GOT-D's and DEALRec's papers both compare
with it). ``stratify`` keeps each label's share of the pool (largest remainders; ties to the earlier label) on a
labelled pool; the chosen rows keep pool order. Scores are None: nothing ranks them.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from deltatune.data.steps._base import Outcome, Pool, Progress, budget_count, no_progress, per_label_counts

WHERE = "random"


@dataclass
class Options:
    budget: float | int = 0.1  # rows kept: a share of the pool (0 < b < 1) or a count
    stratify: bool = True  # a labelled pool: keep each label's share (False, or no labels: a plain uniform sample)


def run(pool: Pool, options: Options, *, seed: int, progress: Progress = no_progress, **context: Any) -> Outcome:
    k = budget_count(options.budget, len(pool.rows), WHERE)
    rng = random.Random(seed)
    labels = pool.labels()
    if options.stratify and labels is not None:
        by_label: dict[Any, list[int]] = defaultdict(list)
        for i, y in enumerate(labels):
            by_label[y].append(i)
        chosen = [i for y, n in per_label_counts(labels, k).items() for i in rng.sample(by_label[y], n)]
    else:
        chosen = rng.sample(range(len(pool.rows)), k)
    chosen.sort()
    progress("sample", k, k)
    return Outcome([pool.rows[i] for i in chosen], indices=chosen, scores=None,
                   info={"stratified": bool(options.stratify and labels is not None)})
