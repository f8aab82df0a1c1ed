"""Measure DART (issue 20, docs/data.md): Uniform vs Prop2Diff vs fixed-count rejection sampling, then a LoRA SFT on each.

    .venv/bin/python scripts/dart_results.py --out dart-results --stage probe     # pass rates of the generator
    .venv/bin/python scripts/dart_results.py --out dart-results --stage all       # curate, train, evaluate, page

The queries are the project's synthetic arithmetic word problems (``deltatune.data.steps.arith``: answers known,
difficulty = the number of operations, 1..3), the generator the shipped SmolLM2-135M-Instruct. Stages, each kept in
OUT and reused when it is there (a killed measurement continues):

- ``probe``: every training query sampled ``--probe-samples`` times at each of the paper's temperature (1.6) and
  ``--temperature`` (fixed-count, no target): the pass rate per difficulty, which says whether the generator can
  feed rejection sampling at all before the long stages run.
- ``curate``: ``dt.data.curate`` on the training queries with ``strategy`` fixed (VRT: ``k`` samples per query,
  every correct one kept), uniform (``k`` correct per query) and prop2diff (``k`` for the hardest), the same trial
  cap for all; per strategy the rows, the samples drawn and the share of queries of each difficulty that got at
  least one row (the paper's point: VRT leaves the hard queries out).
- ``train``: LoRA (the preset, r 8 on q and v) SFT on each curated set, ``--steps`` of 8 at ``--lr``, ``--seeds``
  seeds; equal steps for every set, whatever its size.
- ``eval``: greedy answers to held-out problems (made with another seed, none of them a training query), scored
  by the ``numeric`` verifier, for the base model and each run: accuracy per difficulty and overall.
- ``page``: ``OUT/dart-results.md`` (and ``docs/dart-results.md`` with ``--docs``).

On 2 CPU cores a sample of 256 tokens costs about 5 s, so the whole measurement is a GPU job (``--device cuda``);
``--stage probe`` alone is what this machine measured (docs/data.md).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deltatune.core.artifact import replace_text  # noqa: E402
from deltatune.data.steps import curate, verify  # noqa: E402
from deltatune.data.steps.arith import make_problems  # noqa: E402
from deltatune.data.steps.dart import DEFAULT_PROMPT  # noqa: E402
from deltatune.errors import run_script  # noqa: E402

STRATEGIES = ("fixed", "uniform", "prop2diff")
PAPER_TEMPERATURE = 1.6


def problems(n_train: int, n_test: int, max_steps: int) -> tuple[list[dict], list[dict]]:
    """Training queries (seed 1) and held-out problems (seed 2, none of them a training question)."""
    train = make_problems(n_train, seed=1, max_steps=max_steps)
    seen = {p["question"] for p in train}
    test = [p for p in make_problems(n_test + n_train, seed=2, max_steps=max_steps) if p["question"] not in seen]
    return train, test[:n_test]


def by_difficulty(values: list[float], difficulty: list[int]) -> dict[int, float]:
    out: dict[int, list[float]] = {}
    for v, d in zip(values, difficulty, strict=True):
        out.setdefault(d, []).append(v)
    return {d: sum(v) / len(v) for d, v in sorted(out.items())}


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def probe(a: argparse.Namespace, out: Path, train: list[dict]) -> None:
    for temperature in sorted({PAPER_TEMPERATURE, a.temperature}):
        path = out / f"probe-t{temperature}.json"
        if path.is_file():
            continue
        start = time.perf_counter()
        result = curate(train, method="dart", seed=0, strategy="fixed", k=a.probe_samples, generator=a.generator,
                        temperature=temperature,
                        max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, device=a.device, progress=True)
        info = result.manifest["info"]
        replace_text(path, json.dumps({
            "temperature": temperature, "samples_per_query": a.probe_samples, "max_new_tokens": a.max_new_tokens,
            "seconds": round(time.perf_counter() - start, 1), "pass_rate": info["pass_rate"],
            "difficulty": [p["difficulty"] for p in train], "correct": sum(info["correct"]),
            "samples": sum(info["trials"])}) + "\n")


def curate_all(a: argparse.Namespace, out: Path, train: list[dict]) -> None:
    for strategy in STRATEGIES:
        folder = out / "curate" / strategy
        if (folder / "manifest.json").is_file():
            continue
        curate(train, method="dart", out=folder, seed=0, strategy=strategy, k=a.k, max_trials=a.max_trials,
               probe=a.probe, generator=a.generator, temperature=a.temperature, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size,
               device=a.device, progress=True)


def train_all(a: argparse.Namespace, out: Path) -> None:
    from deltatune.train.loop import train

    for strategy in STRATEGIES:
        data = out / "curate" / strategy / "data.jsonl"
        if not data.is_file() or not data.read_text().strip():
            continue  # not curated yet, or nothing solved: no rows to train on (the page says so)
        for seed in range(a.seeds):
            run = out / "runs" / f"{strategy}-seed{seed}"
            if (run / "deltatune.json").is_file():
                continue
            train({"model": "smollm2-135m", "data": {"path": str(data), "task": "chat", "max_length": 384},
                   "method": {"name": "lora"},
                   "train": {"steps": a.steps, "batch_size": 8, "lr": a.lr, "seed": seed, "device": a.device,
                             "eval_every": 0, "save_every": 0},
                   "output": str(run)}, overwrite=True)


def greedy_accuracy(model: Any, tokenizer: Any, test: list[dict], a: argparse.Namespace) -> list[float]:
    """1.0 / 0.0 per held-out problem: the greedy answer, judged by the numeric verifier."""
    import torch

    from deltatune.data.encode import left_pad, pad_id
    from deltatune.data.steps.dart import encode_prompts

    device = next(model.parameters()).device
    judge = verify.resolve("numeric")
    ids = encode_prompts(tokenizer, [DEFAULT_PROMPT.replace("{question}", p["question"]) for p in test])
    scores = []
    for start in range(0, len(test), a.batch_size):
        batch = left_pad(ids[start:start + a.batch_size], pad_id(tokenizer))
        width = batch["input_ids"].shape[1]
        with torch.no_grad():
            done = model.generate(input_ids=batch["input_ids"].to(device),
                                  attention_mask=batch["attention_mask"].to(device), do_sample=False,
                                  max_new_tokens=a.max_new_tokens, pad_token_id=pad_id(tokenizer))
        for row, seq in enumerate(done[:, width:].tolist()):
            text = tokenizer.decode(seq, skip_special_tokens=True)
            scores.append(1.0 if verify.judge(judge, text, test[start + row]["answer"])[0] else 0.0)
    return scores


def eval_all(a: argparse.Namespace, out: Path, test: list[dict]) -> None:
    from deltatune.core.tuned import load
    from deltatune.data import models

    tokenizer = models.load_tokenizer("smollm2-135m")
    runs = [("base", None)] + [(p.name, p) for p in sorted((out / "runs").glob("*-seed*"))
                               if (p / "deltatune.json").is_file()]
    for name, run in runs:
        path = out / "eval" / f"{name}.json"
        if path.is_file():
            continue
        model = models.load("smollm2-135m", task="causal_lm").eval()
        if a.device != "cpu":
            model = model.to(a.device)
        if run is not None:
            model = load(model, str(run))
        scores = greedy_accuracy(model, tokenizer, test, a)
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_text(path, json.dumps({"scores": scores, "difficulty": [p["difficulty"] for p in test]}) + "\n")


def mean_se(values: list[float]) -> str:
    if not values:
        return "-"
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return f"{100 * statistics.mean(values):.1f}" + (f" ± {100 * se:.1f}" if se is not None else "")


def page(a: argparse.Namespace, out: Path, train: list[dict], test: list[dict]) -> str:
    levels = sorted({p["difficulty"] for p in train})
    lines = ["# DART measured", "", "<!-- Generated by scripts/dart_results.py from the files it keeps. -->", "",
             f"{len(train)} training queries and {len(test)} held-out problems (difficulty = operations, "
             f"{levels[0]}..{levels[-1]}), generator {a.generator}, at most {a.max_new_tokens} new tokens. "
             "The protocol is in the docstring of `scripts/dart_results.py`.", ""]
    probes = [read_json(p) for p in sorted(out.glob("probe-t*.json"))]
    if probes:
        lines += ["## Probe: the generator's pass rate", "",
                  "| temperature | samples | correct | " + " | ".join(f"pass rate, {d} op" for d in levels)
                  + " | seconds |", "|---:|---:|---:|" + "---:|" * len(levels) + "---:|"]
        for p in probes:
            rate = by_difficulty(p["pass_rate"], p["difficulty"])
            lines.append(f"| {p['temperature']} | {p['samples']} | {p['correct']} | "
                         + " | ".join(f"{100 * rate[d]:.1f} %" for d in levels) + f" | {p['seconds']:.0f} |")
        lines.append("")
    curated = {s: read_json(out / "curate" / s / "manifest.json") for s in STRATEGIES}
    if any(curated.values()):
        lines += ["## Curated sets", "",
                  "| strategy | rows | samples drawn | unsolved | " + " | ".join(
                      f"queries with a row, {d} op" for d in levels) + " |", "|---|---:|---:|---:|"
                  + "---:|" * len(levels)]
        for s, m in curated.items():
            if m is None:
                continue
            info = m["info"]
            has = by_difficulty([1.0 if k > 0 else 0.0 for k in info["kept"]], [p["difficulty"] for p in train])
            lines.append(f"| {s} | {info['rows']} | {info['samples_drawn']} | {len(info['unsolved'])} | "
                         + " | ".join(f"{100 * has[d]:.0f} %" for d in levels) + " |")
        lines.append("")
    evals = {p.stem: read_json(p) for p in sorted((out / "eval").glob("*.json"))}
    if evals:
        lines += ["## LoRA SFT on each set: greedy held-out accuracy", "",
                  "| trained on | overall (%) | " + " | ".join(f"{d} op (%)" for d in levels) + " |",
                  "|---|---:|" + "---:|" * len(levels)]
        for name in ("base", *STRATEGIES):
            runs = [e for k, e in evals.items() if k == name or k.startswith(f"{name}-seed")]
            if not runs:
                continue
            overall = [statistics.mean(e["scores"]) for e in runs]
            per = [by_difficulty(e["scores"], e["difficulty"]) for e in runs]
            label = "the base model" if name == "base" else f"{name} ({len(runs)} seeds)"
            lines.append(f"| {label} | {mean_se(overall)} | "
                         + " | ".join(mean_se([r[d] for r in per]) for d in levels) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="dart-results")
    ap.add_argument("--stage", choices=["probe", "curate", "train", "eval", "page", "all"], default="all")
    ap.add_argument("--train-queries", type=int, default=12)
    ap.add_argument("--test-problems", type=int, default=90)
    ap.add_argument("--max-steps", type=int, default=3, help="operations per problem at most (difficulty levels)")
    ap.add_argument("--probe-samples", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.7,
                    help="the curation's temperature (the paper's 1.6 is probed too)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-trials", type=int, default=32)
    ap.add_argument("--probe", type=int, default=8, help="prop2diff's probe samples per query")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--generator", default="smollm2-135m",
                    help="the sampling model: a shipped name or a save_pretrained folder (the SFT always tunes SmolLM2)")
    ap.add_argument("--docs", action="store_true", help="also write docs/dart-results.md")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = problems(a.train_queries, a.test_problems, a.max_steps)
    stages = ["probe", "curate", "train", "eval", "page"] if a.stage == "all" else [a.stage]
    if "probe" in stages:
        probe(a, out, train)
    if "curate" in stages:
        curate_all(a, out, train)
    if "train" in stages:
        train_all(a, out)
    if "eval" in stages:
        eval_all(a, out, test)
    text = page(a, out, train, test)
    replace_text(out / "dart-results.md", text)
    if a.docs:
        replace_text(ROOT / "docs" / "dart-results.md", text)
    print(text)


if __name__ == "__main__":
    run_script(main)
