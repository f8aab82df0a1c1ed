"""``deltatune demo``: zero-shot vs LoRA vs full fine-tuning (and more) on one task, with the real engine.

The default run: SmolLM2-135M scores the label words " negative" / " positive" after the prompt
``"Tweet: {text}\\nSentiment:"`` (tweet sentiment restricted to positive vs negative). The zero-shot row is the
base model on the held-out set; every method is then trained with ``dt.train`` (the same engine as
``deltatune train``) and evaluated on the same held-out set. ``quick=True`` does the same with MiniLM and a
fresh classification head on BBC news topics in well under a minute.

Every row trains the method's preset (``deltatune/presets/<name>.yaml``, what ``deltatune train <name>`` runs):
its method config, learning rate, schedule and step count. The demo changes only what makes the rows one
comparison (``run_config`` lists each change and why): the model and data, the batch size, a step budget where
a row says so, evaluation at the end only, the seed, the CPU, and the output folder.

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
from typing import Any, NamedTuple

from rich.console import Console
from rich.table import Table

from deltatune.cli._proc import die_with_parent
from deltatune.errors import DeltatuneError
from deltatune.train.config import read_config

ZERO_SHOT = "zero-shot"


class Row(NamedTuple):
    """A demo row: the preset it trains, and ``train`` settings the demo changes for this row only."""

    preset: str
    train: dict[str, Any] = {}


# The default demo: SmolLM2-135M, tweets positive vs negative, label-word scoring.
TWEETS: dict[str, Any] = {"name": "tweets", "task": "classification", "labels": ["negative", "positive"], "max_length": 64,
                          "eval_fraction": 0.1, "max_train": 2000, "max_eval": 200}
# a MeZO step is two forward passes, a first-order step about three (forward + backward): 90 MeZO steps match
# the 60 steps of the LoRA row in forward passes; the presets' long constant-lr runs would not fit the demo, so
# these rows take the warm-up and linear decay every other row has
MEZO_BUDGET: dict[str, Any] = {"steps": 90, "warmup": 0.1, "schedule": "linear"}
DEFAULT_SETUP: dict[str, Any] = {
    "title": "SmolLM2-135M on tweet sentiment (negative vs positive)",
    "model": "smollm2-135m",
    "data": TWEETS,
    "batch_size": 8,
    "eval_batch_size": 32,
    # what `deltatune demo` runs without --methods (the rest of "methods" runs when named)
    "default": ["lora", "spiel", "full", "lisa", "lightweight", "bitfit"],
    # the table's rows, in its order. Beyond the default set: the low-rank family at LoRA's trainable count
    # (`--methods lora,kasa,dora,corda,adalora,increlora`), the adapter and prompt families, the connected
    # pathway and the zeroth-order methods
    "methods": {
        "lora": Row("lora"),
        "spiel": Row("spiel"),  # at exactly LoRA's trainable count on the same matrices
        "full": Row("full"),
        "lisa": Row("lisa"),
        "lightweight": Row("lightweight"),
        "bitfit": Row("bitfit"),  # skipped on SmolLM2 (no biases), with the reason as a note
        "kasa": Row("kasa"),
        "dora": Row("dora"),
        "adalora": Row("adalora"),
        "corda": Row("corda"),
        "increlora": Row("increlora"),
        "adapter": Row("adapter"),
        "parallel_adapter": Row("parallel_adapter"),
        "scaled_parallel_adapter": Row("scaled_parallel_adapter"),
        "vqt": Row("vqt"),  # loads the model with a classification head (data.head: true in its preset)
        "connected": Row("connected"),
        "prefix": Row("prefix"),
        "prompt": Row("prompt"),
        "ptuning_v2": Row("ptuning_v2"),
        "mam": Row("mam"),
        "mezo": Row("mezo", MEZO_BUDGET),
        "mezo-lora": Row("mezo-lora", MEZO_BUDGET),
    },
}

# The quick demo: MiniLM with a fresh classification head on BBC news topics (5 classes), 30 steps per method
# so that the whole demo stays under a minute.
QUICK_SETUP: dict[str, Any] = {
    "title": "MiniLM-L6 with a fresh classification head on BBC news topics (5 classes)",
    "model": "minilm-l6",
    "data": {"name": "bbc", "task": "classification", "max_length": 64, "eval_fraction": 0.2,
             "max_train": 240, "max_eval": 100},
    "batch_size": 8,
    "eval_batch_size": 32,
    "methods": {
        "lora": Row("lora-minilm", {"steps": 30}),
        "full": Row("full-minilm", {"steps": 30}),
    },
}


def run_config(setup: dict[str, Any], name: str, *, seed: int = 0, output: str | os.PathLike = "demo-report",
               steps: int | None = None, lora_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run config of demo row ``name``: its preset, with what the demo changes and why.

    - ``model`` and ``data``: the demo's task, the same for every row. ``data.head`` stays the preset's (VQT
      trains a classification head), and a method that reads data itself (CorDA's calibration) reads the
      demo's data too.
    - ``train.batch_size``: one batch size for every row; ``train.eval_batch_size``: larger evaluation batches
      (faster, the same metrics).
    - ``train.steps`` (and more) where the row says so; ``steps`` (``--steps``) for every row.
    - ``train.eval_every`` / ``train.save_every`` = 0: one evaluation and one checkpoint, at the end (the demo
      keeps no checkpoint).
    - ``train.seed`` and ``data.seed``: the demo's ``seed``; ``train.device``: the CPU the published numbers
      were measured on; ``train.progress``: off (the demo shows a bar of its own).
    - ``output``; ``lora_options`` (``-o r=16``) change the LoRA row's method.
    """
    row = setup["methods"][name]
    preset = read_config(row.preset)
    data = {**setup["data"], "seed": seed}
    head = (preset.get("data") or {}).get("head")
    if head is not None:
        data["head"] = head
    method = dict(preset["method"])
    if "data" in method:
        method["data"] = dict(data)
    if name == "lora" and lora_options:
        method.update(lora_options)
    train = {**preset.get("train", {}), "batch_size": setup["batch_size"], "eval_batch_size": setup["eval_batch_size"],
             "eval_every": 0, "save_every": 0, "seed": seed, "device": "cpu", "progress": False, **row.train}
    if steps is not None:
        train["steps"] = steps
    return {"model": setup["model"], "data": data, "method": method, "train": train, "output": str(output)}


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
    from deltatune.data.tasks import load_for_task
    from deltatune.train.config import load_config

    cfg = load_config(config)
    model, _, task = load_for_task(cfg.data, cfg.model, seed=cfg.train.seed)
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
            from deltatune.train.callbacks import ProgressBar

            # a progress bar, but no summary table per run: the demo prints one table for all of them
            result = {"summary": dt.train(spec["config"], callbacks=[ProgressBar()] if spec.get("show") else [])}
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
    2 CPU cores). ``methods``: names (or "lora,full") from the setup's list, default its ``default`` list (all
    of them when it has none); ``steps`` overrides every method's step count; ``lora_options`` override
    LoRA's config (e.g. ``{"r": 16}``). Each row trains its preset as ``run_config`` says.
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

        method = run_config(setup, "lora", lora_options=lora_options)["method"]
        try:
            registry.make_config(registry.get("lora"), {k: v for k, v in method.items() if k != "name"})
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
    zs_config = run_config(setup, methods[0], seed=seed, output=out / "artifacts" / ZERO_SHOT)
    zs_config["data"] = {**setup["data"], "seed": seed}  # the base model as it is: no head a row's preset asks for
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
        folder = out / "artifacts" / name
        if folder.exists():
            shutil.rmtree(folder)
        config = run_config(setup, name, seed=seed, output=folder, steps=steps, lora_options=lora_options)
        method, n_steps, lr = config["method"], config["train"]["steps"], config["train"]["lr"]
        console.print(f"[bold][{i}/{total}] {name}[/]: {n_steps} steps of {setup['batch_size']}, lr {lr:g} "
                      f"(preset {setup['methods'][name].preset})")
        result = _run_worker({"kind": "train", "config": config, "label": name, "show": show}, show, console)
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
        f"{setup['batch_size']}, seed {info['seed']}. Each method is trained with `dt.train` from its preset "
        "(`deltatune/presets/`: the method config, learning rate and steps; AdamW, or a zeroth-order method's own "
        "two-forward step; 10% warm-up, linear decay) in its own process; peak memory "
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
