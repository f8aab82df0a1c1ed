"""Measure logit fusion (issue 24, docs/fusion.md): a depth-pruned SmolLM2 as the weak model, the full one as the strong.

    .venv/bin/python scripts/fusion_results.py --out fusion-results          # everything (runs are kept and reused)
    .venv/bin/python scripts/fusion_results.py --out fusion-results --only tweets

What it measures, on the demo's protocol (scripts/demo_results.py: 2,000 training tweets, 500 held-out, learning
rate chosen from the preset's x0.5 / 1 / 2 on 500 dev tweets carved from the training split, 3 training seeds):
- the weak model (SmolLM2-135M's first WEAK_LAYERS blocks) zero-shot and with LoRA, one expert per training seed;
- the strong model fused with each weak expert under fixed alpha 0.5 / 1 / 1.5 and dynamic alpha, scored on the same
  held-out tweets: mean +- standard error over the three experts, and the share of the gap closed
  (fused - strong zero-shot) / (strong LoRA - strong zero-shot), strong LoRA being the demo table's LoRA row;
- BBC topics (5 classes, "Article: ...\\nTopic:") the same way, then both experts at once (dynamic alpha) on each task;
- tokens per second of fused greedy generation against the strong model alone, in the same process.
Results go to OUT/fusion.json; the numbers in docs/fusion.md are copied from it.
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

import torch  # noqa: E402

import deltatune as dt  # noqa: E402
from deltatune.cli.demo import DEFAULT_SETUP, TWEETS, Row, demo  # noqa: E402
from deltatune.data import models, tasks  # noqa: E402
from deltatune.errors import run_script  # noqa: E402
from deltatune.ops.fusion import _fixed_alpha  # noqa: E402
from deltatune.train.config import parse_data_section  # noqa: E402

STRONG = "smollm2-135m"
WEAK_LAYERS = "0-9"  # a third of SmolLM2's 30 blocks
WEAK = f"{STRONG}@layers={WEAK_LAYERS}"
HELD_OUT = 500
SEEDS = 3
GRID = [0.5, 1.0, 2.0]
ALPHAS: list[Any] = [0.5, 1.0, 1.5, "dynamic"]
# the demo table's rows on the same split (docs/demo-results.md): the strong model's zero-shot and LoRA accuracy
TASKS: dict[str, dict[str, Any]] = {
    "tweets": {**TWEETS, "max_eval": HELD_OUT},
    "bbc": {"name": "bbc", "task": "classification", "prompt": "Article: {text}\nTopic:", "max_length": 96,
            "eval_fraction": 0.25, "max_train": 1500, "max_eval": HELD_OUT},
}


def setup_for(task: str, model: str) -> dict[str, Any]:
    return {**DEFAULT_SETUP, "model": model, "data": TASKS[task], "methods": {"lora": Row("lora")},
            "title": f"{model} on {task}", "eval_points": 1}


def trained(task: str, model: str, out: Path) -> dict[str, Any]:
    """The demo protocol's LoRA row on ``model`` (kept runs reused)."""
    rows = demo(setup=setup_for(task, model), methods=["lora"], seeds=SEEDS, lr_grid=GRID, out=out / f"{task}-{model}",
                resume=True, show=True, command="scripts/fusion_results.py")
    base = rows[0]
    lora = next(r for r in rows if r["method"] == "lora")
    return {"zero_shot": base.get("accuracy"), "lora": lora}


def mean_se(values: list[float]) -> tuple[float, float]:
    m = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return m, se


def held_out_task(task: str, tokenizer: Any, model: Any) -> Any:
    cfg = parse_data_section({**TASKS[task], "seed": 0})
    return tasks.build_task(cfg, tokenizer, model)


def fused_accuracies(strong: Any, task_obj: Any, experts: list[list[str]], alphas: list[Any]) -> dict[str, Any]:
    """Accuracy of the strong model fused with each expert set, per alpha (and mean dynamic alpha)."""
    out: dict[str, Any] = {}
    for paths in experts:
        fused = dt.fuse(strong, WEAK, paths, alpha=1.0)
        for alpha in alphas:
            fused.fixed = _fixed_alpha(alpha, len(paths))
            fused.alpha_log = []
            t0 = time.time()
            acc = task_obj.evaluate(fused, 16)["accuracy"]
            alpha_mean = [float(torch.cat([a.reshape(-1, len(paths)) for a in fused.alpha_log])[:, i].mean())
                          for i in range(len(paths))]
            key = str(alpha)
            out.setdefault(key, {"accuracy": [], "alpha_mean": [], "seconds": []})
            out[key]["accuracy"].append(acc)
            out[key]["alpha_mean"].append(alpha_mean)
            out[key]["seconds"].append(time.time() - t0)
            print(f"    {[Path(p).name for p in paths]} alpha {alpha}: {acc:.1%} (mean alpha {alpha_mean})", flush=True)
        del fused
    return out


def throughput(strong: Any, expert: str, tokenizer: Any, new_tokens: int = 32) -> dict[str, Any]:
    """Greedy tokens per second: the strong model alone (transformers' generate) and fused (fixed and dynamic)."""
    prompts = ["The weather today is", "My favourite thing about the city is", "Tweet: I love this phone\nSentiment:"]
    result: dict[str, Any] = {}

    def timed(run: Any) -> float:
        run(prompts[0])  # warm-up
        t0 = time.perf_counter()
        n = sum(run(p) for p in prompts)
        return n / (time.perf_counter() - t0)

    def alone(p: str) -> int:
        ids = tokenizer(p, return_tensors="pt")
        with torch.no_grad():
            out = strong.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
        return out.shape[1] - ids["input_ids"].shape[1]

    result["strong_alone"] = timed(alone)
    for alpha in (1.0, "dynamic"):
        fused = dt.fuse(strong, WEAK, [expert], alpha=alpha)

        def run(p: str, fused: Any = fused) -> int:
            ids = tokenizer(p, return_tensors="pt")
            out = fused.generate(ids["input_ids"], ids["attention_mask"], max_new_tokens=new_tokens,
                                 eos_token_id=None)
            return out.shape[1] - ids["input_ids"].shape[1]

        result[f"fused_{alpha}"] = timed(run)
    result["ratios"] = {k: v / result["strong_alone"] for k, v in result.items() if k != "strong_alone"}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", choices=["tweets", "bbc", "multi", "speed", "strong-bbc"], action="append")
    ap.add_argument("--experts", type=int, default=SEEDS, help="fuse with the first N experts of a task (one per "
                    "training seed; fewer to save time: each fused pass over 500 held-out texts takes minutes)")
    ap.add_argument("--alphas", default=",".join(map(str, ALPHAS)), help="the alphas, e.g. 1.5,dynamic")
    args = ap.parse_args()
    alphas = [a if a == "dynamic" else float(a) for a in args.alphas.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / "fusion.json"
    record: dict[str, Any] = json.loads(record_path.read_text()) if record_path.is_file() else {}
    parts = args.only or ["tweets", "bbc", "multi", "speed"]
    strong = models.load(STRONG)
    tokenizer = models.load_tokenizer(STRONG)

    def save() -> None:
        record_path.write_text(json.dumps(record, indent=1) + "\n")

    for task in ("tweets", "bbc"):
        if task not in parts and not ("multi" in parts and task not in record):
            continue
        weak = trained(task, WEAK, out)
        lora = weak["lora"]
        experts = [s["artifact"] for s in lora.get("seeds", [lora])]
        task_obj = held_out_task(task, tokenizer, strong)
        strong_zero = task_obj.evaluate(strong, 16)["accuracy"]
        print(f"[{task}] strong zero-shot {strong_zero:.1%}; weak zero-shot {weak['zero_shot']}", flush=True)
        kept = {k: lora.get(k) for k in ("accuracy", "accuracy_se", "lr", "lr_search", "seeds", "trainable")}
        record[task] = {"weak_zero_shot": weak["zero_shot"], "weak_lora": kept, "experts": experts,
                        "strong_zero_shot": strong_zero,
                        "fused": fused_accuracies(strong, task_obj, [[e] for e in experts[:args.experts]], alphas)}
        save()
    if "multi" in parts:
        both = [[t, b] for t, b in zip(record["tweets"]["experts"], record["bbc"]["experts"], strict=True)]
        both = both[:args.experts]
        record["multi"] = {}
        for task in ("tweets", "bbc"):
            task_obj = held_out_task(task, tokenizer, strong)
            record["multi"][task] = fused_accuracies(strong, task_obj, both, ["dynamic", 1.0])
            save()
    if "strong-bbc" in parts:
        # the upper bound for BBC's gap closed: the strong model with LoRA on the same protocol (6 runs of the full
        # model, so opt-in; tweets takes its upper bound from the demo table's LoRA row)
        strong_lora = trained("bbc", STRONG, out)["lora"]
        record["bbc"]["strong_lora"] = {k: strong_lora.get(k) for k in ("accuracy", "accuracy_se", "lr", "seeds")}
        save()
    if "speed" in parts:
        record["speed"] = throughput(strong, record["tweets"]["experts"][0], tokenizer)
        save()
    print(json.dumps({k: v for k, v in record.items() if k == "speed"}, indent=1))


if __name__ == "__main__":
    run_script(main)
