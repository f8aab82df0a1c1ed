"""Rebuild docs/demo-results.md: every registered method on the demo's task, under one protocol (issue 18).

    .venv/bin/python scripts/demo_results.py --out demo-results                    # run what is missing, write the page
    .venv/bin/python scripts/demo_results.py --out demo-results --methods lora,spiel  # some rows (the rest later)
    .venv/bin/python scripts/demo_results.py --out demo-results --render           # the page from the finished rows

The protocol:
- the demo's task: SmolLM2-135M scores the label words " negative" / " positive" after ``Tweet: ...\\nSentiment:``;
  every row trains on the same 2,000 training tweets and is scored on the same 500 held-out tweets (split by
  distinct text, so no held-out tweet is trained on);
- learning rate: each row's preset rate times 0.5, 1 and 2, each trained once (training seed 0) and scored on 500 dev
  tweets carved from the training split (``deltatune demo --lr-grid``); the held-out split is never used to choose;
- then three training seeds (0, 1, 2) at the chosen rate, each scored on the held-out tweets: mean ± standard error.

Every run is kept in OUT/runs/ and reused (``deltatune demo --resume``): the protocol is about 190 runs of 2-6
minutes each on 2 CPU cores, so it is built over several sittings; ``--render`` writes the page from the rows whose
runs are all done. Two sittings may run at once on different ``--methods`` (each one thread: OMP_NUM_THREADS=1).
Everything below the notes marker of the page (what the table says, written by hand) is kept when it is rewritten.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deltatune.cli.demo import DEFAULT_SETUP, MEZO_BUDGET, RUNS, SEARCH, Row, demo, human_bytes  # noqa: E402
from deltatune.errors import run_script  # noqa: E402

DOC = ROOT / "docs" / "demo-results.md"
NOTES_MARKER = "<!-- notes: everything below this line is written by hand and kept when the table is rebuilt -->"
SEEDS = 3
GRID = [0.5, 1.0, 2.0]
HELD_OUT = 500

# SpIEL's two schedule variants of the question (docs/spiel-study.md): no reselection at all (the random
# initial support trains for the whole run), and one selection at step 20 from 20 batches' gradients
SPIEL_FIXED = {"reselection_steps": 1000, "selection_accumulation_steps": 0}
SPIEL_LATE = {"reselection_steps": 1000, "selection_accumulation_steps": 20}
# (both at 5e-3, the rate at which they did best in the study, so that the grid is centred on it)

DPO = {"name": "dpo", "beta": 0.1}

# the rows in the order they are run: the question first, then the methods without a row so far
FIRST = {
    "lora": Row("lora"),
    "spiel": Row("spiel"),
    "spiel-fixed-support": Row("spiel", {"lr": 5e-3}, SPIEL_FIXED),
    "spiel-one-selection": Row("spiel", {"lr": 5e-3}, SPIEL_LATE),
    "full": Row("full"),
    "dsee": Row("dsee"),
    "lt-sft": Row("lt-sft"),
    "lift": Row("lift"),
    "spt": Row("spt"),
    "hft": Row("hft"),
    "id3": Row("id3"),
    "ist": Row("ist"),
    "sparse_mezo": Row("sparse_mezo", MEZO_BUDGET),
    # PEFT's inits of LoRA (issue 27): the lora preset (r 8 on q, v) with another init. EVA calibrates on 64 training
    # tweets' inputs (the data section's training part, which in the search includes the dev tweets: their inputs,
    # never their labels)
    "lora-pissa": Row("lora", method={"init": "pissa_niter_4"}),
    "lora-olora": Row("lora", method={"init": "olora"}),
    "lora-loftq": Row("lora", method={"init": "loftq"}),
    "lora-eva": Row("lora", method={"init": "eva", "eva": {"data": dict(DEFAULT_SETUP["data"]), "samples": 64,
                                                            "batch_size": 16}}),
    # LoRA+ (issue 27): B at 16x A's rate (the paper's and PEFT's ratio); the grid centred on 5e-4 for A, a quarter of
    # LoRA's rate, so that B's (8e-3) is within the 4x of LoRA's that the LoRA+ paper tunes over
    "lora-plus": Row("lora", {"loraplus_ratio": 16, "lr": 5e-4}),
    # over a 4-bit base (issue 22: QLoRA; SpIEL's paper has a quantized variant): the presets unchanged, the model
    # loaded with model: {name, quantize: nf4} (bitsandbytes NF4, double quantization)
    "lora-nf4": Row("lora", model={"quantize": "nf4"}),
    "spiel-nf4": Row("spiel", model={"quantize": "nf4"}),
    # preference tuning (issue 21): DPO with TRL's beta 0.1 on pairs built from the labels (the right label word + EOS
    # chosen, the wrong one rejected; not human preferences), at the preset's budget and on the same grid around its
    # rate, scored by label-word accuracy like every row: the rows lora, spiel and lisa are the same deltas trained
    # on the label words (SFT)
    "dpo-lora": Row("lora", {"objective": DPO}, data={"task": "preference"}),
    "dpo-spiel": Row("spiel", {"objective": DPO}, data={"task": "preference"}),
    "dpo-lisa": Row("lisa", {"objective": DPO}, data={"task": "preference"}),
}
# rows run beside a preset's row, right after it in the table, where the preset's grid did not bracket a best rate.
# MAM at the preset's rate (1e-3, grid 5e-4 to 2e-3) stayed at the majority class at every rate, and its prefix half
# is the part that breaks: prefix tuning's own dev accuracy fell from 83.5 % at 2e-4 to 63.8 % at 4e-4, so MAM again
# on a grid centred on prefix tuning's chosen rate. DSEE and LT-SFT chose the top of their grids with dev accuracy
# still rising (DSEE 79.1 -> 80.1 %, LT-SFT 64.4 -> 79.3 %): again on a grid centred on 4x the preset's rate
BESIDE = {
    "mam": {"mam-prefix-rate": Row("mam", {"lr": 2e-4})},
    "dsee": {"dsee-higher-rate": Row("dsee", {"lr": 4e-3})},
    "lt-sft": {"lt-sft-higher-rate": Row("lt-sft", {"lr": 4e-4})},
    # ID3 chose the bottom of its grid (dev -2.8 points above 5e-4), and its verdict (contradicted) is close enough
    # that the rate could change it
    "id3": {"id3-lower-rate": Row("id3", {"lr": 2.5e-4})},
    # KaSA and IST chose the top of their grids with dev accuracy still rising (KaSA 70.0 -> 74.6 %, IST 80.9 ->
    # 83.3 %), both with a "contradicted" verdict a higher rate could change: again on a grid centred on 2x the top
    "kasa": {"kasa-higher-rate": Row("kasa", {"lr": 8e-3})},
    "ist": {"ist-higher-rate": Row("ist", {"lr": 4e-3})},
    # VQT chose the top of its grid with dev accuracy rising 2.8 points to it (80.7 -> 83.5 %)
    "vqt": {"vqt-higher-rate": Row("vqt", {"lr": 2e-2})},
}
ROWS = {**FIRST, **{k: v for k, v in DEFAULT_SETUP["methods"].items() if k not in FIRST}}
TABLE: dict[str, Any] = {
    **DEFAULT_SETUP,
    "title": "SmolLM2-135M on tweet sentiment (negative vs positive): every method, 3 seeds, lr chosen on a dev split",
    "data": {**DEFAULT_SETUP["data"], "max_eval": HELD_OUT},
    "eval_points": 1,  # one held-out evaluation per run, at the end
    "methods": {k: v for name, row in ROWS.items() for k, v in {name: row, **BESIDE.get(name, {})}.items()},
}
TABLE.pop("default", None)

# methods registered but not in the table, and why
NOT_HERE = {
    "locft": "model editing: it writes prompt → target edits into one block (`deltatune train locft`, scored by "
             "edit success on `presets/edits.jsonl`); a sentiment classifier is not an edit",
    "compeft": "made from a trained artifact, not trained: `deltatune compress --calibrate` on the table's LoRA and "
               "full artifacts (docs/compression.md)",
    "autopeft": "the search space's delta: `deltatune search` with `space: autopeft` (docs/search.md)",
    "polyhistor": "a multi-task method (one delta generating each task's adapters, a head per task); the demo is "
                  "one text task: scripts/multitask_results.py compares it with separate adapters (docs/polyhistor.md)",
    "q_adapter": "a ViT / AST encoder method (query tokens in the image or audio encoder); the demo is text, SmolLM2 "
                 "on tweets: docs/vision-audio.md",
    "bitfit": "it trains the bias terms, and SmolLM2 (a Llama) has none: on the demo's model it has nothing to "
              "train (the demo skips it, saying so); measured on the ViT and AST encoders in docs/vision-audio.md",
}
for _name in NOT_HERE:  # a method with a reason here is not a row of the table
    TABLE["methods"].pop(_name, None)


def finished(out: Path, name: str) -> bool:
    """Whether every run of row ``name`` is kept in OUT/runs/ (its search and its seeds)."""
    runs = out / RUNS
    stems = [f"{SEARCH}-{name}-x{m:g}" for m in GRID] + [f"{name}-seed{k}" for k in range(SEEDS)]
    if not (runs / f"{stems[0]}.json").is_file():
        return False
    first = json.loads((runs / f"{stems[0]}.json").read_text())["result"]
    if "error" in first:  # the method does not apply to the model: the row is its reason
        return all((runs / f"{s}.json").is_file() for s in stems[:len(GRID)])
    return all((runs / f"{s}.json").is_file() for s in stems)


def in_progress(out: Path, names: list[str]) -> list[str]:
    """Table lines for the rows some of whose runs are done: each search rate's dev accuracy and each seed's held-out
    accuracy so far (a row is not reported until all of them are: this only says how far the protocol is)."""
    lines = []
    for name in names:
        runs = {}
        for stem in [f"{SEARCH}-{name}-x{m:g}" for m in GRID] + [f"{name}-seed{k}" for k in range(SEEDS)]:
            path = out / RUNS / f"{stem}.json"
            if path.is_file():
                kept = json.loads(path.read_text())
                runs[stem] = (kept["spec"]["config"]["train"]["lr"],
                              kept["result"].get("summary", {}).get("final", {}).get("eval_accuracy"))
        if not runs:
            continue
        search = ", ".join(f"{lr:g}: {percent(acc)}" for stem, (lr, acc) in runs.items() if stem.startswith(SEARCH))
        seeds = ", ".join(percent(acc) for stem, (_, acc) in runs.items() if not stem.startswith(SEARCH))
        lines.append(f"| {name} | {search or '-'} | {seeds or '-'} |")
    return lines


def family(row: dict[str, Any]) -> str:
    from deltatune.core import registry

    config = row.get("config") or {}
    return registry.get(config["name"]).family if config.get("name") else "-"


def percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def accuracy_cell(row: dict[str, Any]) -> str:
    if row.get("accuracy") is None:
        return "-"
    se = row.get("accuracy_se")
    return percent(row["accuracy"]) + (f" ± {100 * se:.1f}" if se is not None else "")


def search_cell(row: dict[str, Any]) -> str:
    search = row.get("lr_search")
    if not search:
        return "-"
    tried = ", ".join(f"{r['lr']:g}: {percent(r['dev_accuracy'])}" if r["dev_accuracy"] is not None
                      else f"{r['lr']:g}: failed" for r in search["runs"])
    chosen = search.get("chosen_lr")
    return f"{tried} → **{chosen:g}**" if chosen is not None else tried


def trainable_cell(row: dict[str, Any]) -> str:
    return "-" if row.get("trainable") is None else f"{row['trainable']:,}"


def page(rows: list[dict[str, Any]], command: str, partial: list[str] | None = None) -> str:
    base, methods = rows[0], rows[1:]
    lines = [
        "# Every method on the demo's task",
        "",
        "<!-- Generated by scripts/demo_results.py from the runs it keeps; the notes at the end are written by hand. -->",
        "",
        "SmolLM2-135M scores the words \" negative\" / \" positive\" after `Tweet: ...\\nSentiment:`. Every row trains "
        "on the same 2,000 training tweets with batch 8 and its preset's step budget, and is scored on the same "
        f"{HELD_OUT} held-out tweets (the split is by distinct text: no held-out tweet is trained on).",
        "",
        "The protocol, the same for every row:",
        f"- **Learning rate chosen on a dev split.** Each row's preset rate times {', '.join(f'{m:g}' for m in GRID)} "
        f"is trained once (training seed 0) and scored on {HELD_OUT} dev tweets carved from the training split, "
        "never on the held-out tweets; the best dev accuracy chooses (a tie goes to the preset's rate).",
        f"- **{SEEDS} training seeds** at the chosen rate (initialisation, batch order, dropout), each scored on the "
        "held-out tweets: the table shows mean ± standard error over the seeds.",
        f"- With {HELD_OUT} held-out tweets, one run's sampling error is about ±1.8 points near 80 %; it is the same "
        "for every row (one split), so it does not enter differences between rows. A difference is worth reading "
        "when it is larger than about twice the two rows' standard errors combined.",
        "",
        f"Rebuild (runs are kept and reused, so it continues where it stopped): `{command}`",
        "",
        f"The base model before training: **{percent(base['accuracy'])} %** on the held-out tweets.",
        "",
        "| method | family | steps | trainable | lr: dev accuracy (%) → chosen | held-out accuracy (%) | per seed | "
        "artifact |",
        "|---|---|---:|---:|---|---:|---|---:|",
    ]
    for row in methods:
        seeds = ", ".join(percent(s["accuracy"]) for s in row.get("seeds", [])) or "-"
        note = f" ({row['note']})" if row.get("note") else ""
        lines.append(
            f"| {row['method']}{note} | {family(row)} | {row.get('steps') or '-'} | {trainable_cell(row)} | "
            f"{search_cell(row)} | {accuracy_cell(row)} | {seeds} | {human_bytes(row.get('artifact_bytes'))} |")
    done = {row["method"] for row in methods}
    missing = [name for name in TABLE["methods"] if name not in done]
    if missing:
        lines += ["", f"Not run yet under this protocol: {', '.join(missing)}."]
    if partial:
        lines += ["", "Rows under way (the runs done so far; a row enters the table when its search and its "
                  f"{SEEDS} seeds are done):", "", "| row | lr: dev accuracy (%) | held-out accuracy (%) per seed |",
                  "|---|---|---|", *partial]
    lines += ["", "Registered methods that are not rows of this table:"]
    lines += [f"- **{name}**: {why}" for name, why in NOT_HERE.items()]
    return "\n".join(lines) + "\n"


def write_page(rows: list[dict[str, Any]], command: str, path: Path = DOC, partial: list[str] | None = None) -> None:
    notes = "\n"
    if path.is_file() and NOTES_MARKER in path.read_text():
        notes = path.read_text().split(NOTES_MARKER, 1)[1]
    path.write_text(page(rows, command, partial) + "\n" + NOTES_MARKER + notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo-results", help="where the runs, the artifacts and the demo report go")
    ap.add_argument("--methods", default=None, help="comma-separated rows to run (default: all of them)")
    ap.add_argument("--render", action="store_true", help="make no run: the page from the rows already finished")
    ap.add_argument("--device", default="cpu", help="where the runs train (the runs are the same runs on any)")
    ap.add_argument("--docs", default=str(DOC), help="the page to write")
    args = ap.parse_args()
    out = Path(args.out)
    names = list(TABLE["methods"]) if args.methods is None else [m.strip() for m in args.methods.split(",")]
    partial: list[str] = []
    if args.render:
        partial = in_progress(out, [name for name in names if not finished(out, name)])
        names = [name for name in names if finished(out, name)]
        if not names:
            raise SystemExit(f"no row has all its runs in {out / RUNS} yet")
    rows = demo(setup=TABLE, out=out, methods=names, seeds=SEEDS, lr_grid=GRID, resume=True, device=args.device)
    if args.methods is None or args.render:
        write_page(rows, f".venv/bin/python scripts/demo_results.py --out {out}", Path(args.docs), partial)


if __name__ == "__main__":
    run_script(main)
