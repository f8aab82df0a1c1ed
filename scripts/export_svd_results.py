"""SVD export of a sparse and a dense delta as LoRA on the demo's task: error and held-out accuracy against rank
(issue 22; docs/export.md, "Error against rank, on SmolLM2").

    .venv/bin/python scripts/export_svd_results.py --out runs/export-svd                 # about 20 min on 2 CPU cores
    .venv/bin/python scripts/export_svd_results.py --out /tmp/esvd --methods spiel --ranks 1 --steps 2 --held-out 16

For each method (default ``spiel`` and ``lisa``: the demo's presets and recipe, SmolLM2-135M on tweet sentiment,
60 steps of 8 at the preset's rate, training seed 0), one run is trained (or its artifact reused), scored on the
held-out tweets, then exported at each rank as a PEFT LoRA (``dt.export(..., rank=R)``: a truncated SVD of every
changed matrix, ``export-report.json`` with the pooled relative error ‖ΔW − BA‖_F / ‖ΔW‖_F and the largest), imported
back (``dt.import_``) and scored on the same held-out tweets. One seed and one learning rate, the preset's: this
measures what the export loses from one delta, not a comparison of methods. Writes OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import deltatune as dt  # noqa: E402
from deltatune.cli.demo import DEFAULT_SETUP, run_config  # noqa: E402
from deltatune.core.artifact import report_folder  # noqa: E402
from deltatune.errors import run_script  # noqa: E402


def trained(out: Path, name: str, a: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The demo row's run (its artifact reused when present) and its held-out data section."""
    setup = {**DEFAULT_SETUP, "data": {**DEFAULT_SETUP["data"], "max_eval": a.held_out}}
    cfg = run_config(setup, name, seed=0, output=str(out / "runs" / name), steps=a.steps)
    cfg["train"].update({"eval_every": 0, "save_every": 0, "progress": False})
    folder = Path(cfg["output"])
    if not (folder / "delta.safetensors").is_file():
        dt.train(cfg, overwrite=True)
    return folder, cfg["data"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/export-svd")
    ap.add_argument("--methods", default="spiel,lisa")
    ap.add_argument("--ranks", default="1,4,16,64")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the demo row's)")
    ap.add_argument("--held-out", type=int, default=500)
    a = ap.parse_args()
    out = Path(a.out)
    # a folder holding anything but this script's earlier output is refused; its earlier runs are reused
    with report_folder(out, "scripts/export_svd_results.py", resume=True):
        results = measure(out, a)
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        table(out, results)


def measure(out: Path, a: argparse.Namespace) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    for name in a.methods.split(","):
        folder, data = trained(out, name, a)
        source = dt.eval(str(folder), data, batch_size=32)
        results.append({"method": name, "rank": None, "accuracy": source["accuracy"], "loss": source["loss"]})
        print(json.dumps(results[-1]), flush=True)
        for rank in [int(r) for r in a.ranks.split(",")]:
            adapter, imported = out / f"{name}-r{rank}-peft", out / f"{name}-r{rank}-imported"
            dt.export(str(folder), adapter, rank=rank, overwrite=True)
            report = json.loads((adapter / "export-report.json").read_text())
            dt.import_(adapter, imported, base=DEFAULT_SETUP["model"], overwrite=True)
            scored = dt.eval(str(imported), data, batch_size=32)
            results.append({"method": name, "rank": rank, "relative_error": report["relative_error"],
                            "max_relative_error": report["max_relative_error"],
                            "adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size,
                            "accuracy": scored["accuracy"], "loss": scored["loss"]})
            print(json.dumps(results[-1]), flush=True)
    return results


def table(out: Path, results: list[dict[str, Any]]) -> None:
    lines = ["| method | rank | pooled error | largest | adapter | held-out accuracy | loss |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if r["rank"] is None:
            lines.append(f"| {r['method']} | source delta | | | | {100 * r['accuracy']:.1f} % | {r['loss']:.4f} |")
        else:
            lines.append(f"| {r['method']} | {r['rank']} | {r['relative_error']:.3f} | {r['max_relative_error']:.3f} | "
                         f"{r['adapter_bytes'] / 2**20:.1f} MiB | {100 * r['accuracy']:.1f} % | {r['loss']:.4f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    run_script(main)
