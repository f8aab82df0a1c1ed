"""Peak memory and time of one LoRA r8 training step on SmolLM2-135M, batch 4 x 128, over a full-precision and
a quantized base (issue 22's target: nf4 peak <= 0.6x fp32), each base in a fresh process:

    OMP_NUM_THREADS=2 .venv/bin/python scripts/qlora_memory.py [--bases fp32 nf4 int8] [--steps 2]
        [--checkpointing] [--loss chunked|model] [--mmap-threshold BYTES]

Optional (slow on a CPU: a few minutes per base). On a CPU the peak is the process's resident set (VmHWM),
reset after the model is loaded (its tensors copied out of the memory-mapped checkpoint), attached and the
allocator trimmed, so it covers the training steps only; "step" is that peak minus the resident set of a
process that imported the same libraries but loaded no model (what the model, the delta, the activations
and the optimizer state take). On CUDA it is torch's allocator (max_memory_allocated), which sees tensors
only. LoRA r8 alpha 16 on q_proj / v_proj (PEFT's default targets), AdamW, random token ids as inputs and
labels (memory does not depend on their values), fp32 compute on the CPU (the QLoRA paper's bf16 on a GPU). The
loss is deltatune's chunked one (``train.chunked_loss``, the default; ``--loss model``: the model's own, which
builds the whole logits).
``--mmap-threshold 1048576`` runs each base with glibc's ``MALLOC_MMAP_THRESHOLD_`` set: every allocation of 1 MiB
or more is its own mapping, handed back to the system when the tensor is freed, instead of glibc's default (a
threshold that rises to 32 MiB as large blocks are freed, after which they come from a heap that keeps freed memory
resident): see "The allocator's share" in docs/quantization.md.
Each line is one base; the last line gives the ratios.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODEL = "smollm2-135m"
BATCH, LENGTH = 4, 128


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _trim() -> None:
    """Hand freed heap back to the system, so memory freed while loading does not count as resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set (Linux)


def _own_memory(model) -> None:
    """Copy every full-precision tensor of the model out of the safetensors file it was memory-mapped from, so
    that the file's pages (resident once read, shared with the page cache) stop counting: a quantized base
    reads the whole file while it quantizes, and its tied embedding would keep the mapping, and those
    pages, alive."""
    import torch

    from deltatune.core import quantized

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if not quantized.is_quantized_weight(tensor):
                tensor.data = tensor.data.clone()


def measure(base: str, steps: int, checkpointing: bool, loss_kind: str = "chunked") -> dict[str, float | str]:
    """One base in this process: load, attach LoRA r8, ``steps`` training steps; the peak over the steps."""
    import gc

    import bitsandbytes  # noqa: F401  (every base pays for the same imports)
    import torch

    import deltatune as dt
    from deltatune.data import lm_loss

    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    _trim()
    idle = _status("VmRSS")
    quantize = None if base == "fp32" else base
    model = dt.models.load(MODEL, quantize=quantize)
    _own_memory(model)
    gc.collect()
    if checkpointing:  # QLoRA trains with it: activations of one block at a time are kept
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    device = next(p for p in model.parameters() if p.is_floating_point()).device
    tuned = dt.attach(model, "lora", r=8, alpha=16, targets=["q_proj", "v_proj"]).train()
    optimizer = torch.optim.AdamW(tuned.trainable_parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, LENGTH), device=device)
    _trim()
    loaded = _status("VmRSS")
    _reset_peak()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        if loss_kind == "chunked":
            loss = lm_loss.token_nll(tuned, {"input_ids": ids}, ids).nll.sum() / (BATCH * (LENGTH - 1))
        else:
            loss = tuned(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else _status("VmHWM")
    return {"base": base, "peak_bytes": peak, "step_bytes": peak if cuda else peak - idle,
            "loaded_bytes": loaded - idle, "s_per_step": statistics.median(times), "loss": float(loss),
            "memory": "torch allocator (CUDA)" if cuda else "resident set (VmHWM)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bases", nargs="+", default=["fp32", "nf4", "int8"],
                        choices=["fp32", "nf4", "fp4", "int8"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true",
                        help="gradient checkpointing (as QLoRA trains)")
    parser.add_argument("--loss", choices=["chunked", "model"], default="chunked")
    parser.add_argument("--mmap-threshold", type=int, default=None,
                        help="glibc's MALLOC_MMAP_THRESHOLD_ for each base's process (bytes; default: glibc's own)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: measure this base, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.steps, args.checkpointing, args.loss)))
        return
    rows = {}
    for base in args.bases:
        command = [sys.executable, __file__, "--one", base, "--steps", str(args.steps), "--loss", args.loss]
        env = dict(os.environ)
        if args.mmap_threshold is not None:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
        out = subprocess.run(command + (["--checkpointing"] if args.checkpointing else []),
                             capture_output=True, text=True, check=True, env=env).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows[base] = row
        print(f"{base:5s} step memory {row['step_bytes'] / 2**20:8.1f} MiB "
              f"(peak {row['peak_bytes'] / 2**20:.1f} "
              f"MiB, model + delta loaded {row['loaded_bytes'] / 2**20:.1f} MiB, {row['memory']}), "
              f"{row['s_per_step']:.2f} s/step, loss {row['loss']:.3f}", flush=True)
    if "fp32" in rows:
        ref = rows["fp32"]
        print("ratios to fp32: " + ", ".join(
            f"{b} memory {r['step_bytes'] / ref['step_bytes']:.2f}x, "
            f"time {r['s_per_step'] / ref['s_per_step']:.2f}x"
            for b, r in rows.items() if b != "fp32"))


if __name__ == "__main__":
    main()
