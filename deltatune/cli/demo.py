"""``deltatune demo``: the untrained model vs LoRA vs full fine-tuning (and more) on one task, with the real engine.

The default run: SmolLM2-135M scores the label words " negative" / " positive" after the prompt
``"Tweet: {text}\\nSentiment:"`` (tweet sentiment restricted to positive vs negative). The zero-shot row is the
base model on the held-out set; every method is then trained with ``dt.train`` (the same engine as
``deltatune train``) and evaluated on the same held-out set. ``quick=True`` does the same with MiniLM and a
fresh classification head on BBC news topics in about a minute; its first row is that untrained head.

Every row trains the method's preset (``deltatune/presets/<name>.yaml``, what ``deltatune train <name>`` runs):
its method config, learning rate, schedule and step count. The demo changes only what makes the rows one
comparison (``run_config`` lists each change and why): the model and data, the batch size, a step budget where
a row says so, when to evaluate, the seed, the CPU, and the output folder.

Each run (the baseline evaluation included) happens in a fresh ``python -m deltatune.cli.demo --worker``
subprocess, so the peak memory reported per method is that process's own RSS high-water mark (model
load, data, training and evaluation), not the demo's accumulated one. After training, the worker loads the
artifact back (as ``deltatune eval`` does) and predicts every held-out example: the confusion matrices and
example predictions come from the saved artifact, and loading it is checked on every run. A method that cannot
apply to the model (BitFit on Llama: no biases) is skipped with its reason as a note in the table.

Writes under ``OUT/``: ``report.md`` (the table, the machine, example predictions, the commands that use the
artifacts, each row's run config), ``cost.png`` (accuracy against trainable parameters, peak memory and
s / step), ``curves.png`` (held-out accuracy over the steps), ``confusion.png`` (a confusion matrix per row),
``loss.png`` (training loss), ``configs/<method>.yaml`` (the run config each row trained, for ``deltatune train``
and ``deltatune eval --config``), ``rows.json`` and the artifacts under ``artifacts/<method>``.
"""

from __future__ import annotations

import json
import math
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

ZERO_SHOT = "zero-shot"  # the worker's kind of run that trains nothing; the row's name is the setup's "baseline"
EXAMPLES = 4  # example predictions in the report: at least this many, and at least one per class


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
    # the first row: the base model scoring the label words as it is
    "baseline": ZERO_SHOT,
    # held-out evaluations per run for the accuracy curves (the last at the end); each costs a pass over the
    # 200 held-out tweets, so two keep the demo's time about what one was
    "eval_points": 2,
    # the text of the `deltatune generate` example in the report
    "example": "what a lovely day at the beach with friends",
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
# so that the whole demo stays about a minute.
QUICK_SETUP: dict[str, Any] = {
    "title": "MiniLM-L6 with a fresh classification head on BBC news topics (5 classes)",
    "model": "minilm-l6",
    "data": {"name": "bbc", "task": "classification", "max_length": 64, "eval_fraction": 0.2,
             "max_train": 240, "max_eval": 100},
    "batch_size": 8,
    "eval_batch_size": 32,
    # an encoder has no zero-shot answer: the first row is the fresh head every method starts from, untrained
    "baseline": "untrained head",
    "eval_points": 3,  # 100 held-out articles on MiniLM: an evaluation costs well under a second
    "example": "Shares in the bank fell sharply after it warned that profits would miss forecasts.",
    "methods": {
        "lora": Row("lora-minilm", {"steps": 30}),
        "full": Row("full-minilm", {"steps": 30}),
    },
}


def eval_every(steps: int, points: int) -> int:
    """``train.eval_every`` for about ``points`` evaluations in ``steps`` steps (the loop always evaluates at the
    last step)."""
    return max(1, steps // max(1, points))


def run_config(setup: dict[str, Any], name: str, *, seed: int = 0, output: str | os.PathLike = "demo-report",
               steps: int | None = None, lora_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run config of demo row ``name``: its preset, with what the demo changes and why.

    - ``model`` and ``data``: the demo's task, the same for every row. ``data.head`` stays the preset's (VQT
      trains a classification head), and a method that reads data itself (CorDA's calibration) reads the
      demo's data too.
    - ``train.batch_size``: one batch size for every row; ``train.eval_batch_size``: larger evaluation batches
      (faster, the same metrics).
    - ``train.steps`` (and more) where the row says so; ``steps`` (``--steps``) for every row.
    - ``train.eval_every``: the setup's ``eval_points`` held-out evaluations per run (the accuracy curves);
      ``train.save_every`` = 0: one checkpoint, at the end (the demo keeps no checkpoint).
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
             "save_every": 0, "seed": seed, "device": "cpu", "progress": False, **row.train}
    if steps is not None:
        train["steps"] = steps
    train["eval_every"] = eval_every(train["steps"], setup.get("eval_points", 1))
    return {"model": setup["model"], "data": data, "method": method, "train": train, "output": str(output)}


COLUMNS = ("method", "trainable params", "peak memory", "s / step", "held-out accuracy", "artifact", "run config",
           "note")


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


# -- the worker: one run, in its own process unless the demo runs in-process --------------------------------------
def example_indices(labels: list[int], classes: int) -> list[int]:
    """The held-out examples the report shows: the first few of each class (the same for every row)."""
    per_class = max(1, math.ceil(EXAMPLES / max(1, classes)))
    seen: dict[int, int] = {}
    picked = []
    for i, y in enumerate(labels):
        if seen.get(y, 0) < per_class:
            seen[y] = seen.get(y, 0) + 1
            picked.append(i)
    return picked


def _text(task: Any, index: int) -> str:
    """The held-out example's text as the model read it (truncated to data.max_length), without the prompt
    around it when label words are scored."""
    text = task.tokenizer.decode(task.eval[index]["input_ids"], skip_special_tokens=True)
    prompt = getattr(task, "prompt", None)
    if prompt:  # "Tweet: {text}\nSentiment:": drop what the prompt adds around the text
        before, after = prompt.split("{text}")
        text = text.strip().removeprefix(before.strip()).removesuffix(after.strip())
    return " ".join(text.split())


def predict(model: Any, task: Any, batch_size: int) -> dict[str, Any]:
    """Every held-out example's predicted class in one pass, with the metrics the loop's evaluation reports
    (accuracy; loss: the mean cross-entropy of the class scores) and the texts of the examples the report shows."""
    import torch
    import torch.nn.functional as F

    predictions: list[int] = []
    total = 0.0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(task.eval), batch_size):
            batch = task.collate(task.eval[start:start + batch_size])
            scores = task.scores(model, batch)
            total += float(F.cross_entropy(scores, batch["labels"].to(scores.device), reduction="sum"))
            predictions += scores.argmax(-1).tolist()
    labels = [f["label"] for f in task.eval]
    picked = example_indices(labels, len(task.label_names))
    return {"predictions": predictions, "labels": labels, "label_names": list(task.label_names),
            "accuracy": sum(p == y for p, y in zip(predictions, labels, strict=True)) / len(labels),
            "loss": total / len(labels), "examples": {str(i): _text(task, i) for i in picked},
            "prompt": getattr(task, "prompt", None)}


def _zero_shot(config: dict[str, Any]) -> dict[str, Any]:
    """The base model on the held-out set, loaded and seeded exactly as ``dt.train`` loads it (so a fresh
    classification head is the one the methods start from)."""
    from deltatune.data.tasks import load_for_task
    from deltatune.train.config import load_config

    cfg = load_config(config)
    model, _, task = load_for_task(cfg.data, cfg.model, seed=cfg.train.seed)
    seen = predict(model, task, cfg.train.eval_batch_size)
    labels = seen["labels"]
    majority = max(labels.count(k) for k in set(labels)) / len(labels)
    return {"accuracy": seen["accuracy"], "eval_loss": seen["loss"], "eval_examples": len(labels),
            "train_examples": len(task.train), "majority_accuracy": majority,
            "model_parameters": sum(p.numel() for p in model.parameters()), "predictions": seen}


def _after_training(config: dict[str, Any]) -> dict[str, Any]:
    """The saved artifact loaded back onto a fresh base: its predictions, and which of ``deltatune export`` (PEFT)
    and ``deltatune merge`` apply to it (tried, so the report offers only commands that work)."""
    import deltatune as dt
    from deltatune.core import registry
    from deltatune.data.tasks import load_for_task
    from deltatune.train.config import load_config

    cfg = load_config(config)
    model, _, task = load_for_task(cfg.data, cfg.model, seed=cfg.train.seed)
    tuned = dt.load(model, cfg.output)
    seen = predict(tuned, task, cfg.train.eval_batch_size)
    uses = {"export": True, "merge": True}
    with tempfile.TemporaryDirectory(prefix="deltatune-demo-export-") as tmp:
        try:
            dt.export_peft(tuned, Path(tmp) / "peft")
        except DeltatuneError:
            uses["export"] = False
    try:
        tuned.merge()
    except DeltatuneError:
        uses["merge"] = False
    method = registry.get(cfg.method["name"])
    options = {k: v for k, v in cfg.method.items() if k != "name"}
    return {"predictions": seen, "uses": uses, "starts_at_base": method.has("starts_at_base", options)}


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one spec ({"kind": "zero-shot" | "train", "config": ...}) and return its result (JSON-able)."""
    import torch

    from deltatune.train.loop import peak_memory_bytes

    start = time.perf_counter()
    try:
        if spec["kind"] == ZERO_SHOT:
            result: dict[str, Any] = {"zero_shot": _zero_shot(spec["config"])}
            result["peak_rss_bytes"] = peak_memory_bytes(torch.device("cpu"))
        else:
            import deltatune as dt
            from deltatune.train.callbacks import ProgressBar

            # a progress bar, but no summary table per run: the demo prints one table for all of them
            result = {"summary": dt.train(spec["config"], callbacks=[ProgressBar()] if spec.get("show") else [])}
            result["train_seconds"] = time.perf_counter() - start
            # the run's peak (the process RSS high-water mark), before the artifact is loaded back
            result["peak_rss_bytes"] = peak_memory_bytes(torch.device("cpu"))
            result.update(_after_training(spec["config"]))
    except DeltatuneError as e:  # the method does not apply to this model: a note, not a crash
        result = {"error": " ".join(str(e).split())}
    result["seconds"] = time.perf_counter() - start
    return result


def _worker(spec_path: str, result_path: str) -> None:
    """The subprocess: run the spec in ``spec_path``, write the result as JSON to ``result_path``."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # nothing may cut through the training bar; this process is the demo's own
    hf_logging.set_verbosity_error()
    result = run_spec(json.loads(Path(spec_path).read_text()))
    Path(result_path).write_text(json.dumps(result))


def _run_worker(spec: dict[str, Any], show: bool, console: Console, isolate: bool = True) -> dict[str, Any]:
    if not isolate:
        return json.loads(json.dumps(run_spec(spec)))  # as the subprocess would hand it back
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


def _write_config(out: Path, name: str, config: dict[str, Any], preset: str) -> str:
    """``OUT/configs/<name>.yaml``: the run config the row trains (``deltatune train`` reruns it, ``deltatune eval
    --config`` evaluates on its held-out data). Returns its path relative to ``out`` (the report links it)."""
    import yaml

    folder = out / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    header = (f"# demo row {name!r}: the preset {preset!r} with the demo's changes (deltatune.cli.demo.run_config).\n"
              f"# deltatune train {shlex.quote(str(folder / f'{name}.yaml'))} --overwrite   # trains this row again\n")
    (folder / f"{name}.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False))
    return f"configs/{name}.yaml"


def _check_options(setup: dict[str, Any], methods: list[str], steps: int | None,
                   lora_options: dict[str, Any] | None, quick: bool) -> None:
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


def _empty_row(name: str, **values: Any) -> dict[str, Any]:
    return {"method": name, "trainable": None, "trainable_percent": None, "peak_memory_bytes": None,
            "seconds_per_step": None, "steps": 0, "lr": None, "accuracy": None, "eval_loss": None, "artifact": None,
            "artifact_bytes": None, "seconds": None, "losses": [], "evals": [], "note": "", "config": None,
            "config_file": None, "predictions": None, "uses": {}, "starts_at_base": False, **values}


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
    setup: dict[str, Any] | None = None,
    isolate: bool = True,
) -> list[dict[str, Any]]:
    """The untrained model's accuracy, then each method trained with ``dt.train`` and scored on the same held-out
    set.

    ``quick``: MiniLM on BBC topics (about a minute) instead of SmolLM2-135M on tweets (about 5 minutes on
    2 CPU cores). ``methods``: names (or "lora,full") from the setup's list, default its ``default`` list (all
    of them when it has none); ``steps`` overrides every method's step count; ``lora_options`` override
    LoRA's config (e.g. ``{"r": 16}``). Each row trains its preset as ``run_config`` says. ``setup``: a setup
    of one's own in the form of ``QUICK_SETUP`` (another model or data, e.g. a tiny stand-in in tests);
    ``isolate=False`` runs every row in this process (peak memory is then this process's high-water mark).
    Writes ``out``/report.md, the plots, configs/<method>.yaml and artifacts/<method>. Returns the table rows as
    dicts (the baseline row first)."""
    setup = setup or (QUICK_SETUP if quick else DEFAULT_SETUP)
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = list(setup.get("default", setup["methods"])) if methods is None else methods
    _check_options(setup, methods, steps, lora_options, quick)

    console = console or Console()
    out = Path(out)
    (out / "artifacts").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    total = len(methods) + 1
    baseline = setup.get("baseline", ZERO_SHOT)
    console.print(f"[bold]deltatune demo[/]: {setup['title']}; report in {out}/")

    # -- the untrained model ----------------------------------------------------------------------
    console.print(f"[bold][1/{total}] {baseline}[/]: the model before training, on the held-out set")
    zs_config = run_config(setup, methods[0], seed=seed, output=out / "artifacts" / ZERO_SHOT)
    zs_config["data"] = {**setup["data"], "seed": seed}  # the base model as it is: no head a row's preset asks for
    zs = _run_worker({"kind": ZERO_SHOT, "config": zs_config, "label": baseline}, show, console, isolate)
    if "error" in zs:
        raise DeltatuneError(f"the {baseline} evaluation failed: {zs['error']}")
    base = zs["zero_shot"]
    rows = [_empty_row(baseline, trainable=0, trainable_percent=0.0, peak_memory_bytes=zs["peak_rss_bytes"],
                       accuracy=base["accuracy"], eval_loss=base["eval_loss"], seconds=zs["seconds"],
                       note="the base model, no training", predictions=base["predictions"])]
    console.print(f"    accuracy {base['accuracy']:.1%} on {base['eval_examples']} held-out examples "
                  f"(majority class: {base['majority_accuracy']:.1%})")

    # -- each method in its own process ----------------------------------------------------
    for i, name in enumerate(methods, start=2):
        rows.append(_train_row(setup, name, i, total, out, seed, steps, lora_options, show, console, isolate))

    seconds = time.perf_counter() - start
    info = {"setup": setup, "base": base, "seconds": seconds, "seed": seed, "quick": quick, "out": out, "isolate": isolate,
            "command": command or _command(quick, out, methods, steps, seed)}
    _plots(rows, out, setup, base["majority_accuracy"])
    (out / "report.md").write_text(_markdown(rows, info))
    (out / "rows.json").write_text(json.dumps(rows, indent=2) + "\n")
    if show:
        console.print(_table(rows, setup, base, seconds))
        console.print(f"report: {out / 'report.md'} (plots, example predictions, the commands that use the "
                      "artifacts)")
    return rows


def _train_row(setup: dict[str, Any], name: str, i: int, total: int, out: Path, seed: int, steps: int | None,
               lora_options: dict[str, Any] | None, show: bool, console: Console, isolate: bool) -> dict[str, Any]:
    folder = out / "artifacts" / name
    if folder.exists():
        shutil.rmtree(folder)
    config = run_config(setup, name, seed=seed, output=folder, steps=steps, lora_options=lora_options)
    preset = setup["methods"][name].preset
    config_file = _write_config(out, name, config, preset)
    method, n_steps, lr = config["method"], config["train"]["steps"], config["train"]["lr"]
    console.print(f"[bold][{i}/{total}] {name}[/]: {n_steps} steps of {setup['batch_size']}, lr {lr:g} "
                  f"(preset {preset})")
    result = _run_worker({"kind": "train", "config": config, "label": name, "show": show}, show, console, isolate)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # resume state, not part of the demo
    if "error" in result:
        console.print(f"    [yellow]skipped[/]: {result['error']}")
        return _empty_row(name, lr=lr, seconds=result["seconds"], note=f"skipped: {result['error']}", config=method,
                          config_file=config_file)
    s = result["summary"]
    evals = [(h["step"], h["eval_accuracy"]) for h in s["history"] if "eval_accuracy" in h]
    # a row whose step 0 is the baseline model (the method starts at the base, on the same data and head)
    same_start = bool(result["starts_at_base"]) and config["data"].get("head") == setup["data"].get("head")
    row = _empty_row(
        name, trainable=s["trainable"], trainable_percent=100 * s["trainable"] / s["model_parameters"],
        peak_memory_bytes=result["peak_rss_bytes"], seconds_per_step=s["seconds_per_step"], steps=s["steps"], lr=lr,
        accuracy=s["final"].get("eval_accuracy"), eval_loss=s["final"].get("eval_loss"), artifact=str(folder),
        artifact_bytes=_artifact_bytes(folder), seconds=result["seconds"], losses=[h["loss"] for h in s["history"]],
        evals=evals, config=method, config_file=config_file, predictions=result["predictions"], uses=result["uses"],
        starts_at_base=same_start,
    )
    console.print(f"    accuracy {row['accuracy']:.1%} after {s['steps']} steps ({result['seconds']:.0f} s in all)")
    return row


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
        f"[{Path(row['config_file']).name}]({row['config_file']})" if row["config_file"] else "-",
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


def _data_name(data: dict[str, Any]) -> str:
    return str(data.get("name") or Path(str(data.get("path", "data"))).name)


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
        f"Model `{setup['model']}`; data `{_data_name(data)}` "
        f"({', '.join(data['labels']) if data.get('labels') else 'all labels'}), "
        f"{base['train_examples']} training examples, {base['eval_examples']} held-out examples "
        f"(majority class {base['majority_accuracy']:.1%}), max_length {data['max_length']}, batch size "
        f"{setup['batch_size']}, seed {info['seed']}. Each method is trained with `dt.train` from its preset "
        "(`deltatune/presets/`: the method config, learning rate and steps; AdamW, or a zeroth-order method's own "
        "two-forward step; 10% warm-up, linear decay) "
        + ("in its own process; peak memory is that process's RSS high-water mark (model, data, training and "
           "evaluation)" if info["isolate"] else "in the demo's process (peak memory: its RSS high-water mark so far)")
        + ". s / step is the median "
        "optimizer step. The first row is the model before any training. Each row's run config is linked; the "
        "confusion matrices and example predictions come from the saved artifacts, loaded back.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 3) + ["---", "---"]) + "|",
    ]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in _cells(r)) + " |" for r in rows]
    lines += ["", "![held-out accuracy against cost: trainable parameters, peak memory, seconds per step](cost.png)",
              "", "![held-out accuracy over the training steps](curves.png)", "",
              "![confusion matrices on the held-out set](confusion.png)", "", "![training loss](loss.png)", ""]
    lines += _examples_section(rows)
    lines += _commands_section(rows, info)
    lines += _configs_section(rows, info["out"])
    return "\n".join(lines)


def _examples_section(rows: list[dict[str, Any]]) -> list[str]:
    scored = [r for r in rows if r["predictions"]]
    if not scored:
        return []
    first = scored[0]["predictions"]
    names, labels = first["label_names"], first["labels"]
    lines = ["## Example predictions", "",
             "A few held-out examples (the first of each class), as the model read them; ✓ marks a right answer.", "",
             "| text | label | " + " | ".join(r["method"] for r in scored) + " |",
             "|---|---|" + "---|" * len(scored)]
    for index, text in first["examples"].items():
        short = text if len(text) <= 90 else text[:87].rstrip() + "..."
        y = labels[int(index)]
        cells = []
        for r in scored:
            p = r["predictions"]["predictions"][int(index)]
            cells.append(f"{names[p]} {'✓' if p == y else '✗'}")
        lines.append(f"| {short.replace('|', '/')} | {names[y]} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def bash_word(text: str) -> str:
    """``text`` as one bash word: single quotes, or ``$'...'`` (bash's ANSI-C quoting) when it holds a newline, so
    the program gets a real newline and not the two characters backslash and n."""
    if "\n" not in text:
        return shlex.quote(text)
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\t", "\\t")
    return f"$'{escaped}'"


def next_commands(row: dict[str, Any], out: Path, example: str) -> list[str]:
    """The commands that use a trained row's artifact, as the report prints them: evaluate it on the demo's
    held-out data, run it on one text, export it to PEFT and merge it into its base (where those apply)."""
    art = shlex.quote(row["artifact"])
    prompt = (row["predictions"] or {}).get("prompt")
    commands = [f"deltatune eval {art} --config {shlex.quote(str(out / row['config_file']))}"]
    if prompt:  # a causal LM scoring label words: what it writes after the prompt (eval is what scores the words)
        commands.append(f"deltatune generate {art} --prompt {bash_word(prompt.replace('{text}', example))} "
                        "--no-chat --max-new-tokens 8")
    else:  # a classification head: generate prints the label it predicts
        commands.append(f"deltatune generate {art} --prompt {bash_word(example)}")
    if row["uses"].get("export"):
        commands.append(f"deltatune export {art} --out {shlex.quote(str(out / 'peft' / row['method']))}")
    if row["uses"].get("merge"):
        commands.append(f"deltatune merge {art} --out {shlex.quote(str(out / 'merged' / row['method']))}")
    return commands


def _commands_section(rows: list[dict[str, Any]], info: dict[str, Any]) -> list[str]:
    trained = [r for r in rows if r["artifact"]]
    if not trained:
        return []
    setup, out = info["setup"], info["out"]
    first = trained[0]["predictions"]
    example = setup.get("example") or first["examples"][next(iter(first["examples"]))]
    lines = ["## Use the artifacts", "",
             "Evaluate an artifact on the demo's held-out data (its run config's data section), run it on a text "
             "(`generate`: what a causal LM writes after the prompt, whose next-token scores of the label words "
             "`eval` measures; or the label a classification head predicts), export it as a PEFT adapter (LoRA-family deltas), or merge it into its base model (a plain "
             "`save_pretrained` folder; activation-side deltas are served attached instead). The base model and its "
             "head come from the artifact.", "", "```bash"]
    for row in trained:
        lines += [f"# {row['method']}: {row['accuracy']:.1%} held-out accuracy", *next_commands(row, out, example)]
    return [*lines, "```", ""]


def _configs_section(rows: list[dict[str, Any]], out: Path) -> list[str]:
    with_config = [r for r in rows if r["config_file"]]
    if not with_config:
        return []
    lines = ["## Run configs", "",
             "What each row trained (`deltatune train <file> --overwrite` trains it again):", ""]
    for row in with_config:
        text = (out / row["config_file"]).read_text()
        lines += [f"<details><summary><code>{row['config_file']}</code> ({row['method']})</summary>", "",
                  "```yaml", text.rstrip(), "```", "", "</details>", ""]
    return lines


# -- plots -------------------------------------------------------------------------------------
def _plots(rows: list[dict[str, Any]], out: Path, setup: dict[str, Any], majority: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    where = f"{Path(setup['model']).name} on {_data_name(setup['data'])}"
    for name, draw in (("cost.png", _cost), ("curves.png", _curves), ("confusion.png", _confusion),
                       ("loss.png", _loss)):
        fig = draw(plt, rows, where, majority)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)


def _reference_lines(ax: Any, rows: list[dict[str, Any]], majority: float) -> None:
    ax.axhline(rows[0]["accuracy"], color="#999999", linestyle="--", linewidth=1,
               label=f"{rows[0]['method']} {rows[0]['accuracy']:.1%}")
    ax.axhline(majority, color="#cc4444", linestyle=":", linewidth=1, label=f"majority class {majority:.1%}")


def _cost(plt: Any, rows: list[dict[str, Any]], where: str, majority: float) -> Any:
    """Held-out accuracy against three costs, one panel each, the trained rows as labelled points."""
    from matplotlib.ticker import NullFormatter

    trained = [r for r in rows[1:] if r["accuracy"] is not None]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
    costs = (("trainable parameters", "trainable", True, 1.0), ("peak memory (GiB)", "peak_memory_bytes", False,
                                                                 2.0 ** 30),
             ("seconds per step", "seconds_per_step", False, 1.0))
    for ax, (label, key, log, unit) in zip(axes, costs, strict=True):
        points = [(r[key] / unit, r["accuracy"], r["method"]) for r in trained if r[key]]
        ax.scatter([x for x, _, _ in points], [y for _, y, _ in points], color="#3b75af", zorder=3)
        for x, y, name in points:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if log:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a narrow log range overlap
        else:
            ax.set_xlim(left=0)  # a cost read from zero: twice the bar is twice the cost
        _reference_lines(ax, rows, majority)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy")
    axes[0].set_ylim(0, 1.05)
    axes[-1].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"accuracy against cost: {where} (up and to the left is better)")
    return fig


def _curves(plt: Any, rows: list[dict[str, Any]], where: str, majority: float) -> Any:
    """Held-out accuracy at each evaluation; a row that starts at the baseline model starts at its accuracy."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows[1:]:
        points = ([(0, rows[0]["accuracy"])] if row["starts_at_base"] else []) + [tuple(e) for e in row["evals"]]
        if points:
            ax.plot([s for s, _ in points], [a for _, a in points], marker="o", label=row["method"], alpha=0.85)
    _reference_lines(ax, rows, majority)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"held-out accuracy during training: {where}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _confusion(plt: Any, rows: list[dict[str, Any]], where: str, majority: float) -> Any:
    """One confusion matrix per row (true class down, predicted across), each cell the count, shaded by the
    share of its true class."""
    import numpy as np

    scored = [r for r in rows if r["predictions"]]
    names = scored[0]["predictions"]["label_names"]
    k = len(names)
    cols = min(3, len(scored))
    grid = math.ceil(len(scored) / cols)
    size = 1.2 + 0.55 * k
    fig, axes = plt.subplots(grid, cols, figsize=(cols * size + 0.5, grid * size + 0.6), squeeze=False)
    for ax in axes.flat[len(scored):]:
        ax.axis("off")
    for ax, row in zip(axes.flat, scored, strict=False):
        counts = np.zeros((k, k), dtype=int)
        for y, p in zip(row["predictions"]["labels"], row["predictions"]["predictions"], strict=True):
            counts[y, p] += 1
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for y in range(k):
            for p in range(k):
                ax.text(p, y, str(counts[y, p]), ha="center", va="center", fontsize=8,
                        color="white" if share[y, p] > 0.6 else "black")
        ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
        ax.set_title(f"{row['method']} ({row['accuracy']:.0%})", fontsize=9)
    fig.supxlabel("predicted", fontsize=9)
    fig.supylabel("true", fontsize=9)
    fig.suptitle(f"confusion on the held-out set: {where}", fontsize=10)
    return fig


def _loss(plt: Any, rows: list[dict[str, Any]], where: str, majority: float) -> Any:
    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        if row["losses"]:
            ax.plot(range(1, len(row["losses"]) + 1), row["losses"], label=row["method"], alpha=0.85)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"training loss: {where}")
    if any(r["losses"] for r in rows):
        ax.legend()
    ax.grid(alpha=0.3)
    return fig


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m deltatune.cli.demo --worker SPEC.json RESULT.json (run by `deltatune demo`)")
