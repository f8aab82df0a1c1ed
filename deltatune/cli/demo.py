"""``deltatune demo``: zero-shot vs LoRA vs full fine-tuning (and more) on one task, with the real engine.

The default run: SmolLM2-135M scores the label words " negative" / " positive" after the prompt
``"Tweet: {text}\\nSentiment:"`` (tweet sentiment restricted to positive vs negative). The zero-shot row is the
base model on the held-out set; every method is then trained with ``dt.train`` (the same engine as
``deltatune train``) and evaluated on the same held-out set. ``quick=True`` does the same with MiniLM and a
fresh classification head on BBC news topics in well under a minute.

Each run (the zero-shot evaluation included) happens in a fresh ``python -m deltatune.cli.demo --worker``
subprocess, so the peak memory reported per method is that process's own RSS high-water mark (model
load, data, training and evaluation), not the demo's accumulated one. A method that cannot apply to the
model (BitFit on Llama: no biases) is skipped with its reason as a note in the table.

Writes ``OUT/report.md`` (the table, the command, the machine), ``OUT/loss.png`` (training loss of every
method), ``OUT/accuracy.png`` (held-out accuracy per row) and the artifacts under ``OUT/artifacts/<method>``.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from deltatune.cli._proc import die_with_parent
from deltatune.errors import DeltatuneError

ZERO_SHOT = "zero-shot"

# The default demo: SmolLM2-135M, tweets positive vs negative, label-word scoring.
TWEETS: dict[str, Any] = {"name": "tweets", "task": "classification", "labels": ["negative", "positive"], "max_length": 64,
                          "eval_fraction": 0.1, "max_train": 2000, "max_eval": 200}
DEFAULT_SETUP: dict[str, Any] = {
    "title": "SmolLM2-135M on tweet sentiment (negative vs positive)",
    "model": "smollm2-135m",
    "data": TWEETS,
    "batch_size": 8,
    "eval_batch_size": 32,
    # what `deltatune demo` runs without --methods (the rest of "methods" runs when named)
    "default": ["lora", "spiel", "full", "lisa", "lightweight", "bitfit"],
    # method -> (method config, steps, peak lr[, data options over "data"]); the order is the table's order
    "methods": {
        "lora": ({"name": "lora", "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}, 60, 2e-3),
        # SpIEL at exactly LoRA's trainable count on the same matrices: the equal-parameter comparison
        "spiel": ({"name": "spiel", "match": "lora:r=8", "targets": ["q_proj", "v_proj"]}, 60, 1e-3),
        "full": ({"name": "full"}, 24, 3e-5),
        # LISA (embeddings/head + 2 random blocks, redrawn every 20 steps): full-rank updates at a fraction of
        # full fine-tuning's memory; the full-parameter learning rate
        "lisa": ({"name": "lisa", "activated_layers": 2, "interval_steps": 20}, 60, 3e-5),
        "lightweight": ({"name": "lightweight", "parts": [], "last_k": 2}, 60, 2e-4),
        "bitfit": ({"name": "bitfit"}, 60, 1e-3),
        # the low-rank family at LoRA's trainable count on the same matrices (q, v), LoRA's recipe: run them with
        # `deltatune demo --methods lora,kasa,dora,corda,adalora,increlora` (not in the default run: its time budget)
        "kasa": ({"name": "kasa", "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}, 60, 2e-3),
        "dora": ({"name": "dora", "r": 8, "alpha": 16, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}, 60, 2e-3),
        # rank 12 pruned to an average of 8 (scale alpha / init_r = 2, as LoRA's 16 / 8)
        "adalora": ({"name": "adalora", "init_r": 12, "target_r": 8, "alpha": 24, "targets": ["q_proj", "v_proj"]},
                    60, 2e-3),
        # CorDA's covariance from 256 training examples (instruction-previewed: the largest r components train)
        "corda": ({"name": "corda", "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"], "data": TWEETS, "samples": 256},
                  60, 2e-3),
        # rank 4 grown to an average of 8
        "increlora": ({"name": "increlora", "init_r": 4, "target_rank": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]},
                      60, 2e-3),
        # the adapter family (issue 7): run with `deltatune demo --methods lora,adapter,parallel_adapter,...`
        "adapter": ({"name": "adapter", "placement": "houlsby", "r": 16}, 60, 2e-3),
        "parallel_adapter": ({"name": "parallel_adapter", "r": 32, "sublayers": ["ffn"]}, 60, 2e-3),
        "scaled_parallel_adapter": ({"name": "scaled_parallel_adapter", "r": 32, "scale": 4.0}, 60, 1e-3),
        # VQT reads every layer through one query token and trains a new head on those features (the model is
        # loaded with a sequence-classification head, `data.head: true`; the backbone only runs forward)
        "vqt": ({"name": "vqt", "tokens": 1}, 60, 5e-3, {"head": True}),
        "connected": ({"name": "connected", "variant": "aside+adapters", "r": 64, "adapter_r": 64}, 60, 1e-3),
        "prefix": ({"name": "prefix", "length": 30, "reparam": True, "mid_dim": 800}, 60, 2e-4),
        "prompt": ({"name": "prompt", "length": 100, "init": "vocab"}, 60, 3e-2),
        "ptuning_v2": ({"name": "ptuning_v2", "length": 20, "init": "vocab"}, 60, 1e-2),
        "mam": ({"name": "mam", "prefix_length": 16, "mid_dim": 800, "r": 16, "scale": 4.0}, 60, 1e-3),
        # zeroth-order (issue 9) at LoRA's compute budget: a LoRA step is ~3 forward passes' worth (forward +
        # backward), a MeZO step 2 forward passes, so 90 MeZO steps = 180 forward passes ≈ LoRA's 60 steps;
        # MeZO's paper learning rates (1e-6 on the full model; 1e-4 with eps 1e-2 over LoRA)
        "mezo": ({"name": "mezo"}, 90, 1e-6),
        "mezo-lora": ({"name": "mezo", "base": "lora", "eps": 1e-2,
                       "base_options": {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}}, 90, 1e-4),
    },
}

# The quick demo: MiniLM with a fresh classification head on BBC news topics (5 classes).
QUICK_SETUP: dict[str, Any] = {
    "title": "MiniLM-L6 with a fresh classification head on BBC news topics (5 classes)",
    "model": "minilm-l6",
    "data": {"name": "bbc", "task": "classification", "max_length": 64, "eval_fraction": 0.2,
             "max_train": 240, "max_eval": 100},
    "batch_size": 8,
    "eval_batch_size": 32,
    "methods": {
        "lora": ({"name": "lora", "r": 8, "alpha": 16, "modules_to_save": ["classifier"]}, 30, 5e-3),
        "full": ({"name": "full"}, 30, 2e-4),
    },
}

# kept for `deltatune demo` and callers of the earlier single-run demo: LoRA's steps and learning rate
DEFAULT_STEPS = DEFAULT_SETUP["methods"]["lora"][1]
DEFAULT_LR = DEFAULT_SETUP["methods"]["lora"][2]

COLUMNS = ("method", "trainable params", "peak memory", "s / step", "held-out accuracy", "artifact", "note")


def human_bytes(n: int | float | None) -> str:
    """1536 -> '1.5 KiB'."""
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


# -- the worker: one run in its own process -----------------------------------------------------
def _zero_shot(config: dict[str, Any]) -> dict[str, Any]:
    """The base model on the held-out set, loaded and seeded exactly as ``dt.train`` loads it (so a fresh
    classification head is the one the methods start from)."""
    import random

    import torch

    from deltatune.data import models, tasks
    from deltatune.train.config import load_config

    cfg = load_config(config)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    model = models.load(cfg.model, **tasks.model_request(cfg.data, cfg.model))
    tokenizer = models.load_tokenizer(cfg.model)
    task = tasks.build_task(cfg.data, tokenizer, model)
    metrics = task.evaluate(model, cfg.train.eval_batch_size)
    labels = [f["label"] for f in task.eval]
    majority = max(labels.count(k) for k in set(labels)) / len(labels)
    return {"accuracy": metrics["accuracy"], "eval_loss": metrics["loss"], "eval_examples": len(labels),
            "train_examples": len(task.train), "majority_accuracy": majority,
            "model_parameters": sum(p.numel() for p in model.parameters())}


def _worker(spec_path: str, result_path: str) -> None:
    """Run one spec ({"kind": "zero-shot" | "train", "config": ...}); write the result as JSON."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar would cut through the training bar
    hf_logging.set_verbosity_error()
    spec = json.loads(Path(spec_path).read_text())
    start = time.perf_counter()
    try:
        if spec["kind"] == ZERO_SHOT:
            result: dict[str, Any] = {"zero_shot": _zero_shot(spec["config"])}
        else:
            import deltatune as dt
            from deltatune.train import loop

            loop.print_summary = lambda summary: None  # the demo prints one table for all runs
            result = {"summary": dt.train(spec["config"])}
    except DeltatuneError as e:  # the method does not apply to this model: a note, not a crash
        result = {"error": " ".join(str(e).split())}
    result["seconds"] = time.perf_counter() - start
    import torch

    from deltatune.train.loop import peak_memory_bytes

    result["peak_rss_bytes"] = peak_memory_bytes(torch.device("cpu"))  # the process RSS high-water mark
    Path(result_path).write_text(json.dumps(result))


def _run_worker(spec: dict[str, Any], show: bool, console: Console) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="deltatune-demo-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        console.file.flush()
        proc = subprocess.run(
            [sys.executable, "-m", "deltatune.cli.demo", "--worker", str(spec_path), str(result_path)],
            stdout=None if show else subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, preexec_fn=die_with_parent,
        )
        if proc.returncode != 0 or not result_path.exists():
            tail = (proc.stderr or "")[-3000:]
            raise DeltatuneError(f"the demo run {spec['label']!r} failed (exit code {proc.returncode}): {tail}")
        return json.loads(result_path.read_text())


# -- the demo ----------------------------------------------------------------------------------
def _config(setup: dict[str, Any], method: dict[str, Any], steps: int, lr: float, seed: int, output: Path,
            show: bool, data: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "model": setup["model"],
        "data": {**setup["data"], **(data or {}), "seed": seed},
        "method": dict(method),
        "train": {"steps": steps, "batch_size": setup["batch_size"], "lr": lr, "warmup": 0.1, "schedule": "linear",
                  "seed": seed, "eval_batch_size": setup["eval_batch_size"], "progress": show, "device": "cpu"},
        "output": str(output),
    }


def _artifact_bytes(folder: Path) -> int | None:
    if not (folder / "deltatune.json").is_file():
        return None
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def demo(
    *,
    quick: bool = False,
    out: str | os.PathLike = "demo-report",
    methods: list[str] | str | None = None,
    steps: int | None = None,
    seed: int = 0,
    lora_options: dict[str, Any] | None = None,
    show: bool = True,
    console: Console | None = None,
    command: str | None = None,
) -> list[dict[str, Any]]:
    """Zero-shot accuracy, then each method trained with ``dt.train`` and scored on the same held-out set.

    ``quick``: MiniLM on BBC topics (under a minute) instead of SmolLM2-135M on tweets (under 10 minutes on
    2 CPU cores). ``methods``: names (or "lora,full") from the setup's list, default its ``default`` list (all of them when it has none); ``steps``
    overrides every method's step count; ``lora_options`` override LoRA's config (e.g. ``{"r": 16}``).
    Writes ``out``/report.md, loss.png, accuracy.png and artifacts/<method>. Returns the table rows as
    dicts (the zero-shot row first)."""
    setup = QUICK_SETUP if quick else DEFAULT_SETUP
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = list(setup.get("default", setup["methods"])) if methods is None else methods
    unknown = [m for m in methods if m not in setup["methods"]]
    if unknown or not methods:
        raise DeltatuneError(
            f"methods={methods}: the {'quick ' if quick else ''}demo runs any of {', '.join(setup['methods'])}"
        )
    if steps is not None and steps < 1:
        raise DeltatuneError(f"steps={steps} must be at least 1")
    if lora_options:
        from deltatune.core import registry

        merged = {k: v for k, v in {**setup["methods"]["lora"][0], **lora_options}.items() if k != "name"}
        try:
            registry.make_config(registry.get("lora"), merged)
        except DeltatuneError as e:
            raise DeltatuneError(f"bad LoRA option(s) {lora_options}: {e}") from None

    console = console or Console()
    out = Path(out)
    (out / "artifacts").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    total = len(methods) + 1
    console.print(f"[bold]deltatune demo[/]: {setup['title']}; report in {out}/")

    # -- zero-shot --------------------------------------------------------------------------
    console.print(f"[bold][1/{total}] zero-shot[/]: the base model on the held-out set")
    first_method = setup["methods"][methods[0]]
    zs_config = _config(setup, first_method[0], 1, 1e-3, seed, out / "artifacts" / ZERO_SHOT, show)
    zs = _run_worker({"kind": ZERO_SHOT, "config": zs_config, "label": ZERO_SHOT}, show, console)
    if "error" in zs:
        raise DeltatuneError(f"the zero-shot evaluation failed: {zs['error']}")
    base = zs["zero_shot"]
    rows: list[dict[str, Any]] = [{
        "method": ZERO_SHOT, "trainable": 0, "trainable_percent": 0.0, "peak_memory_bytes": zs["peak_rss_bytes"],
        "seconds_per_step": None, "steps": 0, "lr": None, "accuracy": base["accuracy"],
        "eval_loss": base["eval_loss"], "artifact": None, "artifact_bytes": None, "seconds": zs["seconds"],
        "losses": [], "note": "the base model, no training", "config": None,
    }]
    console.print(f"    accuracy {base['accuracy']:.1%} on {base['eval_examples']} held-out examples "
                  f"(majority class: {base['majority_accuracy']:.1%})")

    # -- each method in its own process ----------------------------------------------------
    for i, name in enumerate(methods, start=2):
        method, n_steps, lr, *data = setup["methods"][name]
        if name == "lora" and lora_options:
            method = {**method, **lora_options}
        n_steps = steps if steps is not None else n_steps
        folder = out / "artifacts" / name
        if folder.exists():
            shutil.rmtree(folder)
        config = _config(setup, method, n_steps, lr, seed, folder, show, data[0] if data else None)
        console.print(f"[bold][{i}/{total}] {name}[/]: {n_steps} steps of {setup['batch_size']}, lr {lr:g}")
        result = _run_worker({"kind": "train", "config": config, "label": name}, show, console)
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # resume state, not part of the demo
        if "error" in result:
            console.print(f"    [yellow]skipped[/]: {result['error']}")
            rows.append({"method": name, "trainable": None, "trainable_percent": None, "peak_memory_bytes": None,
                         "seconds_per_step": None, "steps": 0, "lr": lr, "accuracy": None, "eval_loss": None,
                         "artifact": None, "artifact_bytes": None, "seconds": result["seconds"], "losses": [],
                         "note": f"skipped: {result['error']}", "config": method})
            continue
        s = result["summary"]
        rows.append({
            "method": name, "trainable": s["trainable"], "trainable_percent": 100 * s["trainable"] / s["model_parameters"],
            "peak_memory_bytes": result["peak_rss_bytes"], "seconds_per_step": s["seconds_per_step"],
            "steps": s["steps"], "lr": lr, "accuracy": s["final"].get("eval_accuracy"),
            "eval_loss": s["final"].get("eval_loss"), "artifact": str(folder), "artifact_bytes": _artifact_bytes(folder),
            "seconds": result["seconds"], "losses": [h["loss"] for h in s["history"]], "note": "", "config": method,
        })
        console.print(f"    accuracy {rows[-1]['accuracy']:.1%} after {s['steps']} steps "
                      f"({result['seconds']:.0f} s in all)")

    seconds = time.perf_counter() - start
    info = {"setup": setup, "base": base, "seconds": seconds, "seed": seed, "quick": quick,
            "command": command or _command(quick, out, methods, steps, seed)}
    _plots(rows, out, setup, base["majority_accuracy"])
    (out / "report.md").write_text(_markdown(rows, info))
    (out / "rows.json").write_text(json.dumps(rows, indent=2) + "\n")
    if show:
        console.print(_table(rows, setup, base, seconds))
        console.print(f"report: {out / 'report.md'}, plots: {out / 'loss.png'}, {out / 'accuracy.png'}")
    return rows


def _command(quick: bool, out: Path, methods: list[str], steps: int | None, seed: int) -> str:
    parts = ["deltatune", "demo"] + (["--quick"] if quick else []) + ["--out", str(out), "--methods", ",".join(methods)]
    parts += (["--steps", str(steps)] if steps is not None else []) + ["--seed", str(seed)]
    return shlex.join(parts)


# -- output ------------------------------------------------------------------------------------
def _cells(row: dict[str, Any]) -> list[str]:
    trainable = "-" if row["trainable"] is None else (
        f"{row['trainable']:,} ({row['trainable_percent']:.2f}%)" if row["trainable"] else "0")
    return [
        row["method"],
        trainable,
        human_bytes(row["peak_memory_bytes"]) if row["peak_memory_bytes"] else "-",
        f"{row['seconds_per_step']:.2f}" if row["seconds_per_step"] else "-",
        f"{row['accuracy']:.1%}" if row["accuracy"] is not None else "-",
        human_bytes(row["artifact_bytes"]) if row["artifact_bytes"] else "-",
        row["note"] or (f"{row['steps']} steps, lr {row['lr']:g}" if row["steps"] else ""),
    ]


def _count(n: int) -> str:
    """460800 -> '460.8K'."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _percent(p: float) -> str:
    return f"{p:.0f}%" if p >= 99.5 else f"{p:.1f}%" if p >= 1 else f"{p:.2f}%"


def _table(rows: list[dict[str, Any]], setup: dict[str, Any], base: dict[str, Any], seconds: float) -> Table:
    table = Table(title=f"deltatune demo: {setup['title']}", caption=(
        f"{base['eval_examples']} held-out examples, majority class {base['majority_accuracy']:.1%}; "
        f"peak memory: each run's process RSS; wall time {seconds:.0f} s"))
    for col in ("method", "trainable", "peak mem", "s/step", "accuracy", "artifact"):
        table.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for row in rows:
        trainable = "-" if row["trainable"] is None else (
            f"{_count(row['trainable'])} ({_percent(row['trainable_percent'])})" if row["trainable"] else "0")
        cells = _cells(row)
        table.add_row(row["method"], trainable, *cells[2:6])
    notes = [f"{r['method']}: {r['note']}" for r in rows if r["note"].startswith("skipped")]
    if notes:
        table.caption += "\n" + "\n".join(notes)
    return table


def _markdown(rows: list[dict[str, Any]], info: dict[str, Any]) -> str:
    import torch

    setup, base = info["setup"], info["base"]
    data = setup["data"]
    lines = [
        f"# deltatune demo: {setup['title']}",
        "",
        f"Command: `{info['command']}`",
        "",
        f"Machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}. Wall time: {info['seconds']:.0f} s.",
        "",
        f"Model `{setup['model']}`; data `{data['name']}` ({', '.join(data['labels']) if data.get('labels') else 'all labels'}), "
        f"{base['train_examples']} training examples, {base['eval_examples']} held-out examples "
        f"(majority class {base['majority_accuracy']:.1%}), max_length {data['max_length']}, batch size "
        f"{setup['batch_size']}, seed {info['seed']}. Each method is trained with `dt.train` (AdamW, or a "
        "zeroth-order method's own two-forward step; 10% warm-up, linear decay) in its own process; peak memory "
        "is that process's RSS high-water mark (model, data, training and evaluation). s / step is the median "
        "optimizer step.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 2) + ["---"]) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in rows]
    lines += ["", "![training loss](loss.png)", "", "![held-out accuracy](accuracy.png)", ""]
    configs = [f"- `{r['method']}`: `{json.dumps(r['config'])}`" for r in rows if r["config"]]
    if configs:
        lines += ["Method configs:", "", *configs, ""]
    return "\n".join(lines)


def _plots(rows: list[dict[str, Any]], out: Path, setup: dict[str, Any], majority: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        if row["losses"]:
            ax.plot(range(1, len(row["losses"]) + 1), row["losses"], label=row["method"], alpha=0.85)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"training loss: {setup['model']} on {setup['data']['name']}")
    if any(r["losses"] for r in rows):
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)

    scored = [r for r in rows if r["accuracy"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar([r["method"] for r in scored], [r["accuracy"] for r in scored],
                  color=["#999999" if r["method"] == ZERO_SHOT else "#3b75af" for r in scored])
    ax.bar_label(bars, labels=[f"{r['accuracy']:.1%}" for r in scored])
    ax.axhline(majority, color="#cc4444", linestyle="--", linewidth=1, label=f"majority class {majority:.1%}")
    ax.legend(loc="lower right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"held-out accuracy: {setup['model']} on {setup['data']['name']}")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m deltatune.cli.demo --worker SPEC.json RESULT.json (run by `deltatune demo`)")
