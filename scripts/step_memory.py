"""Peak RSS of LoRA training steps on SmolLM2-135M with the chunked or the plain causal-LM loss (docs/benchmarks.md).

Run: `.venv/bin/python scripts/step_memory.py chunked` and `... plain` (each in its own process: ru_maxrss is a
process's high-water mark). Prints the peak after loading and after each of three AdamW steps on 4 × 128 tokens.
"""

from __future__ import annotations

import resource
import sys

import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.data import lm_loss, models


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(kind: str) -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = models.load("smollm2-135m")
    print(f"loaded: {peak_gib():.3f} GiB", flush=True)
    tuned = dt.attach(model, "lora", r=8, alpha=16, targets=["q_proj", "v_proj"]).train()
    opt = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (4, 128))
    for step in range(3):
        if kind == "chunked":
            loss = lm_loss.token_nll(tuned, {"input_ids": ids}, ids).nll.sum() / (4 * 127)
        else:
            logits = tuned(input_ids=ids, use_cache=False).logits
            targets = F.pad(ids, (0, 1), value=-100)[:, 1:]
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.reshape(-1), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(f"{kind} step {step}: {peak_gib():.3f} GiB", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "chunked")
