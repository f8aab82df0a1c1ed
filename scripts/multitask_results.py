"""Polyhistor against separate adapters per task: MiniLM-L6 on tweet sentiment and BBC topics at once (issue 25).

    .venv/bin/python scripts/multitask_results.py --out multitask-results            # the full protocol (hours on CPU)
    .venv/bin/python scripts/multitask_results.py --out /tmp/mt --tiny               # a smoke test: minutes

The protocol:
- tasks: the shipped ``tweets`` (negative / neutral / positive) and ``bbc`` (5 topics), each split as a run splits it
  (``eval_fraction`` 0.1, seed 0): the held-out part scores the reported runs (``--held-out`` examples of it), the
  training part gives every run its ``--max-train`` examples;
- rows, each at about the same trainable parameters in the encoder (the heads, one fresh head per task, are the same
  in every row and are left out of the count):
  - ``polyhistor``: one multi-task run (``data.multitask``), one delta generating both tasks' adapters (the preset's
    options: r=8, k=4, e=32, after the FFN);
  - ``polyhistor-lite``: the same with ``lite: true`` (far fewer parameters: reported, not matched);
  - ``separate adapters``: one single-task run per task, each a Pfeiffer adapter (after the FFN) with the bottleneck
    r that makes the two adapters together as large as Polyhistor's delta;
  - ``shared adapter``: one multi-task run of one Pfeiffer adapter of that total size for both tasks (a head each);
- learning rate: each row's base rate times 0.5, 1 and 2, trained once (seed 0) on training examples and scored on a
  dev split carved from the *training* part (``--dev`` examples that the row never trains on; the held-out part is
  never used to choose); the separate adapters choose per task;
- then ``--seeds`` training seeds at the chosen rate, each scored on the held-out examples: mean ± standard error of
  each task's accuracy and of their mean.

Every run's summary is kept in OUT/runs/ and reused, so the protocol can be built over several sittings; the table
goes to OUT/results.md and stdout. Nothing here is run by the tests beyond ``--tiny`` by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import deltatune as dt  # noqa: E402
from deltatune.core.artifact import report_folder  # noqa: E402
from deltatune.data import rows  # noqa: E402
from deltatune.data.config import DataConfig  # noqa: E402
from deltatune.errors import run_script  # noqa: E402
from deltatune.methods.polyhistor import PolyhistorConfig, parameter_count  # noqa: E402

TASKS = ("tweets", "bbc")
GRID = (0.5, 1.0, 2.0)
POLYHISTOR = {"name": "polyhistor", "r": 8, "k": 4, "embedding": 32, "placement": "pfeiffer"}
BASE_LR = {"polyhistor": 2e-3, "polyhistor-lite": 3e-3, "separate": 2e-3, "shared": 2e-3}
WIDTH, BLOCKS = 384, 6  # MiniLM-L6


def adapter_parameters(r: int, d: int = WIDTH, blocks: int = BLOCKS) -> int:
    """A Pfeiffer adapter's trainable parameters: per block W_down, b_down, W_up, b_up."""
    return blocks * (2 * d * r + r + d)


def matched_r(total: int, adapters: int) -> int:
    """The bottleneck r that gives ``adapters`` Pfeiffer adapters together closest to ``total`` parameters."""
    return max(1, round((total / adapters / BLOCKS - WIDTH) / (2 * WIDTH + 1)))


def write_training_part(out: Path, name: str, dev: int) -> tuple[Path, list[str], float]:
    """The training part of shipped set ``name`` as a jsonl (the rows the reported runs may train on), its class
    names, and the eval_fraction that carves ``dev`` of them as the search's dev split."""
    ds = rows.classification_data(DataConfig(name=name))
    train, _ = ds.split(0.1, seed=0)  # as a run with eval_fraction 0.1, seed 0 splits it
    path = out / "data" / f"{name}-train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        path.write_text("".join(json.dumps({"text": t, "label": train.label_names[y]}) + "\n"
                                for t, y in zip(train.texts, train.labels, strict=True)))
    return path, list(train.label_names), min(0.5, dev / len(train))


def data_item(name: str, search: dict[str, Any] | None, a: argparse.Namespace) -> dict[str, Any]:
    """One task's data section: the dev split of the search, or the held-out split of the reported runs."""
    if search is not None:
        return {"path": str(search["path"]), "labels": search["labels"], "eval_fraction": search["fraction"],
                "max_train": a.max_train, "max_eval": a.dev}
    return {"name": name, "eval_fraction": 0.1, "max_train": a.max_train, "max_eval": a.held_out}


def run(out: Path, stem: str, data: dict[str, Any], method: dict[str, Any], lr: float, seed: int,
        a: argparse.Namespace) -> dict[str, Any]:
    """Train once (or read the kept summary): the final eval metrics and the trainable count."""
    kept = out / "runs" / f"{stem}.json"
    if kept.is_file():
        return json.loads(kept.read_text())
    cfg = {"model": a.model, "data": {**data, "max_length": a.max_length, "task": "classification"},
           "method": method, "output": str(out / "artifacts" / stem),
           "train": {"steps": a.steps, "batch_size": a.batch_size, "lr": lr, "warmup": 0.1, "schedule": "linear",
                     "seed": seed, "eval_every": 0, "save_every": 0, "progress": False, "device": a.device}}
    summary = dt.train(cfg, overwrite=True)
    result = {"final": summary["final"], "trainable": summary["trainable"], "lr": lr, "seed": seed}
    kept.parent.mkdir(parents=True, exist_ok=True)
    kept.write_text(json.dumps(result, indent=2) + "\n")
    return result


def accuracy(result: dict[str, Any], task: str | None) -> float:
    final = result["final"]
    return float(final[f"eval_{task}/accuracy"] if task and f"eval_{task}/accuracy" in final else final["eval_accuracy"])


def mean_se(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, float("nan")
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


def rows_of(a: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Each row's method(s), multi-task or per task, with the matched adapter sizes."""
    poly = parameter_count(PolyhistorConfig(**{k: v for k, v in POLYHISTOR.items() if k != "name"}),
                           [WIDTH] * BLOCKS, len(TASKS))
    separate = {"name": "adapter", "placement": "pfeiffer", "r": matched_r(poly, len(TASKS))}
    shared = {"name": "adapter", "placement": "pfeiffer", "r": matched_r(poly, 1)}
    return {
        "polyhistor": {"multitask": True, "method": POLYHISTOR, "encoder": poly},
        "polyhistor-lite": {"multitask": True, "method": {**POLYHISTOR, "lite": True},
                            "encoder": parameter_count(PolyhistorConfig(r=8, k=4, embedding=32, lite=True),
                                                       [WIDTH] * BLOCKS, len(TASKS))},
        "separate": {"multitask": False, "method": separate,
                     "encoder": len(TASKS) * adapter_parameters(separate["r"])},
        "shared": {"multitask": True, "method": shared, "encoder": adapter_parameters(shared["r"])},
    }


def protocol(a: argparse.Namespace) -> list[str]:
    out = Path(a.out)
    search = {}
    for name in TASKS:
        path, labels, fraction = write_training_part(out, name, a.dev)
        search[name] = {"path": path, "labels": labels, "fraction": fraction}
    lines = [f"MiniLM-L6 on {' + '.join(TASKS)}: {a.steps} steps of {a.batch_size}, {a.max_train} training examples "
             f"per task, lr x {list(a.grid)} on a dev split of {a.dev} training examples, {a.seeds} seeds scored on "
             f"{a.held_out} held-out examples per task (mean ± SE)", "",
             f"| row | encoder parameters | lr | {' | '.join(TASKS)} | mean |", "|---|---|---|" + "---|" * (len(TASKS) + 1)]
    for row, spec in rows_of(a).items():
        if a.rows and row not in a.rows:
            continue
        base = BASE_LR[row]
        if spec["multitask"]:  # one run covers every task
            def data(s: dict | None) -> dict[str, Any]:
                return {"multitask": [data_item(n, s[n] if s else None, a) for n in TASKS]}

            dev = {m: run(out, f"search-{row}-x{m:g}", data(search), spec["method"], base * m, 0, a) for m in a.grid}
            best = max(a.grid, key=lambda m: accuracy(dev[m], None))
            seeds = [run(out, f"{row}-seed{k}", data(None), spec["method"], base * best, k, a) for k in range(a.seeds)]
            per_task = {n: [accuracy(r, n) for r in seeds] for n in TASKS}
            rate = f"{base * best:g}"
        else:  # one run per task, each choosing its own rate
            per_task, rates = {}, []
            for n in TASKS:
                dev = {m: run(out, f"search-{row}-{n}-x{m:g}", data_item(n, search[n], a), spec["method"], base * m,
                              0, a) for m in a.grid}
                best = max(a.grid, key=lambda m, dev=dev: accuracy(dev[m], None))
                seeds = [run(out, f"{row}-{n}-seed{k}", data_item(n, None, a), spec["method"], base * best, k, a)
                         for k in range(a.seeds)]
                per_task[n] = [accuracy(r, None) for r in seeds]
                rates.append(f"{n} {base * best:g}")
            rate = ", ".join(rates)
        means = [sum(per_task[n][k] for n in TASKS) / len(TASKS) for k in range(a.seeds)]
        cells = [mean_se(per_task[n]) for n in TASKS] + [mean_se(means)]
        shown = " | ".join(f"{100 * m:.1f} ± {100 * se:.1f}" for m, se in cells)
        options = {k: v for k, v in spec["method"].items() if k not in ("name", "placement")}
        lines.append(f"| {row} ({spec['method']['name']} {options}) | {spec['encoder']:,} | {rate} | {shown} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="multitask-results", help="where the runs, data and the table go")
    ap.add_argument("--model", default="minilm-l6")
    ap.add_argument("--rows", default=None, help="comma-separated rows (default: all)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-train", type=int, default=2000, help="training examples per task")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--dev", type=int, default=300, help="dev examples per task, carved from the training part")
    ap.add_argument("--held-out", type=int, default=500, help="held-out examples per task")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tiny", action="store_true", help="a smoke test: 2 steps, 16 examples, one rate, 2 seeds")
    a = ap.parse_args()
    a.rows = a.rows.split(",") if a.rows else None
    a.grid = GRID
    if a.tiny:
        a.steps, a.batch_size, a.max_train, a.max_length, a.dev, a.held_out, a.seeds = 2, 4, 16, 32, 8, 8, 2
        a.grid = (1.0,)
    # a folder holding anything but this script's earlier output is refused; its earlier runs are reused
    with report_folder(a.out, "scripts/multitask_results.py", resume=True):
        text = "\n".join(protocol(a)) + "\n"
        (Path(a.out) / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    run_script(main)
