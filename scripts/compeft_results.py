"""ComPEFT as a user runs it (issue 18): `deltatune compress --calibrate --min-ratio 10` on the demo table's LoRA and
full fine-tune artifacts, each compressed artifact scored on the held-out tweets that the calibration never reads.

    .venv/bin/python scripts/compeft_results.py --out compeft --scope tensor RUN.yaml ...   # LoRA rows' run configs
    .venv/bin/python scripts/compeft_results.py --out compeft --scope global RUN.yaml ...   # full rows' run configs
    .venv/bin/python scripts/compeft_results.py --out compeft --render                      # the markdown table

Each RUN.yaml is a demo row's run config (``OUT/configs/<row>-seed<k>.yaml`` of scripts/demo_results.py): its
``output`` is the artifact, its ``data`` section the data. The calibration is ``dt.compress(..., calibrate=data)``
with that section (so its dev split is carved from the training part, minus the 2,000 training tweets the run used,
minus duplicates of held-out texts), the grid ``--densities`` × ``--alphas`` at one ``--scope`` (both when not given),
``--dev-size`` dev tweets, and the size target ``--min-ratio`` (the best dev score among the points at least that
many times smaller). Then ``dt.eval`` scores the uncompressed and the compressed artifact on the held-out split
(``data.max_eval`` tweets). One JSON per run config in OUT (reused when present: delete it to measure again); the
compressed artifacts go to OUT/artifacts/<config stem> (an earlier artifact there is replaced, any other folder is
refused, as ``deltatune compress`` does).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deltatune import api  # noqa: E402
from deltatune.cli.demo import human_bytes  # noqa: E402
from deltatune.core import artifact  # noqa: E402
from deltatune.errors import DeltatuneError, run_script  # noqa: E402


def measure(config: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Calibrate, compress and score one artifact; the record is written to OUT/<config stem>.json."""
    cfg = yaml.safe_load(config.read_text())
    source = Path(cfg["output"])
    if not (source / artifact.META_FILE).is_file():
        raise DeltatuneError(f"{config} names the artifact {source}, which does not exist: train it first "
                             f"(deltatune train {config})")
    grid = {"densities": [float(x) for x in args.densities.split(",")],
            "alphas": [float(x) for x in args.alphas.split(",")], "scope": args.scope, "dev_size": args.dev_size,
            "tolerance": args.tolerance, "min_ratio": args.min_ratio, "batch_size": args.batch_size}
    started = time.time()
    compressed = api.compress(source, out / "artifacts" / config.stem, calibrate=cfg["data"], **grid)
    seconds = time.time() - started
    meta = artifact.read_meta(compressed)
    cal = meta["compression"]["calibration"]
    held_out = {"uncompressed": api.eval(source, cfg["data"], batch_size=args.batch_size),
                "compressed": api.eval(compressed, cfg["data"], batch_size=args.batch_size)}
    chosen = next(p for p in cal["points"] if all(p[k] == cal["chosen"][k] for k in ("scope", "density", "alpha")))
    record = {"config": str(config), "artifact": str(source), "method": artifact.read_meta(source)["method"],
              "grid": grid, "calibration_seconds": round(seconds, 1),
              "evaluated_points": sum(p["metrics"] is not None for p in cal["points"]),
              "dev": {"examples": cal["dev"]["examples"], "reference": cal["reference"]["score"],
                      "chosen": chosen["score"]},
              "chosen": cal["chosen"], "ratio": meta["compression"]["ratio"],
              "bytes": {"uncompressed": cal["reference"]["stored_bytes"], "compressed": chosen["stored_bytes"]},
              "held_out": held_out, "warnings": cal["warnings"]}
    artifact.replace_text(out / f"{config.stem}.json", json.dumps(record, indent=1) + "\n")
    return record


def _mean_se(xs: list[float]) -> str:
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return f"{statistics.mean(xs):+.1f} ± {se:.1f}"


def render(out: Path) -> str:
    """The markdown table of every record in OUT: one line per artifact, then each method's mean."""
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    if not records:
        raise DeltatuneError(f"{out} holds no result yet: run the script with run configs first")
    lines = ["| artifact | chosen (scope, density, α) | size | ratio | dev: uncompressed → compressed | held-out: "
             "uncompressed → compressed | held-out change (points) |", "|---|---|---:|---:|---|---|---:|"]
    by_method: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        before, after = (100 * r["held_out"][k]["accuracy"] for k in ("uncompressed", "compressed"))
        c = r["chosen"]
        lines.append(f"| {Path(r['config']).stem} | {c['scope']}, {c['density']:g}, {c['alpha']:g} | "
                     f"{human_bytes(r['bytes']['compressed'])} | {r['ratio']:.1f}× | "
                     f"{100 * r['dev']['reference']:.1f} → {100 * r['dev']['chosen']:.1f} | "
                     f"{before:.1f} → {after:.1f} | {after - before:+.1f} |")
        by_method.setdefault(Path(r["config"]).stem.rsplit("-seed", 1)[0], []).append((after - before, r["ratio"]))
    lines.append("")
    for name, rows in by_method.items():
        changes, ratios = [x for x, _ in rows], [r for _, r in rows]
        lines.append(f"- {name}: held-out change {_mean_se(changes)} points over {len(rows)} seeds (mean ± standard "
                     f"error), {min(ratios):.1f}–{max(ratios):.1f}× smaller")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="*", type=Path, help="demo rows' run configs (their output is the artifact)")
    ap.add_argument("--out", type=Path, required=True, help="where the records and the compressed artifacts go")
    ap.add_argument("--render", action="store_true", help="print the table of the records in OUT")
    ap.add_argument("--scope", choices=["global", "tensor"], default=None, help="fix the scope (default: both)")
    ap.add_argument("--densities", default="0.05,0.1,0.2,0.3")
    ap.add_argument("--alphas", default="0.5,1,2,3,4,5,6,7,8,9,10")
    ap.add_argument("--min-ratio", type=float, default=10.0, help="the size target (default 10, the issue's)")
    ap.add_argument("--tolerance", type=float, default=1.0)
    ap.add_argument("--dev-size", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    if args.render:
        print(render(args.out), end="")
        return 0
    if not args.configs:
        ap.error("give run configs to measure, or --render")
    for config in args.configs:
        if (args.out / f"{config.stem}.json").is_file():
            print(f"{config.stem}: kept from an earlier run", flush=True)
            continue
        r = measure(config, args.out, args)
        print(f"{config.stem}: {r['ratio']:.1f}x, held-out {r['held_out']['uncompressed']['accuracy']:.1%} -> "
              f"{r['held_out']['compressed']['accuracy']:.1%} ({r['calibration_seconds']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    run_script(main)
