"""DPO over LoRA: deltatune against TRL's DPOTrainer with a PEFT LoRA, peak memory and s/step in one run (issue 21).

    .venv/bin/python scripts/dpo_bench.py --steps 10                 # a few minutes on 2 CPU cores
    .venv/bin/python scripts/dpo_bench.py --steps 2 --pairs 4        # a smoke test

The workload is `examples/dpo.yaml`'s: SmolLM2-135M, preference pairs built from the shipped tweets (the prompt is
the demo's label-word prompt, the chosen completion the right label word + EOS, the rejected one the wrong word +
EOS), LoRA r 8, α 16 on q, v, DPO β 0.1, AdamW at lr 5e-4, ``--pairs`` pairs per step, no warm-up, linear decay.

- ``deltatune``: ``dt.train`` of that config: the reference log-probs come from the same model with the delta taken
  off for one no-gradient forward, and the log-probs from the chunked loss (``train.chunked_loss``, the default);
- ``trl``: ``trl.DPOTrainer`` with ``peft_config`` = the same LoRA (its reference: the PEFT model with the adapter
  disabled, TRL's way without a ``ref_model``), on the same pairs as text (prompt and completions decoded from
  deltatune's pairs, the EOS left for TRL to add), the same batch size, optimizer, learning rate and schedule,
  fp32 on CPU, no evaluation and no checkpoint.

Each runs in a fresh process (its peak RSS its own), ``--steps`` steps; the step time is the median after the first.
Prints one JSON line per run and the ratios deltatune / TRL.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deltatune.core.artifact import report_folder  # noqa: E402
from deltatune.errors import run_script  # noqa: E402

MODEL = "smollm2-135m"
DATA = {"name": "tweets", "task": "preference", "labels": ["negative", "positive"], "max_length": 64,
        "eval_fraction": 0.1, "max_eval": 16, "max_train": 400}
LORA = {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}
BETA, LR = 0.1, 5e-4


def peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_deltatune(a: argparse.Namespace, out: Path) -> dict[str, Any]:
    import deltatune as dt
    from deltatune.train.callbacks import PeakMemory

    cfg = {"model": MODEL, "data": DATA, "method": {"name": "lora", **LORA, "dropout": 0.0},
           "train": {"objective": {"name": "dpo", "beta": BETA}, "steps": a.steps, "batch_size": a.pairs, "lr": LR,
                     "warmup": 0.0, "schedule": "linear", "seed": 0, "eval_every": 0, "save_every": 0,
                     "progress": False, "device": "cpu"},
           "output": str(out / "deltatune")}
    cb = PeakMemory()  # after each step, before the end-of-run checkpoint (TRL's side writes none)
    summary = dt.train(cfg, overwrite=True, callbacks=[cb])
    times = [r["seconds"] for r in summary["history"]]
    return {"run": "deltatune", "times": times, "peak_memory_bytes": cb.peak, "trainable": summary["trainable"],
            "loss": summary["history"][-1]["loss"]}


def run_trl(a: argparse.Namespace, out: Path) -> dict[str, Any]:
    import datasets
    import peft
    import trl
    from transformers import TrainerCallback

    from deltatune.data import models
    from deltatune.data.preference import build_preference
    from deltatune.train.config import parse_data_section

    tokenizer = models.load_tokenizer(MODEL)
    task = build_preference(parse_data_section(dict(DATA)), tokenizer)
    eos = tokenizer.eos_token_id

    def text(ids: list[int]) -> str:
        return tokenizer.decode([i for i in ids if i != eos])

    rows = [{"prompt": text(f["prompt_ids"]), "chosen": text(f["chosen_ids"]), "rejected": text(f["rejected_ids"])}
            for f in task.train]

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.peak = 0

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.times.append(time.perf_counter() - self.t0)
            self.peak = peak()

    args = trl.DPOConfig(output_dir=str(out / "trl"), beta=BETA, max_length=DATA["max_length"],
                         per_device_train_batch_size=a.pairs, learning_rate=LR, lr_scheduler_type="linear",
                         warmup_steps=0, max_steps=a.steps, max_grad_norm=1.0, weight_decay=0.0, report_to=[],
                         use_cpu=True, bf16=False, seed=0, save_strategy="no", eval_strategy="no",
                         logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
    timer = Timer()
    lora = peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules=LORA["targets"],
                           task_type="CAUSAL_LM")
    trainer = trl.DPOTrainer(model=models.load(MODEL), args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tokenizer, peft_config=lora, callbacks=[timer])
    result = trainer.train()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"run": "trl", "times": timer.times, "peak_memory_bytes": timer.peak, "trainable": trainable,
            "loss": result.training_loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--pairs", type=int, default=8, help="preference pairs per step")
    ap.add_argument("--out", default="/tmp/dpo-bench")
    ap.add_argument("--one", choices=["deltatune", "trl"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    out = Path(a.out)
    if a.one:
        import torch

        torch.set_num_threads(2)
        result = (run_deltatune if a.one == "deltatune" else run_trl)(a, out)
        result["median_s_per_step"] = statistics.median(result["times"][1:] or result["times"])
        print("RESULT " + json.dumps(result), flush=True)
        return
    with report_folder(out, "scripts/dpo_bench.py"):  # refuses a folder holding anything else
        results = measure(a, out)
    d, t = results["deltatune"], results["trl"]
    print(json.dumps({"s_per_step_ratio": d["median_s_per_step"] / t["median_s_per_step"],
                      "peak_memory_ratio": d["peak_memory_bytes"] / t["peak_memory_bytes"],
                      "trainable": [d["trainable"], t["trainable"]]}))


def measure(a: argparse.Namespace, out: Path) -> dict[str, dict[str, Any]]:
    """Each side in a process of its own (its peak memory is its own)."""
    results = {}
    for one in ("deltatune", "trl"):
        proc = subprocess.run([sys.executable, __file__, "--one", one, "--steps", str(a.steps), "--pairs", str(a.pairs),
                               "--out", str(out)], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{one} failed:\n{proc.stderr[-3000:]}")
        results[one] = json.loads(line[len("RESULT "):])
        r = results[one]
        print(json.dumps({k: v for k, v in r.items() if k != "times"}), flush=True)
    return results


if __name__ == "__main__":
    run_script(main)
