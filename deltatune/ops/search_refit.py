"""``--refit K``: the chosen configurations of a search's front trained again at the base config's budget, on its
full training data, with several seeds, and scored on the reported eval split (never the search's dev split).

Which K: the front ordered by the first objective (best first; ties by the last objective, the cost, then by trial
number), its first K. With the default objectives that is the K most accurate configurations of the front, which
the issue's question ("one configuration within 1 point of the best at <= 1/4 of its parameters") compares.

Each refit run is the front configuration's run config (``pareto/<trial>.yaml``'s: the base config on its own data,
not the search's pool) with ``train.seed`` = the base seed + 0, 1, ..., ``search.refit_seeds`` - 1, trained by the
search's runner (``dt.search``: its own process), its output kept in ``OUT/refit/<trial>-seed<s>/run``. A run's
record (``record.json`` beside it) is reused when the search is refit again with the same config, so a killed refit
continues. ``OUT/refit.json`` holds every run and, per configuration, the mean and standard error over its seeds.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from pathlib import Path
from typing import Any

from deltatune.ops.search_data import write_text
from deltatune.ops.search_run import Runner
from deltatune.ops.search_space import Search, trial_config

FILE = "refit.json"


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """The mean and its standard error (sample standard deviation over sqrt(n)); no error for one value. The same
    rule ``deltatune demo`` reports its seeds with (it imports this one)."""
    if len(values) < 2:
        return statistics.fmean(values), None
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def chosen(rows: list[dict[str, Any]], search: Search, k: int) -> list[dict[str, Any]]:
    """The K front rows to refit: best first objective first, then the lowest last objective, then trial number."""
    first, last = list(search.objectives)[0], list(search.objectives)[-1]
    sign = -1.0 if search.objectives[first] == "maximize" else 1.0
    lsign = -1.0 if search.objectives[last] == "maximize" else 1.0
    ordered = sorted(rows, key=lambda r: (sign * r["objectives"][first], lsign * r["objectives"][last], r["trial"]))
    return ordered[:k]


def refit(rows: list[dict[str, Any]], search: Search, config: dict[str, Any], out: Path, runner: Runner, k: int,
          train_overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Refit the K chosen front ``rows`` (``search.front_rows``) with ``search.refit_seeds`` seeds each; writes and
    returns ``OUT/refit.json``'s configurations."""
    out = Path(out)
    results = []
    for row in chosen(rows, search, k):
        run_config = trial_config(config, search.space, row["values"])
        base_seed = int((run_config.get("train") or {}).get("seed", 0) or 0)
        runs = []
        for s in range(search.refit_seeds):
            seed = base_seed + s
            folder = out / "refit" / f"{row['trial']}-seed{seed}"
            one = copy.deepcopy(run_config)
            one["train"] = {**(one.get("train") or {}), **(train_overrides or {}), "seed": seed}
            one["output"] = str((folder / "run").resolve())
            runs.append({"seed": seed, **_run_once(one, folder, runner)})
        results.append({"trial": row["trial"], "values": row["values"], "search": row["objectives"],
                        "config": {k2: v for k2, v in run_config.items() if k2 != "output"}, "runs": runs,
                        "summary": summarize(runs, search)})
    write_text(out / FILE, json.dumps({"rule": "the front's first K by the first objective", "k": k,
                                       "seeds": search.refit_seeds, "configurations": results}, indent=1,
                                      default=str))
    return results


def _run_once(config: dict[str, Any], folder: Path, runner: Runner) -> dict[str, Any]:
    record = folder / "record.json"
    if record.is_file():  # a finished run of the same config: a refit run again continues
        saved = json.loads(record.read_text())
        if saved.get("config") == json.loads(json.dumps(config, default=str)):
            return saved["result"]
    import shutil

    shutil.rmtree(folder, ignore_errors=True)  # a half-written run of a killed refit
    try:
        result = runner(config, folder)
    except Exception as e:  # noqa: BLE001 (a failed refit run is reported with its reason, the others go on)
        result = {"error": f"{type(e).__name__}: {' '.join(str(e).split())}"}
    result = json.loads(json.dumps(result, default=str))
    write_text(record, json.dumps({"config": json.loads(json.dumps(config, default=str)), "result": result}))
    return result


def summarize(runs: list[dict[str, Any]], search: Search) -> dict[str, Any]:
    """Per objective and per metric: mean, standard error and the number of seeds that gave it."""
    good = [r for r in runs if "error" not in r]
    names = list(dict.fromkeys([*search.objectives, *(k for r in good for k in (r.get("metrics") or {}))]))
    out: dict[str, Any] = {"failed": len(runs) - len(good)}
    for name in names:
        values = [v for r in good if isinstance(v := r.get(name, (r.get("metrics") or {}).get(name)), int | float)
                  and not isinstance(v, bool) and math.isfinite(v)]
        if values:
            mean, se = mean_se([float(v) for v in values])
            out[name] = {"mean": mean, "se": se, "n": len(values)}
    return out
