"""Time per step and memory per process of LoRA on SmolLM2-135M: one process, two DDP processes, two FSDP2 processes
(CPU, gloo; issue 26, docs/distributed.md).

Every run trains the demo's LoRA row on the demo's tweets task (``deltatune/cli/demo.py``: its preset and data, as
``run_config`` builds them) for ``--steps`` steps of ``--batch-size`` examples *per process* (so every process does
the same work in every mode; the 2-process runs see twice the examples per step). Each process records:

- ``seconds_per_step``: the loop's median step time (``summary["seconds_per_step"]``);
- ``peak_rss_training_bytes``: the peak resident memory from the first step to the end (Linux ``VmHWM``, reset by
  writing 5 to ``/proc/self/clear_refs`` when training begins, after the model was loaded and sharded), and
  ``peak_rss_process_bytes`` (``ru_maxrss``: loading included, where every rank still holds the whole model);
- ``parameter_bytes``: the bytes of the model's and the delta's parameters this rank holds (a DTensor shard's local
  part under FSDP2: about half of the one-process figure), and ``delta_parameter_bytes`` of the delta alone.

Writes ``--json`` (every process's record, and a summary per mode) and prints a markdown table with ratios to the
one-process run. ``--tiny`` runs the same on a tiny random Llama and a generated data file (a smoke test: seconds).

    .venv/bin/python scripts/distributed_results.py --json distributed-results.json          # SmolLM2-135M
    .venv/bin/python scripts/distributed_results.py --tiny --steps 3 --json /tmp/tiny.json    # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

MODES = ("one", "ddp", "fsdp")


# -- the worker: one process of one run ------------------------------------------------------------------------------
def _vm_hwm_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := the current RSS
        return True
    except OSError:
        return False


def _local_bytes(params: Any) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for p in params:
        t = p.to_local() if isinstance(p, DTensor) else p
        total += t.numel() * t.element_size()
    return total


def worker(cfg_path: str, record_dir: str) -> None:
    import torch.distributed as dist

    import deltatune as dt
    from deltatune.train import loop
    from deltatune.train.callbacks import Callback

    built: list[Any] = []
    original = loop.build

    def build(cfg: Any) -> Any:  # keep the Run the loop builds (train() returns a summary, not the Tuned)
        run = original(cfg)
        built.append(run)
        return run

    loop.build = build
    marks: dict[str, Any] = {}

    class Peak(Callback):
        def on_begin(self, total_steps: int, start: int) -> None:
            marks["reset"] = _reset_peak_rss()
            tuned = built[0].tuned
            marks["parameter_bytes"] = _local_bytes(tuned.parameters())
            marks["delta_parameter_bytes"] = _local_bytes(tuned.deltas.parameters())

        def on_end(self, summary: Any) -> None:
            marks["peak_rss_training_bytes"] = _vm_hwm_bytes() if marks.get("reset") else None

    summary = dt.train(json.loads(Path(cfg_path).read_text()), callbacks=[Peak()])
    rank = dist.get_rank() if dist.is_initialized() else 0
    record = {"rank": rank, "world": dist.get_world_size() if dist.is_initialized() else 1,
              "fsdp": summary.get("fsdp"), "steps": summary["steps"], "seconds_per_step": summary["seconds_per_step"],
              "peak_rss_process_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              **{k: v for k, v in marks.items() if k != "reset"}}
    Path(record_dir, f"rank{rank}.json").write_text(json.dumps(record))


# -- the driver ------------------------------------------------------------------------------------------------------
def tiny_setup(folder: Path) -> tuple[str, dict[str, Any]]:
    """A tiny random Llama with a word-level tokenizer, saved as a from_pretrained folder, and a generated labelled
    data file: (model, data section)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    good, bad = ["great", "lovely", "happy", "fine"], ["awful", "sad", "bad", "poor"]
    words = ["[PAD]", "[UNK]", "[EOS]", "negative", "positive", "what", "a", "day", *good, *bad,
             *[str(i) for i in range(16)]]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    model_dir = folder / "model"
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                            eos_token="[EOS]").save_pretrained(model_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2,
                                 bos_token_id=2)).save_pretrained(model_dir)
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps({"text": f"what a {w} day {i}", "label": label}) + "\n"
                            for i in range(16) for label, ws in (("positive", good), ("negative", bad)) for w in ws))
    return str(model_dir), {"path": str(data), "task": "classification", "labels": ["negative", "positive"],
                            "max_length": 16, "eval_fraction": 0.25}


def run_config(out: Path, steps: int, batch_size: int, tiny: Path | None) -> dict[str, Any]:
    from deltatune.cli.demo import DEFAULT_SETUP
    from deltatune.cli.demo import run_config as demo_config

    cfg = demo_config(DEFAULT_SETUP, "lora", output=out, steps=steps)
    if tiny is not None:
        cfg["model"], cfg["data"] = tiny_setup(tiny)
    cfg["train"].update(batch_size=batch_size, eval_every=0, save_every=0, progress=False, device="cpu")
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, cfg: dict[str, Any], work: Path, threads: int | None) -> list[dict[str, Any]]:
    """One run in fresh processes; the records of its ranks."""
    nproc = 1 if mode == "one" else 2
    folder = work / mode
    records = folder / "records"
    records.mkdir(parents=True)
    cfg = {**cfg, "output": str(folder / "out"), "train": {**cfg["train"], "fsdp": mode == "fsdp"}}
    (folder / "run.json").write_text(json.dumps(cfg))
    per_process = threads or max(1, (os.cpu_count() or 2) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(per_process), "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": "", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}
    env.pop("DELTATUNE_FSDP", None)  # the run config says which (train.fsdp)
    args = [__file__, "--worker", str(folder / "run.json"), str(records)]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {mode} run failed ({done.returncode}):\n{done.stderr[-6000:]}")
    return [json.loads(p.read_text()) for p in sorted(records.glob("rank*.json"))]


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode: the slowest rank's step time (the step waits for it) and the largest figures of any rank."""
    def most(key: str) -> Any:
        values = [r[key] for r in records if r.get(key) is not None]
        return max(values) if values else None

    return {"processes": len(records), "seconds_per_step": most("seconds_per_step"),
            "peak_rss_training_bytes": most("peak_rss_training_bytes"),
            "peak_rss_process_bytes": most("peak_rss_process_bytes"), "parameter_bytes": most("parameter_bytes"),
            "delta_parameter_bytes": most("delta_parameter_bytes")}


def _mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}×"


def table(summary: dict[str, dict[str, Any]]) -> str:
    base = summary.get("one", {})
    names = {"one": "1 process", "ddp": "2 processes, DDP", "fsdp": "2 processes, FSDP2"}
    rows = ["| run | s / step | ratio | peak RSS / process (training) | ratio | peak RSS / process (with loading) | "
            "parameters / rank | ratio |", "|---|---|---|---|---|---|---|---|"]
    for mode, s in summary.items():
        rows.append(
            f"| {names[mode]} | {s['seconds_per_step']:.3f} | {_ratio(s['seconds_per_step'], base.get('seconds_per_step'))} "
            f"| {_mib(s['peak_rss_training_bytes'])} | "
            f"{_ratio(s['peak_rss_training_bytes'], base.get('peak_rss_training_bytes'))} "
            f"| {_mib(s['peak_rss_process_bytes'])} | {_mib(s['parameter_bytes'])} | "
            f"{_ratio(s['parameter_bytes'], base.get('parameter_bytes'))} |")
    return "\n".join(rows)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4, help="examples per process per step")
    parser.add_argument("--modes", default=",".join(MODES), help="a subset of one,ddp,fsdp")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: the CPU count / processes: each run uses the machine)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama and generated data (smoke test)")
    parser.add_argument("--json", default="distributed-results.json")
    args = parser.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {', '.join(MODES)}")
    with tempfile.TemporaryDirectory(prefix="deltatune-distributed-") as tmp:
        work = Path(tmp)
        cfg = run_config(work / "out", args.steps, args.batch_size, work / "tiny" if args.tiny else None)
        records = {}
        for mode in modes:
            print(f"running {mode} ...", flush=True)
            records[mode] = launch(mode, cfg, work, args.threads)
    summary = {mode: summarise(r) for mode, r in records.items()}
    result = {"model": "tiny" if args.tiny else cfg["model"], "steps": args.steps,
              "batch_size_per_process": args.batch_size, "threads_per_process": args.threads, "summary": summary,
              "records": records}
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(table(summary))
    print(f"\nwritten: {args.json}")


if __name__ == "__main__":
    main()
