"""The report of ``deltatune bench``: the table (each figure with its ratio to PEFT's LoRA), the machine, and
``docs/benchmarks.md`` (rewritten by ``--docs``, keeping the notes below its marker)."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path
from typing import Any

from deltatune.cli.bench_workload import Workload

NOTES_MARKER = "<!-- notes: everything below this line is kept when the bench rewrites this file -->"


def gib(n: int | None) -> str:
    """Bytes as GiB with two decimals."""
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _ratio(r: dict[str, Any], field: str) -> str:
    x = (r.get("ratios") or {}).get(field)
    se = (r.get("ratios_se") or {}).get(field)
    # a ratio that no seed moves (the trainable count, the artifact) needs no spread
    return "" if x is None else f" ({x:.2f}×)" if not se else f" ({x:.2f} ± {se:.2f}×)"


def _se(r: dict[str, Any], field: str, fmt: str, scale: float = 1.0) -> str:
    """The " ± SE" after a figure measured over several seeds; nothing for one seed."""
    se = r.get(f"{field}_se")
    return "" if se is None else f" ± {se / scale:{fmt}}"


def rows(records: list[dict[str, Any]]) -> list[list[str]]:
    """Table cells per record: each figure with its ratio to PEFT's LoRA."""
    out = []
    for r in records:
        if r.get("error"):
            out.append([f"{r['name']}: failed: {str(r['error'])[:80]}", "", "", "", "", "", ""])
            continue
        out.append([
            r["name"],
            f"{r['seconds_per_step']:.3f}{_se(r, 'seconds_per_step', '.3f')}{_ratio(r, 'seconds_per_step')}",
            f"{r['tokens_per_s']:.0f}{_se(r, 'tokens_per_s', '.0f')}{_ratio(r, 'tokens_per_s')}",
            f"{gib(r['peak_memory_bytes'])}{_se(r, 'peak_memory_bytes', '.2f', 2**30)}"
            f"{_ratio(r, 'peak_memory_bytes')}",
            f"{r['trainable']:,}{_ratio(r, 'trainable')}",
            f"{_bytes(r['artifact_bytes'])}{_ratio(r, 'artifact_bytes')}",
            f"{r['eval_loss']:.4f}{_se(r, 'eval_loss', '.4f')}{_ratio(r, 'eval_loss')}",
        ])
    return out


HEADERS = ["run", "s / step", "tokens / s", "peak memory", "trainable", "artifact", "eval loss"]


def table(records: list[dict[str, Any]], title: str = "deltatune bench (ratio to PEFT LoRA)") -> Any:
    """The bench table. A figure is never cut short: a narrow column wraps between a figure and its ratio, and
    each figure column is at least as wide as its longest word, so a number never splits or ends in "…"
    (``print_whole`` keeps a terminal narrower than that from cropping the table)."""
    from rich.table import Table

    cells = rows(records)
    t = Table(title=title)
    for i, h in enumerate(HEADERS):
        if i == 0:
            t.add_column(h, justify="left", overflow="fold")
        else:
            figures = [row[i] for r, row in zip(records, cells, strict=True) if not r.get("error")]
            widest = max(len(word) for text in [*figures, h] for word in text.split())
            t.add_column(h, justify="right", min_width=widest, overflow="fold")
    for row in cells:
        t.add_row(*row)
    return t


def print_whole(console: Any, renderable: Any) -> None:
    """Print a table at least as wide as its narrowest layout: rich crops lines wider than the console, so on a
    narrower terminal the lines are left for the terminal to wrap instead of losing their ends."""
    from rich.console import Console
    from rich.measure import Measurement

    need = Measurement.get(console, console.options.update_width(10_000), renderable).minimum  # unclamped
    if need <= console.width:
        console.print(renderable)
        return
    wide = Console(width=need, file=console.file, force_terminal=console.is_terminal, no_color=console.no_color)
    wide.print(renderable)


def machine(threads: int) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "date": datetime.date.today().isoformat(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def markdown(records: list[dict[str, Any]], w: Workload, command: str, seeds: int = 1) -> str:
    m = machine(w.threads)
    seed = (f"seed {w.seed}" if seeds == 1 else
            f"seeds {w.seed} to {w.seed + seeds - 1} (every run once per seed, seed by seed; each figure the mean "
            "± standard error over the seeds, each ratio to `peft lora` the mean of the per-seed ratios)")
    lines = [
        "# Benchmarks: deltatune vs. Hugging Face PEFT and plain full fine-tuning",
        "",
        "Generated by `deltatune bench` (`deltatune/cli/bench.py`); re-run the command below to refresh the table.",
        "",
        f"Command: `{command}`",
        "",
        f"Workload: `{w.model}`, batch {w.batch_size} × {w.seq_len} tokens (the `tweets` texts packed into "
        f"{w.seq_len}-token blocks, the same tokens in the same order for every run), AdamW lr {w.lr:g} with "
        f"linear decay, gradient clipping at 1.0, {seed}, {w.steps} steps (median over the steps after "
        f"the first {w.warmup}), fp32 on CPU / bf16 autocast on CUDA. Each run is a fresh subprocess.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads"
        + (f", GPU {m['gpu']}" if "gpu" in m else "")
        + f"; torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, Python {m['python']}; "
        f"{m['date']}" + (f"; load average at the end {m['load_average']}" if "load_average" in m else "") + ".",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(HEADERS) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows(records)]
    lines += equal_count_lines(records)
    lines += peft_same_lines(records)
    lines += full_precision_lines(records)
    lines += forward_lines(records)
    lines += [
        "",
        "Ratios in parentheses are to `peft lora` (for s/step and memory lower is better, for tokens/s higher).",
        "",
        "- **s / step**: median wall time of one optimizer step: zero_grad, collate, forward + loss, backward, "
        "`loss.item()`, gradient clipping, AdamW step, LR-scheduler step (the engine also runs its policy hooks "
        "and optimizer bookkeeping, which are part of its step). The final eval is not timed.",
        "- **tokens / s**: real (non-padding) tokens per step / s per step (batch × sequence length for packed text).",
        "- **peak memory**: peak RSS of the run's process (ru_maxrss; on CUDA `torch.cuda.max_memory_allocated`), "
        "including model loading, tokenization, training and the final eval, read before anything is saved "
        "(for deltatune runs: before the engine's end-of-run checkpoint).",
        "- **artifact**: the saved tensor file: deltatune's `delta.safetensors`, PEFT's "
        "`adapter_model.safetensors`, the plain model's `model.safetensors`.",
        "- **peft lora**: `get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=[\"q_proj\", "
        "\"v_proj\"]))`; **plain full**: the transformers model with every parameter trainable; both trained by "
        "a minimal PyTorch loop with the engine's batch order, AdamW, schedule and clipping; their loss is the "
        "transformers model's own (`labels=`), the engine's is its text task's (the same mean next-token "
        "cross-entropy); every run's eval loss comes from the same eval function.",
        "",
    ]
    return "\n".join(lines)


def _ratio_table(records: list[dict[str, Any]], key: str, intro: str,
                 columns: list[tuple[str, Any]]) -> list[str]:
    """A table of the records that carry ratios under ``key``: one row each, ``columns`` as (header, cell of
    (record, its ratios)); the run's name first. Nothing when no record has them."""
    paired = [r for r in records if r.get(key)]
    if not paired:
        return []
    out = ["", intro, "", "| run | " + " | ".join(h for h, _ in columns) + " |",
           "|---|" + "|".join("---" if h == "compared with" else "---:" for h, _ in columns) + "|"]
    out += ["| " + " | ".join([r["name"], *(cell(r, r[key]) for _, cell in columns)]) + " |" for r in paired]
    return out


def _times(field: str) -> Any:
    return lambda r, q: "-" if q.get(field) is None else f"{q[field]:.2f}×"


def _train_peak(r: dict[str, Any], q: dict[str, Any]) -> str:
    """The steps' own peak (the high-water mark reset after loading) and its ratio."""
    if r.get("train_peak_memory_bytes") is None or q.get("train_peak_memory_bytes") is None:
        return "-"
    return f"{gib(r['train_peak_memory_bytes'])} ({q['train_peak_memory_bytes']:.2f}×)"


def _against(name_key: str) -> list[tuple[str, Any]]:
    """The first columns of a comparison table: the run compared with, the trainable count, the step time."""
    return [("compared with", lambda r, q: r[name_key]), ("trainable", lambda r, q: f"{r['trainable']:,}"),
            ("s / step", _times("seconds_per_step"))]


def equal_count_lines(records: list[dict[str, Any]]) -> list[str]:
    """A second table: each method against the deltatune LoRA run with exactly its trainable count."""
    over = lambda r, q: "-" if r.get("amortised_overhead") is None else f"{100 * r['amortised_overhead']:.1f} %"  # noqa: E731
    return _ratio_table(records, "ratios_to_same_count_lora",
                        "At equal trainable parameters (ratio to the deltatune LoRA run with the same count; the "
                        "presets in `deltatune/presets/` with the bench's changes in `deltatune/cli/bench_workload.py`):",
                        [*_against("same_count_lora"), ("peak memory", _times("peak_memory_bytes")),
                         ("eval loss", _times("eval_loss")), ("amortised slow-step overhead", over)])


def peft_same_lines(records: list[dict[str, Any]]) -> list[str]:
    """A table of each deltatune method against PEFT's implementation of the same method, in the same bench."""
    return _ratio_table(records, "ratios_to_peft_same",
                        "Against PEFT's implementation of the same method (`peft-<method>`: the config `deltatune "
                        "export` writes for the preset, so both train the same modules at the same sizes):",
                        [*_against("peft_same"), ("tokens / s", _times("tokens_per_s")),
                         ("peak memory", _times("peak_memory_bytes")), ("eval loss", _times("eval_loss"))])


def full_precision_lines(records: list[dict[str, Any]]) -> list[str]:
    """A table of each run over a quantized base (``lora-nf4``, ``peft-lora-nf4``) against the same framework's run
    of the same method over the full-precision base, in the same bench (QLoRA's saving and its cost)."""
    return _ratio_table(records, "ratios_to_full_precision",
                        "Over a quantized base (bitsandbytes; `docs/quantization.md`), against the same framework's run "
                        "over the full-precision base. Peak memory is the whole process's, loading included (a "
                        "quantized base reads the full-precision weights as it quantizes them); the peak over the "
                        "steps is the high-water mark reset once the model is loaded and the delta attached:",
                        [*_against("full_precision"), ("peak memory", _times("peak_memory_bytes")),
                         ("peak over the steps", _train_peak),
                         ("eval loss", _times("eval_loss"))])


def forward_lines(records: list[dict[str, Any]]) -> list[str]:
    """A third table: each run against a forward-only pass of the same batches (inference's floor)."""
    return _ratio_table(records, "ratios_to_forward",
                        "Against a forward-only pass of the same batches (`plain forward`: the frozen model under "
                        "`torch.no_grad`): s / step as a ratio to one forward pass, peak memory as a ratio to its "
                        "peak:",
                        [("s / step vs forward", _times("seconds_per_step")),
                         ("peak memory vs forward", _times("peak_memory_bytes"))])


def write_markdown(records: list[dict[str, Any]], w: Workload, path: str | os.PathLike, command: str,
                   seeds: int = 1) -> Path:
    path = Path(path)
    notes = ""
    if path.is_file():
        old = path.read_text()
        if NOTES_MARKER in old:
            notes = old.split(NOTES_MARKER, 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(records, w, command, seeds) + "\n" + NOTES_MARKER + (notes or "\n"))
    return path
