"""DPO against SFT on the demo's task (issue 21, docs/preference.md): every seed of each pair of rows scored two ways.

    .venv/bin/python scripts/dpo_results.py --demo demo-results --out dpo-results

``--demo`` is the folder of ``scripts/demo_results.py``, whose rows ``lora`` / ``dpo-lora``, ``spiel`` / ``dpo-spiel``
and ``lisa`` / ``dpo-lisa`` train the same delta on the same tweets at the same budget and learning-rate grid, once on
the label words (SFT: the classification task's loss) and once with DPO (β 0.1) on pairs built from the labels (the
right label word + EOS chosen, the wrong one rejected). For each finished row and each seed's artifact:

- the label-word accuracy on the 500 held-out tweets (the demo's own number, read from its runs);
- DPO's evaluation on the pairs built from the same held-out tweets: the reward margin
  β·[(log π − log π_ref)(chosen) − (log π − log π_ref)(rejected)] and the reward accuracy (the share of pairs whose
  margin is positive), the reference being the base model. The SFT rows' deltas are scored with it too.

Prints a markdown table (mean ± standard error over the seeds) and writes it to OUT/dpo-results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from demo_results import DPO, SEEDS, finished  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.cli.demo import RUNS, mean_se  # noqa: E402
from deltatune.core.artifact import replace_text, report_folder  # noqa: E402
from deltatune.errors import run_script  # noqa: E402

PAIRS = [("lora", "dpo-lora"), ("spiel", "dpo-spiel"), ("lisa", "dpo-lisa")]


def scored(demo: Path, name: str, seed: int) -> dict[str, float]:
    """Seed ``seed`` of row ``name``: its held-out label-word accuracy and its DPO metrics on the held-out pairs."""
    kept = json.loads((demo / RUNS / f"{name}-seed{seed}.json").read_text())
    data = {**kept["spec"]["config"]["data"], "task": "preference"}
    artifact = demo / "artifacts" / f"{name}-seed{seed}"
    metrics = dt.eval(str(artifact), data, batch_size=32, objective=DPO)
    return {"accuracy": kept["result"]["summary"]["final"]["eval_accuracy"],
            "margin": metrics["rewards/margins"], "reward_accuracy": metrics["rewards/accuracies"]}


def cell(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    mean, se = mean_se([v * scale for v in values])
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", default="demo-results", help="the folder of scripts/demo_results.py")
    ap.add_argument("--out", default="dpo-results")
    a = ap.parse_args()
    demo = Path(a.demo)
    rows: list[tuple[str, str, list[dict[str, Any]]]] = []
    for sft, dpo in PAIRS:
        for name, objective in ((sft, "SFT (label words)"), (dpo, "DPO (β 0.1)")):
            if not finished(demo, name):
                print(f"{name}: not finished in {demo / RUNS}, skipped", flush=True)
                continue
            seeds = [scored(demo, name, k) for k in range(SEEDS)]
            print(name, json.dumps(seeds), flush=True)
            rows.append((name, objective, seeds))
    lines = ["| row | objective | held-out accuracy (%) | reward margin | reward accuracy (%) |",
             "|---|---|---:|---:|---:|"]
    for name, objective, seeds in rows:
        lines.append(f"| {name} | {objective} | {cell([s['accuracy'] for s in seeds], 100)} | "
                     f"{cell([s['margin'] for s in seeds], digits=2)} | "
                     f"{cell([s['reward_accuracy'] for s in seeds], 100)} |")
    table = "\n".join(lines) + "\n"
    print(table)
    with report_folder(Path(a.out), "scripts/dpo_results.py") as out:
        replace_text(out / "dpo-results.md", table)


if __name__ == "__main__":
    run_script(main)
