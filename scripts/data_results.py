"""Measure the data steps (issue 20) on the demo's task: does a chosen subset, or augmentation, beat a plain baseline?

    .venv/bin/python scripts/data_results.py --out data-results --group select      # GOT-D 10% vs random 10% vs all
    .venv/bin/python scripts/data_results.py --out data-results --group prune       # DEALRec 2% / 10% vs random
    .venv/bin/python scripts/data_results.py --out data-results --group augment     # 100 tweets: none/EDA/mixup/SCL
    .venv/bin/python scripts/data_results.py --out data-results --render            # docs/data-results.md
    .venv/bin/python scripts/data_results.py --effort-stats     # what DEALRec's effort measures on the pool

Every condition is a row of ``deltatune demo`` on its task (SmolLM2-135M scores " negative" / " positive" after the
tweet; 500 held-out tweets, the same for every row), with the data step inline in the row's data section, so the
step runs on the training part only (never on the held-out tweets) and its result is cached. Rows train at equal
steps (the preset's: 60 of 8 for LoRA), 3 training seeds, mean ± standard error. Learning rates are the presets':
LoRA's 2e-3 is also the rate the demo table's dev-split search chose (docs/demo-results.md); P-tuning v2's is not
searched here (said on the page).

- select: the pool is the training part of the tweets (both labels); GOT-D moves it towards a target of 500 tweets
  (labels unused), the task's own distribution, as the paper uses a small sample of the target task. Two targets:
  500 tweets drawn from the training part itself (``OUT/target.jsonl``: inside the pool, so GOT-D can choose the
  target rows themselves), and 500 tweets of the eval split that the held-out evaluation never scores, none of
  them in the pool (``OUT/target-unseen.jsonl``); with the second also GOT-D ``stratify: true`` (each label's
  share of the pool, GOT-D's choice within a label). Random: a stratified random 10%. All: the training part.
  The demo caps training data at 2,000 rows (``data.max_train``, after the step): 60 steps of 8 see 480 of them.
- prune: DEALRec at 2% and 10% against random subsets of the same size; its "all" and "random 10%" rows are the
  select group's runs, not trained again (the random baseline is one rule for both steps: the same seed chooses
  the same rows). Both budgets run three times: with the paper's score (influence + λ·effort, λ 0.3, the effort
  from SmolLM2-135M, the model being tuned), with λ 1.0 (the paper's setting for two of its three data sets) and
  with ``effort: false`` (influence from the surrogate only, the paper's λ = 0 ablation). The effort needs one
  SmolLM2 forward and a short backward per pool row (23 minutes for the pool on two quiet cores); it is cached
  per row, so the other rows reuse it.
- augment: 100 training tweets (a stratified random 100: ``prune: {method: random, budget: 100}``), then none /
  EDA (the paper's code defaults, num_aug 9 per tweet) / mixup (α 0.4) / contrastive (w 0.3, τ 0.1), with LoRA and
  P-tuning v2 (the paper's two PEFT methods); and P-tuning v2 with EDA *and* the contrastive term, the paper's
  remedy for P-tuning on augmented data.

Runs are kept in OUT/<group>/runs/ and reused: a killed measurement continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deltatune.cli.demo import DEFAULT_SETUP, RUNS, Row, demo  # noqa: E402
from deltatune.errors import run_script  # noqa: E402

DOC = ROOT / "docs" / "data-results.md"
SEEDS = 3
HELD_OUT = 500
TARGET_ROWS = 500
TARGETS = ("target.jsonl", "target-unseen.jsonl")  # GOT-D's targets: inside the pool, outside it
LOW_DATA = 100
EDA = {"method": "eda", "num_aug": 9}
MIXUP = {"mixup": 0.4}
CONTRASTIVE = {"contrastive": 0.3, "contrastive_temperature": 0.1}


PRUNE_ORDER = ("all", "random-2", "dealrec-2", "dealrec-2-effort", "dealrec-2-effort-1", "random-10", "dealrec-10",
               "dealrec-10-effort", "dealrec-10-effort-1")
SHARED = ("all", "random-10")  # prune's rows that are select's: the same training rows (random: same seed and rule)
LABELS = {"all": "all (the training part)", "random-10": "random 10%",
          "gotd-10": "GOT-D 10%, target inside the pool", "gotd-10-unseen": "GOT-D 10%, target outside the pool",
          "gotd-10-unseen-stratified": "GOT-D 10%, target outside the pool, stratified by label",
          "random-2": "random 2%", "dealrec-2": "DEALRec 2% (influence only, no effort)",
          "dealrec-10": "DEALRec 10% (influence only, no effort)",
          "dealrec-2-effort": "DEALRec 2% (influence + 0.3 effort)",
          "dealrec-10-effort": "DEALRec 10% (influence + 0.3 effort)",
          "dealrec-2-effort-1": "DEALRec 2% (influence + 1.0 effort)",
          "dealrec-10-effort-1": "DEALRec 10% (influence + 1.0 effort)"}


def label(name: str) -> str:
    if name in LABELS:
        return LABELS[name]
    method, _, rest = name.partition("-100")
    extras = [part for part in rest.split("-") if part]
    return f"{method}, {LOW_DATA} tweets" + "".join(f" + {part}" for part in extras)


def groups(out: Path) -> dict[str, dict[str, Row]]:
    target, unseen = (str((out / name).resolve()) for name in TARGETS)
    few = {"prune": {"method": "random", "budget": LOW_DATA}}
    return {
        "select": {
            "all": Row("lora"),
            "random-10": Row("lora", data={"select": {"method": "random", "budget": 0.1}}),
            "gotd-10": Row("lora", data={"select": {"method": "gotd", "budget": 0.1, "target": target}}),
            "gotd-10-unseen": Row("lora", data={"select": {"method": "gotd", "budget": 0.1, "target": unseen}}),
            "gotd-10-unseen-stratified": Row("lora", data={"select": {"method": "gotd", "budget": 0.1,
                                                                      "target": unseen, "stratify": True}}),
        },
        "prune": {  # its "all" and "random-10" rows are the select group's (the same rows): render shows those runs
            "random-2": Row("lora", data={"prune": {"method": "random", "budget": 0.02}}),
            "dealrec-2": Row("lora", data={"prune": {"method": "dealrec", "budget": 0.02,
                                                                  "effort": False}}),
            "dealrec-10": Row("lora", data={"prune": {"method": "dealrec", "budget": 0.1,
                                                                   "effort": False}}),
            # the paper's score: influence + λ·effort (λ 0.3, the target model SmolLM2-135M itself)
            "dealrec-2-effort": Row("lora", data={"prune": {"method": "dealrec", "budget": 0.02}}),
            "dealrec-10-effort": Row("lora", data={"prune": {"method": "dealrec", "budget": 0.1}}),
            # the paper's other λ (Book, MicroLens): the effort as heavy as the influence
            "dealrec-2-effort-1": Row("lora", data={"prune": {"method": "dealrec", "budget": 0.02, "lam": 1.0}}),
            "dealrec-10-effort-1": Row("lora", data={"prune": {"method": "dealrec", "budget": 0.1, "lam": 1.0}}),
        },
        "augment": {
            "lora-100": Row("lora", data=few),
            "lora-100-eda": Row("lora", data={**few, "augment": EDA}),
            "lora-100-mixup": Row("lora", train=MIXUP, data=few),
            "lora-100-contrastive": Row("lora", train=CONTRASTIVE, data=few),
            "ptuning_v2-100": Row("ptuning_v2", data=few),
            "ptuning_v2-100-eda": Row("ptuning_v2", data={**few, "augment": EDA}),
            "ptuning_v2-100-mixup": Row("ptuning_v2", train=MIXUP, data=few),
            "ptuning_v2-100-contrastive": Row("ptuning_v2", train=CONTRASTIVE, data=few),
            # the paper's remedy for P-tuning on augmented data: the contrastive term with EDA's rows
            "ptuning_v2-100-eda-contrastive": Row("ptuning_v2", train=CONTRASTIVE, data={**few, "augment": EDA}),
        },
    }


def setup_for(group: str, out: Path) -> dict[str, Any]:
    rows = groups(out)[group]
    return {**DEFAULT_SETUP, "title": f"data steps on the demo's task: {group}",
            "data": {**DEFAULT_SETUP["data"], "max_eval": HELD_OUT}, "eval_points": 1, "methods": rows,
            "default": list(rows)}


def write_targets(out: Path) -> None:
    """GOT-D's two targets (labels dropped), 500 tweets each: ``target.jsonl`` from the training part (inside the
    pool), ``target-unseen.jsonl`` from the eval split's rows that the held-out evaluation never scores and whose
    text is in neither the pool nor the scored rows."""
    from deltatune.data import rows
    from deltatune.data.config import DataConfig

    if all((out / name).is_file() for name in TARGETS):
        return  # kept from the first run: the data is not read and split again
    cfg = DataConfig(**{**DEFAULT_SETUP["data"], "seed": 0})
    train, held = rows.classification_data(cfg).split(cfg.eval_fraction, seed=cfg.seed)
    seen = set(train.texts) | set(held.subset(HELD_OUT, seed=cfg.seed).texts)
    spare = sorted({t for t in held.texts if t not in seen})
    picks = dict(zip(TARGETS, (random.Random(0).sample(train.texts, TARGET_ROWS),
                               random.Random(0).sample(spare, TARGET_ROWS)), strict=True))
    out.mkdir(parents=True, exist_ok=True)
    for name, texts in picks.items():
        path = out / name
        if path.is_file():
            continue
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        tmp.replace(path)


def finished(out: Path, group: str) -> list[str]:
    runs = out / group / RUNS
    return [name for name in groups(out)[group]
            if all((runs / f"{name}-seed{k}.json").is_file() for k in range(SEEDS))]


def cell(row: dict[str, Any]) -> str:
    if row.get("accuracy") is None:
        return "-"
    se = row.get("accuracy_se")
    return f"{100 * row['accuracy']:.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")


def render(out: Path) -> str:
    lines = ["# The data steps, measured", "",
             "<!-- Generated by scripts/data_results.py from the runs it keeps. -->", "",
             "SmolLM2-135M on the demo's task (tweet sentiment, label words), 500 held-out tweets, the presets' steps "
             f"and rates, {SEEDS} training seeds: mean ± standard error. The protocol and every choice are in the "
             "docstring of `scripts/data_results.py`.", ""]
    made: dict[str, list[dict[str, Any]]] = {}
    for group in groups(out):
        done = finished(out, group)
        if not done:
            lines += [f"## {group}", "", "Not run yet.", ""]
            continue
        rows = demo(setup=setup_for(group, out), out=out / group, methods=done, seeds=SEEDS, resume=True)
        made[group] = rows
        if group == "prune":  # the select group's "all" and "random-10": the same rows, trained once
            rows = rows[:1] + sorted([r for r in made.get("select", [])[1:] if r["method"] in SHARED] + rows[1:],
                                     key=lambda r: PRUNE_ORDER.index(r["method"]))
        lines += [f"## {group}", "", f"Zero-shot: {cell(rows[0])} %.", "",
                  "| condition | held-out accuracy (%) | per seed | s / step |", "|---|---:|---|---:|"]
        for row in rows[1:]:
            seeds = ", ".join(f"{100 * s['accuracy']:.1f}" for s in row.get("seeds", []))
            step = f"{row['seconds_per_step']:.2f}" if row.get("seconds_per_step") else "-"
            lines.append(f"| {label(row['method'])} | {cell(row)} | {seeds} | {step} |")
        missing = [label(n) for n in groups(out)[group] if n not in done]
        if missing:
            lines += ["", f"Not finished yet: {', '.join(missing)}."]
        lines.append("")
    lines.append("Rebuild: `.venv/bin/python scripts/data_results.py --out data-results --group GROUP` for each group, "
                 "then `--render`. s / step: two or three runs shared the 2 CPU cores, so it says little.")
    return "\n".join(lines) + "\n"


def ranks(values: Any) -> Any:
    """Average ranks (ties share their mean rank), for a Spearman correlation without scipy."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="stable")
    r = np.empty(len(values))
    r[order] = np.arange(len(values), dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=r)
    return sums[inverse] / counts[inverse]


def effort_stats() -> str:
    """What DEALRec's effort term measures on the prune group's pool (the training part of the demo's data, seed 0,
    the step's defaults): its spread, its rank correlation with each row's token count and with the label, and
    the rows at both ends. Reads the effort from the per-row cache (computes it when absent: 23 minutes)."""
    import numpy as np

    from deltatune.data import models
    from deltatune.data.config import DataConfig
    from deltatune.data.steps import dealrec, read_pool

    pool = read_pool(DataConfig(**{**DEFAULT_SETUP["data"], "max_eval": HELD_OUT, "seed": 0}))
    texts = dealrec.effort_texts(pool, pool.texts())
    opts = dealrec.Options(budget=0.02)
    model, tok = models.load(opts.model, task="causal_lm"), models.load_tokenizer(opts.model)
    effort = dealrec.cached_effort_scores(model, tok, texts, r=opts.lora_r, alpha=opts.lora_alpha,
                                          max_length=opts.max_length, batch=opts.effort_batch,
                                          generator=dealrec._generator(0, 2)).numpy()
    tokens = np.array([len(dealrec._tokenize(tok, t, opts.max_length)) for t in texts])
    positive = np.array([r["label"] == "positive" for r in pool.rows], dtype=np.float64)

    def spearman(a: Any, b: Any) -> float:
        return float(np.corrcoef(ranks(a), ranks(b))[0, 1])

    q = np.quantile(effort, [0.01, 0.5, 0.99])
    lines = [f"pool: {len(texts)} rows; effort 1% / 50% / 99% quantiles {q[0]:.3f} / {q[1]:.3f} / {q[2]:.3f}",
             f"Spearman(effort, tokens) = {spearman(effort, tokens):+.2f}; "
             f"Spearman(effort, positive) = {spearman(effort, positive):+.2f}",
             f"mean effort: negative {effort[positive == 0].mean():.4f}, positive {effort[positive == 1].mean():.4f}"]
    for name, idx in (("highest", np.argsort(-effort)[:3]), ("lowest", np.argsort(effort)[:3])):
        lines += [f"{name}: {effort[i]:.3f} ({tokens[i]} tokens) {texts[i][:60]!r}" for i in idx]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data-results")
    ap.add_argument("--group", choices=["select", "prune", "augment"])
    ap.add_argument("--rows", default=None, help="comma-separated conditions of the group (default: all)")
    ap.add_argument("--render", action="store_true", help="run nothing new: write the page from finished rows")
    ap.add_argument("--effort-stats", action="store_true", help="print what DEALRec's effort measures on the pool")
    args = ap.parse_args()
    out = Path(args.out)
    if args.effort_stats:
        print(effort_stats())
        return
    if args.render:
        DOC.write_text(render(out))
        return
    if args.group is None:
        raise SystemExit("give --group select|prune|augment, or --render")
    write_targets(out)
    names = list(groups(out)[args.group]) if args.rows is None else [r.strip() for r in args.rows.split(",")]
    demo(setup=setup_for(args.group, out), out=out / args.group, methods=names, seeds=SEEDS, resume=True)


if __name__ == "__main__":
    run_script(main)
