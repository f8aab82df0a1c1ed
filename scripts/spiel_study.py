"""Why SpIEL trails LoRA on the demo's tweet task (issue 18): learning rate and reselection ablations.

Every run trains on the tweets' *training* split and is scored on a dev split carved from it (400 tweets); the
demo's reported held-out split (eval_fraction 0.1, seed 0) is never read. Usage:

    .venv/bin/python scripts/spiel_study.py --out spiel-study --seeds 0,1 --variants lora,spiel-lr1e-3,...
    .venv/bin/python scripts/spiel_study.py --out spiel-study --report   # the table of what is done

Each run's summary lands in OUT/results.jsonl (one line per run, appended as it finishes: a killed study
resumes where it stopped).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import deltatune as dt
from deltatune.core.artifact import report_folder
from deltatune.data import rows
from deltatune.data.config import DataConfig
from deltatune.errors import run_script

LABELS = ["negative", "positive"]
# the demo's recipe (presets/lora.yaml, presets/spiel.yaml): 60 steps of 8 tweets, q and v of SmolLM2-135M
TRAIN = {"steps": 60, "batch_size": 8, "warmup": 0.1, "schedule": "linear", "eval_every": 0, "save_every": 0,
         "progress": False, "device": "cpu"}
SPIEL = {"name": "spiel", "match": "lora:r=8", "targets": ["q_proj", "v_proj"], "regrow": "grad"}
VARIANTS: dict[str, tuple[dict, float]] = {
    "lora": ({"name": "lora", "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}, 2e-3),
    **{f"spiel-lr{lr:g}": (SPIEL, lr) for lr in (3e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2)},
    # no reselection: the random initial support trains for the whole run (γ = 0: the first selection would be
    # at t = S, past the run's end)
    **{f"fixed-random-lr{lr:g}": ({**SPIEL, "reselection_steps": 1000, "selection_accumulation_steps": 0}, lr)
       for lr in (2e-3, 5e-3, 1e-2)},
    # one selection only, from more gradients (20 batches instead of 5), no later swaps
    **{f"one-selection-g20-lr{lr:g}": ({**SPIEL, "reselection_steps": 1000, "selection_accumulation_steps": 20}, lr)
       for lr in (5e-3, 1e-2)},
    # the default's first selection (step 5, from 5 batches) and no later swaps
    **{f"one-selection-g5-lr{lr:g}": ({**SPIEL, "reselection_steps": 1000, "selection_accumulation_steps": 5}, lr)
       for lr in (5e-3,)},
    # SpIEL-MA: growth from SM3's accumulators, no dense gradient
    **{f"sm3-lr{lr:g}": ({**SPIEL, "regrow": "sm3"}, lr) for lr in (5e-3, 1e-2)},
}


def write_splits(out: Path) -> Path:
    """The tweets' training split (the demo's split: eval_fraction 0.1, seed 0) as a jsonl file; the study's dev
    split is carved from it by data.eval_fraction / data.seed below."""
    path = out / "tweets-train.jsonl"
    if path.exists():
        return path
    ds = rows.classification_data(DataConfig(name="tweets", labels=LABELS))
    train, _reported = ds.split(0.1, seed=0)  # the reported split stays unread
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for text, label in zip(train.texts, train.labels, strict=True):
            f.write(json.dumps({"text": text, "label": train.label_names[label]}) + "\n")
    tmp.replace(path)
    return path


def config(variant: str, seed: int, data_path: Path, out: Path) -> dict:
    method, lr = VARIANTS[variant]
    return {
        "model": "smollm2-135m",
        # dev: 400 tweets of the training split (data.seed 1 draws them); training examples come from the rest
        "data": {"path": str(data_path), "task": "classification", "labels": LABELS, "max_length": 64,
                 "eval_fraction": 0.02, "seed": 1, "max_eval": 400, "prompt": "Tweet: {text}\nSentiment:"},
        "method": method,
        "train": {**TRAIN, "lr": lr, "seed": seed},
        "output": str(out / "runs" / f"{variant}-seed{seed}"),
    }


def done(out: Path) -> dict[tuple[str, int], dict]:
    path = out / "results.jsonl"
    if not path.exists():
        return {}
    found = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        found[(r["variant"], r["seed"])] = r
    return found


def run(out: Path, variants: list[str], seeds: list[int]) -> None:
    data_path = write_splits(out)
    finished = done(out)
    for variant in variants:
        for seed in seeds:
            if (variant, seed) in finished:
                continue
            cfg = config(variant, seed, data_path, out)
            start = time.time()
            summary = dt.train(cfg, overwrite=True)
            final = summary["final"]
            record = {"variant": variant, "seed": seed, "lr": cfg["train"]["lr"],
                      "dev": {"accuracy": final["eval_accuracy"], "loss": final["eval_loss"]},
                      "trainable": summary.get("trainable"), "seconds": round(time.time() - start, 1)}
            with (out / "results.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)


def report(out: Path) -> str:
    by_variant: dict[str, list[float]] = {}
    for (variant, _), r in sorted(done(out).items()):
        by_variant.setdefault(variant, []).append(100 * r["dev"]["accuracy"])
    lines = ["| variant | seeds | dev accuracy (mean ± SE) | per seed |", "|---|---:|---:|---|"]
    for variant, accs in by_variant.items():
        mean = f"{statistics.mean(accs):.1f}"
        if len(accs) > 1:  # one seed has no standard error to show
            mean += f" ± {statistics.stdev(accs) / math.sqrt(len(accs)):.1f}"
        lines.append(f"| {variant} | {len(accs)} | {mean} | "
                     f"{', '.join(f'{a:.1f}' for a in accs)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="spiel-study")
    ap.add_argument("--variants", default="lora,spiel-lr0.001,spiel-lr0.005,fixed-random-lr0.005")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.report:
        unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
        # a folder holding anything but this script's earlier output is refused; its earlier runs are reused
        with report_folder(out, "scripts/spiel_study.py", resume=True):
            run(out, args.variants.split(","), [int(s) for s in args.seeds.split(",")])
    print(report(out))


if __name__ == "__main__":
    run_script(main)
