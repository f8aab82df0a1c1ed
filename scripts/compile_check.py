"""Does torch.compile speed deltatune's CPU step? (issue 23's optional ``train.compile``)

    .venv/bin/python scripts/compile_check.py eager lora 8
    .venv/bin/python scripts/compile_check.py compile lora 10

The bench's text workload (SmolLM2-135M, batch 4 × 128 packed tweets, the ``lora`` preset, AdamW) in this process;
``compile`` compiles the transformer body in place (``nn.Module.compile()``: parameter names unchanged, so artifacts
and checkpoints are unaffected) and leaves the head and the chunked loss eager, since the loss swaps the head for a
capture on every call. Prints each step's time and loss, then the median after the first three steps (compilation
happens in the first). Measured results and the decision are in docs/benchmarks.md ("torch.compile").
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import deltatune as dt  # noqa: E402
from deltatune.cli.bench_workload import Workload, method_config  # noqa: E402
from deltatune.data.tasks import load_for_task  # noqa: E402
from deltatune.train import loop  # noqa: E402
from deltatune.train.config import load_config  # noqa: E402


def main() -> None:
    mode, method, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(2)
    w = Workload()
    cfg = load_config(w.run_config(method_config(method), "/tmp/compile-check"))
    model, _, task = load_for_task(cfg.data, cfg.model, seed=0)
    options = dict(method_config(method))
    tuned = dt.attach(model, options.pop("name"), **options).train()
    if mode == "compile":
        tuned.model.model.compile()
    opt = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=w.lr)
    batches = loop.Batches(len(task.train), cfg.train.batch_size, cfg.train.seed)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        loss, _ = task.loss(tuned, task.collate([task.train[i] for i in batches.next()]))
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
        print(step, round(times[-1], 3), float(loss.detach()), flush=True)
    print(json.dumps({"mode": mode, "method": method, "first": times[:3],
                      "median_after_3": statistics.median(times[3:])}))


if __name__ == "__main__":
    main()
