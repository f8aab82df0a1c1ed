"""Does merging a delta into a quantised base hurt? Held-out accuracy on the demo task (SmolLM2-135M, tweets
negative vs positive, the demo's 200 held-out examples) of a LoRA artifact served six ways:

    .venv/bin/python scripts/quantized_merge.py [ARTIFACT] [--batch-size 32]

ARTIFACT defaults to the first LoRA artifact of a demo run found under runs/, demo-report/ or /work/runs/
(``deltatune demo --methods lora`` writes OUT/artifacts/lora). Rows: the fp32 base; the LoRA unmerged and merged
in fp32; the int8 base alone; merged-then-quantised (``tuned.merge(quantize="int8")``: the quantisation error
lands on W0 + ΔW); int8 base + unmerged fp32 LoRA (``deltatune.ops.quantize.quantize_base``: the error lands on W0
only). Int8 = bitsandbytes' LLM.int8() layers (deltatune/core/quantized.py; a hand-written layer before 2026-12-04).
"""

from __future__ import annotations

import argparse
import copy
import glob
import time
from pathlib import Path

import torch

import deltatune as dt
from deltatune.cli.demo import TWEETS
from deltatune.data import models, tasks
from deltatune.ops.quantize import Int8Linear, quantize_base, quantize_model

MODEL = "smollm2-135m"
SEARCH = ["runs/*/artifacts/lora", "demo-report/artifacts/lora", "/work/runs/*/artifacts/lora",
          "/work/main/demo-report/artifacts/lora"]


def find_artifact() -> Path:
    for pattern in SEARCH:
        for found in sorted(glob.glob(pattern)):
            if (Path(found) / "deltatune.json").is_file():
                return Path(found)
    raise SystemExit("no demo LoRA artifact found: run `deltatune demo --methods lora --out demo-report` or pass one")


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", nargs="?", type=Path)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    path = args.artifact or find_artifact()
    cfg = tasks.DataConfig(**TWEETS)
    base = models.load(MODEL, **tasks.model_request(cfg, MODEL)).eval()
    task = tasks.build_task(cfg, models.load_tokenizer(MODEL), base)

    def fresh() -> torch.nn.Module:
        return copy.deepcopy(base)

    variants = {
        "fp32 base (zero-shot)": lambda: fresh(),
        "fp32 base + LoRA, unmerged": lambda: dt.load(fresh(), path),
        "fp32 merged": lambda: dt.load(fresh(), path).merge(),
        "int8 base alone": lambda: quantize_model(fresh()),
        "merged, then int8 (merge(quantize='int8'))": lambda: dt.load(fresh(), path).merge(quantize="int8"),
        "int8 base + fp32 LoRA unmerged (quantize_base)": lambda: quantize_base(dt.load(fresh(), path)),
    }
    print(f"artifact {path}; {len(task.eval)} held-out examples of {cfg.name}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| serving | held-out accuracy | eval loss | int8 layers | weight bytes | s |\n|---|---:|---:|---:|---:|---:|")
    for name, build in variants.items():
        start = time.perf_counter()
        model = build()
        metrics = task.evaluate(model, args.batch_size)
        int8 = sum(isinstance(m, Int8Linear) for m in model.modules())
        print(f"| {name} | {100 * metrics['accuracy']:.1f}% | {metrics['loss']:.4f} | {int8} | "
              f"{weight_bytes(model) / 2**20:.1f} MiB | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
