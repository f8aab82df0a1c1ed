"""The measurement of issue 19: does ``deltatune search`` (TPE) find a better front than random search with the same
number of trials and the same seeds?

    .venv/bin/python scripts/search_vs_random.py examples/search-autopeft.yaml --out search-vs-random/autopeft \\
        --trials 16 --seeds 0,1,2 --set train.steps=20 --set data.max_length=64

For each seed and each sampler (the config's own, and ``random``) it runs one study in OUT/<sampler>-seed<k>/ (a
killed measurement resumes: each study continues where it stopped), then writes OUT/hypervolume.png (the hypervolume
after each trial, mean ± standard error over the seeds, one line per sampler) and OUT/summary.json, and prints a
table. Every study's hypervolume uses one reference point, the same for all of them: per objective the worst value
any study saw, moved out by ``MARGIN`` of the spread (``deltatune.ops.search_pareto``), so the curves compare.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deltatune import api  # noqa: E402
from deltatune.errors import run_script  # noqa: E402
from deltatune.ops import search_pareto as pareto  # noqa: E402
from deltatune.ops.search_refit import mean_se  # noqa: E402


def run_studies(config: str, out: Path, trials: int, seeds: list[int], samplers: list[str],
                overrides: list[str]) -> dict[str, float]:
    """Each (sampler, seed) study, resumed where one exists; the wall seconds of each."""
    seconds = {}
    for seed in seeds:
        for sampler in samplers:
            folder = out / f"{sampler}-seed{seed}"
            start = time.perf_counter()
            api.search(config, folder, resume=folder.exists(), trials=trials,
                       overrides=[*overrides, f"search.sampler={sampler}", f"search.seed={seed}"])
            seconds[folder.name] = time.perf_counter() - start
            print(f"{folder.name}: done in {seconds[folder.name]:.0f} s", flush=True)
    return seconds


def completed(folder: Path, objectives: dict[str, str]) -> tuple[np.ndarray, float]:
    """The completed trials' objective values (trial order, minimised) and the sum of their seconds."""
    with open(folder / "trials.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["state"] == "complete"]
    values = [[float(r[name]) for name in objectives] for r in rows]
    return pareto.minimized(values, list(objectives.values())), sum(float(r["seconds"] or 0) for r in rows)


def curves(out: Path, samplers: list[str], seeds: list[int], objectives: dict[str, str],
           trials: int) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, float]]:
    """Per sampler a (seeds, trials) array of the hypervolume after each trial, under one reference point."""
    points = {(s, k): completed(out / f"{s}-seed{k}", objectives) for s in samplers for k in seeds}
    ref = pareto.reference_point(np.concatenate([p for p, _ in points.values()]))
    hv = {}
    for s in samplers:
        rows = []
        for k in seeds:
            history = pareto.hypervolume_history(points[s, k][0], ref)
            rows.append((history + [history[-1]] * trials)[:trials])  # a failed trial: the volume stays
        hv[s] = np.array(rows)
    trial_seconds = {f"{s}-seed{k}": points[s, k][1] for s in samplers for k in seeds}
    return hv, ref, trial_seconds


def plot(hv: dict[str, np.ndarray], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for sampler, runs in hv.items():
        x = np.arange(1, runs.shape[1] + 1)
        mean = runs.mean(0)
        se = runs.std(0, ddof=1) / np.sqrt(len(runs)) if len(runs) > 1 else np.zeros_like(mean)
        ax.plot(x, mean, label=f"{sampler} ({len(runs)} seeds)")
        ax.fill_between(x, mean - se, mean + se, alpha=0.25)
    ax.set_xlabel("trials")
    ax.set_ylabel("hypervolume (shared reference)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--out", required=True)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="key=value, as search --set")
    parser.add_argument("--report", action="store_true", help="run nothing: the plot and table of what is done")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    raw = api.search_config(args.config, args.overrides)
    samplers = [raw["search"].get("sampler", "tpe"), "random"]
    objectives = raw["search"].get("objectives", {"accuracy": "maximize", "trainable": "minimize"})
    wall = {} if args.report else run_studies(args.config, out, args.trials, seeds, samplers, args.overrides)
    hv, ref, trial_seconds = curves(out, samplers, seeds, objectives, args.trials)
    plot(hv, out / "hypervolume.png", f"{Path(args.config).stem}: {args.trials} trials")
    summary = {"config": args.config, "overrides": args.overrides, "trials": args.trials, "seeds": seeds,
               "reference": ref.tolist(), "wall_seconds": wall, "trial_seconds": trial_seconds,
               "final_hypervolume": {s: hv[s][:, -1].tolist() for s in samplers},
               "hypervolume_at": {s: {str(n): mean_se(list(hv[s][:, n - 1])) for n in (4, 8, args.trials)
                                      if n <= args.trials} for s in samplers}}
    (out / "summary.tmp.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.tmp.json").replace(out / "summary.json")
    for s in samplers:
        cells = ", ".join(f"after {n}: {m:.4g}" + (f" ± {se:.2g}" if se is not None else "")
                          for n, (m, se) in summary["hypervolume_at"][s].items())
        print(f"{s}: hypervolume {cells}")
    print(f"trial seconds (sum over studies): {sum(trial_seconds.values()):.0f}; plot: {out / 'hypervolume.png'}")


if __name__ == "__main__":
    run_script(main)
