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

The protocol for comparisons (issue 18; ``docs/demo-results.md``, "Protocol"): ``seeds`` trains every row several
times on one held-out split (``artifacts/<method>-seed<k>``) and reports mean ± standard error; ``lr_grid`` chooses
each row's learning rate first, on a dev split carved from the training data (``lr-search/``).
"""

from __future__ import annotations

import contextlib
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
from deltatune.ops.search_refit import mean_se  # the mean and its standard error, as a refit reports them
from deltatune.train.config import read_config

ZERO_SHOT = "zero-shot"  # the worker's kind of run that trains nothing; the row's name is the setup's "baseline"
EXAMPLES = 4  # example predictions in the report: at least this many, and at least one per class


class Row(NamedTuple):
    """A demo row: the preset it trains, and ``train`` settings, ``method`` options, ``data`` keys and ``model`` keys
    the demo changes for this row only (a variant of a method: ``Row("spiel", method={"reselection_steps": 1000})``;
    a data step: ``Row("lora", data={"select": {"method": "random", "budget": 0.1}})``; a quantized base:
    ``Row("lora", model={"quantize": "nf4"})``)."""

    preset: str
    train: dict[str, Any] = {}
    method: dict[str, Any] = {}
    data: dict[str, Any] = {}
    model: dict[str, Any] = {}  # the run config's model mapping keys besides the name (quantize, double_quant, ...)


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
        "vera": Row("vera"),  # its natural size: shared random A, B on q, v; trained vectors only
        "loha": Row("loha"),  # at LoRA's trainable count (r 4: two factor pairs)
        "lokr": Row("lokr"),  # its natural size (Kronecker factors)
        "ia3": Row("ia3"),  # its natural size: vectors on k, v and the down_proj input
        "trainable_tokens": Row("trainable_tokens"),  # the label words' embedding rows (the tied head's too)
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
               steps: int | None = None, lora_options: dict[str, Any] | None = None, train_seed: int | None = None,
               lr: float | None = None) -> dict[str, Any]:
    """The run config of demo row ``name``: its preset, with what the demo changes and why.

    - ``model`` and ``data``: the demo's task, the same for every row (but a row's own ``data`` keys). ``data.head`` stays the preset's (VQT
      trains a classification head), and a method that reads data itself (CorDA's calibration) reads the
      demo's data too.
    - ``train.batch_size``: one batch size for every row; ``train.eval_batch_size``: larger evaluation batches
      (faster, the same metrics).
    - ``train.steps`` (and more) where the row says so; ``steps`` (``--steps``) for every row.
    - ``train.eval_every``: the setup's ``eval_points`` held-out evaluations per run (the accuracy curves);
      ``train.save_every`` = 0: one checkpoint, at the end (the demo keeps no checkpoint).
    - ``train.seed`` and ``data.seed``: the demo's ``seed``; ``train.device``: the CPU the published numbers
      were measured on; ``train.progress``: off (the demo shows a bar of its own).
    - ``train_seed`` (``--seeds``): ``train.seed`` alone (initialisation, batch order, dropout), so that every
      seed of a row is scored on the same held-out split (``data.seed`` stays ``seed``).
    - ``lr`` (``--lr-grid``): ``train.lr`` chosen on a dev split carved from the training data.
    - ``output``; ``lora_options`` (``-o r=16``) change the LoRA row's method; a row's ``method`` options change its
      method (a variant).
    """
    row = setup["methods"][name]
    preset = read_config(row.preset)
    data = {**setup["data"], **row.data, "seed": seed}
    head = (preset.get("data") or {}).get("head")
    if head is not None:
        data["head"] = head
    method = {**preset["method"], **row.method}
    if "data" in method:
        method["data"] = dict(data)
    if name == "lora" and lora_options:
        method.update(lora_options)
    train = {**preset.get("train", {}), "batch_size": setup["batch_size"], "eval_batch_size": setup["eval_batch_size"],
             "save_every": 0, "seed": seed if train_seed is None else train_seed, "device": "cpu", "progress": False,
             **row.train}
    if steps is not None:
        train["steps"] = steps
    if lr is not None:
        train["lr"] = lr
    train["eval_every"] = eval_every(train["steps"], setup.get("eval_points", 1))
    model = {"name": setup["model"], **row.model} if row.model else setup["model"]
    return {"model": model, "data": data, "method": method, "train": train, "output": str(output)}


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
    from deltatune.data.tasks import GenerativeClassificationTask, HeadClassificationTask, load_for_task
    from deltatune.train.config import load_config

    cfg = load_config(config)
    model, _, task = load_for_task(cfg.data, cfg.model, seed=cfg.train.seed, quantization=cfg.quantization)
    seen = predict(model, task, cfg.train.eval_batch_size)
    # a fresh head is drawn from the training seed, so only then does the baseline differ between seeds
    fresh_head = isinstance(task, HeadClassificationTask) and not isinstance(task, GenerativeClassificationTask)
    labels = seen["labels"]
    majority = max(labels.count(k) for k in set(labels)) / len(labels)
    return {"accuracy": seen["accuracy"], "eval_loss": seen["loss"], "eval_examples": len(labels),
            "train_examples": len(task.train), "majority_accuracy": majority,
            "model_parameters": sum(p.numel() for p in model.parameters()), "predictions": seen,
            "fresh_head": fresh_head}


def _scored_apart(config: dict[str, Any]) -> bool:
    """A row trained on preference pairs built from the labels (DPO and its family): its evaluation reports the
    objective's metrics, and the label-word accuracy is scored after training on the same held-out texts."""
    return config["data"].get("task") == "preference"


def _label_words(config: dict[str, Any]) -> dict[str, Any]:
    """The run config with the label-word classification task of its data: the same texts, split and prompt."""
    train = {k: v for k, v in config["train"].items() if k != "objective"}
    return {**config, "data": {**config["data"], "task": "classification"}, "train": train}


def _score_label_words(config: dict[str, Any], result: dict[str, Any]) -> None:
    """Add the label-word accuracy and loss of the saved delta on the run's held-out (or dev) texts to the run's
    final metrics, as a classification row's evaluation reports them (the objective's own metrics stay): from the
    predictions ``_after_training`` made where it ran, else from one evaluation of the artifact (a search run)."""
    import deltatune as dt

    metrics = result.get("predictions") or dt.eval(config["output"], _label_words(config)["data"],
                                                   batch_size=config["train"]["eval_batch_size"])
    result["summary"]["final"]["eval_accuracy"] = metrics["accuracy"]
    result["summary"]["final"]["eval_label_loss"] = metrics["loss"]


def _after_training(config: dict[str, Any]) -> dict[str, Any]:
    """The saved artifact loaded back onto a fresh base: its predictions, and which of ``deltatune export`` (PEFT)
    and ``deltatune merge`` apply to it (tried, so the report offers only commands that work)."""
    import deltatune as dt
    from deltatune.core import registry
    from deltatune.data.tasks import load_for_task
    from deltatune.train.config import load_config

    cfg = load_config(_label_words(config) if _scored_apart(config) else config)
    model, _, task = load_for_task(cfg.data, cfg.model, seed=cfg.train.seed, quantization=cfg.quantization)
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
    """Run one spec ({"kind": "zero-shot" | "train", "config": ..., "search": a learning-rate search run}) and
    return its result (JSON-able)."""
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
            if not spec.get("search"):  # a learning-rate search run is judged by its dev accuracy alone
                result.update(_after_training(spec["config"]))
            if _scored_apart(spec["config"]):
                _score_label_words(spec["config"], result)
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


RUNS = "runs"  # OUT/runs/<stem>.json: every run's spec and result, which --resume reuses


def _spec_key(spec: dict[str, Any]) -> str:
    """What makes two runs the same run: the spec without its display fields and without the device (a run made
    on an accelerator stands for the same run on the CPU)."""
    key = json.loads(json.dumps({k: v for k, v in spec.items() if k not in ("label", "show")}))
    config = key.get("config", {})
    config.get("train", {}).pop("device", None)
    if key.get("kind") == ZERO_SHOT:  # the base model as it is: its method and training settings play no part
        train = config.get("train", {})
        key["config"] = {"model": config.get("model"), "data": config.get("data"), "seed": train.get("seed"),
                         "eval_batch_size": train.get("eval_batch_size")}
    return json.dumps(key, sort_keys=True)


def _cached_run(plan: Plan, stem: str, spec: dict[str, Any], artifact: Path | None = None,
                scratch: Path | None = None, reuse_error: bool = True) -> dict[str, Any]:
    """Run ``spec`` (in a worker), keeping its spec and result in OUT/runs/``stem``.json. With ``plan.resume`` a
    kept result of the same spec is returned instead, when the run's ``artifact`` (if it keeps one) is still there:
    a long protocol (``scripts/demo_results.py``) continues where it stopped, run by run. A run that is made starts
    from an empty output folder (``artifact``, or ``scratch`` for a run whose folder is not kept): a run killed
    part-way leaves its folder behind, and training refuses a folder that is not empty. A kept failure is a result
    (the method does not apply) unless ``reuse_error`` is False: a run whose failure stops the demo is made again,
    since a fix may have come since."""
    from deltatune.core.artifact import replace_text

    spec = {**spec, "config": {**spec["config"], "train": {**spec["config"]["train"], "device": plan.device}}}
    path = plan.out / RUNS / f"{stem}.json"
    if plan.resume and path.is_file():
        kept = json.loads(path.read_text())
        failed = "error" in kept["result"]
        saved = artifact is None or failed or (artifact / "deltatune.json").is_file()
        if _spec_key(kept["spec"]) == _spec_key(spec) and saved and (reuse_error or not failed):
            return kept["result"]
    for folder in (artifact, scratch):
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    result = _run_worker(spec, plan.show, plan.console, plan.isolate)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_text(path, json.dumps({"spec": spec, "result": result}) + "\n")
    return result


# -- the demo ----------------------------------------------------------------------------------
def _artifact_bytes(folder: Path) -> int | None:
    if not (folder / "deltatune.json").is_file():
        return None
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def _write_config(out: Path, name: str, config: dict[str, Any], preset: str, *, folder: str = "configs",
                  what: str | None = None) -> str:
    """``OUT/<folder>/<name>.yaml``: the run config the row trains (``deltatune train`` reruns it, ``deltatune eval
    --config`` evaluates on its held-out data). Returns its path relative to ``out`` (the report links it)."""
    import yaml

    where = out / folder
    where.mkdir(parents=True, exist_ok=True)
    what = what or f"demo row {name!r}"
    header = (f"# {what}: the preset {preset!r} with the demo's changes (deltatune.cli.demo.run_config).\n"
              f"# deltatune train {shlex.quote(str(where / f'{name}.yaml'))} --overwrite   # trains this row again\n")
    (where / f"{name}.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False))
    return f"{folder}/{name}.yaml"


def parse_lr_grid(grid: list[float] | str | None) -> list[float] | None:
    """``--lr-grid 0.5,1,2``: multipliers of each row's preset learning rate, sorted (``0.5x`` is allowed too).
    Multipliers and not rates, because one grid serves every row and the presets' rates span 1e-6 (MeZO) to 2e-2.
    None: no search."""
    if grid is None:
        return None
    items = [i for i in (grid.split(",") if isinstance(grid, str) else list(grid)) if str(i).strip()]
    values = []
    for item in items:
        try:
            value = float(str(item).strip().removesuffix("x").removesuffix("×"))
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise DeltatuneError(f"lr_grid item {item!r} must be a positive number, a multiplier of each row's "
                                 "preset learning rate, e.g. --lr-grid 0.5,1,2")
        values.append(value)
    if len(set(values)) < 2:
        raise DeltatuneError(f"lr_grid={grid!r} must hold at least two different multipliers, e.g. 0.5,1,2 "
                             "(a grid of one rate chooses nothing)")
    return sorted(set(values))


def _check_options(setup: dict[str, Any], methods: list[str], steps: int | None,
                   lora_options: dict[str, Any] | None, quick: bool, seeds: int = 1) -> None:
    unknown = [m for m in methods if m not in setup["methods"]]
    if unknown or not methods:
        raise DeltatuneError(
            f"methods={methods}: the {'quick ' if quick else ''}demo runs any of {', '.join(setup['methods'])}"
        )
    if steps is not None and steps < 1:
        raise DeltatuneError(f"steps={steps} must be at least 1")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise DeltatuneError(f"seeds={seeds!r} must be a whole number of at least 1 (training runs per row)")
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


# -- several seeds: mean ± standard error ----------------------------------------------------------------
PER_SEED = ("accuracy", "eval_loss", "seconds_per_step", "peak_memory_bytes", "steps", "artifact", "config_file")


def aggregate(runs: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    """One table row from a row's runs, one per training seed: the mean ± standard error of accuracy, eval loss
    and s / step, the largest peak memory, and every seed's values under ``seeds``. The first seed's artifact,
    curves and predictions are the ones the report shows. One run is returned as it is (the report of one seed)."""
    if len(runs) == 1:
        return runs[0]
    row = dict(runs[0])
    for key in ("accuracy", "eval_loss", "seconds_per_step"):
        values = [r[key] for r in runs]
        if all(v is not None for v in values):
            row[key], row[f"{key}_se"] = mean_se(values)
    peaks = [r["peak_memory_bytes"] for r in runs if r["peak_memory_bytes"]]
    row["peak_memory_bytes"] = max(peaks) if peaks else None
    row["seconds"] = sum(r["seconds"] or 0.0 for r in runs)
    row["seeds"] = [{"seed": s, **{k: r[k] for k in PER_SEED}} for s, r in zip(seeds, runs, strict=True)]
    return row


# -- the learning-rate search on a dev split carved from the training data -----------------------------------
SEARCH = "lr-search"  # OUT/lr-search/: the search's data (training examples only) and its runs' configs


class SearchData(NamedTuple):
    """The data the learning-rate search trains and scores on."""

    data: dict[str, Any]  # the search runs' data section: the pool file, split by the data layer into train / dev
    pool: str  # the pool file, relative to OUT
    dev: int  # dev examples
    train: int  # the search's training examples


class Plan(NamedTuple):
    """What every row of one demo shares."""

    setup: dict[str, Any]
    out: Path
    seed: int  # the data seed (split and subsample) and the first training seed
    train_seeds: list[int]  # seed, seed + 1, ...: one reported run each
    steps: int | None
    lora_options: dict[str, Any] | None
    lr_grid: list[float] | None
    show: bool
    console: Console
    isolate: bool
    resume: bool = False  # reuse OUT/runs/<stem>.json of a run with the same spec (``_cached_run``)
    device: str = "cpu"


def search_data(setup: dict[str, Any], seed: int, out: Path) -> SearchData:
    """The dev split of the learning-rate search, carved from the training data: never the reported split.

    The setup's data splits as every run splits it (``data.seed`` = ``seed``); only its training part is used
    here. A stratified pool of ``max_train`` + D of those examples (D: the held-out split's size, so a dev accuracy
    is as precise as a reported one) is written to ``OUT/lr-search/data/pool.jsonl``, and the search runs read it
    with ``eval_fraction`` D / pool size: the data layer's own stratified split holds out D dev examples and
    leaves ``max_train`` to train on, as many as a reported run trains on (fewer when the data is short). The
    carving is ``deltatune search``'s (``deltatune.ops.search_data``)."""
    from deltatune.ops.search_data import POOL, dev_data

    data, sizes = dev_data({**setup["data"], "seed": seed}, out / SEARCH, None, who="--lr-grid",
                           smaller="data.max_eval (or run without --lr-grid)")
    return SearchData(data, str((out / SEARCH / POOL).relative_to(out)), sizes["dev"], sizes["train"])


def choose_lr(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The search run with the best dev accuracy; a tie goes to the rate nearest the preset's (the preset's own
    when it is among them), then to the lower. None when every run failed."""
    scored = [r for r in runs if r["dev_accuracy"] is not None]
    if not scored:
        return None
    best = max(r["dev_accuracy"] for r in scored)
    return min((r for r in scored if r["dev_accuracy"] == best),
               key=lambda r: (abs(math.log(r["multiplier"])), r["multiplier"]))


def _search_config(plan: Plan, name: str, search: SearchData, multiplier: float, folder: Path) -> dict[str, Any]:
    """Row ``name``'s run config with the search's data, the grid's rate, the first training seed and one
    evaluation (on the dev split) at the end."""
    config = run_config(plan.setup, name, seed=plan.seed, output=folder, steps=plan.steps,
                        lora_options=plan.lora_options)
    config["train"]["lr"] = float(f"{config['train']['lr'] * multiplier:.12g}")  # 0.005, not 0.005000000000000001
    data = {**search.data, **plan.setup["methods"][name].data}  # a row's own data keys (task: preference) too
    if "head" in config["data"]:
        data["head"] = config["data"]["head"]
    config["data"] = data
    if "data" in config["method"]:  # a method that calibrates on the data (CorDA) sees the search's, not the split
        config["method"]["data"] = dict(data)
    config["train"]["eval_every"] = config["train"]["steps"]
    return config


def _lr_search(plan: Plan, name: str, search: SearchData) -> dict[str, Any]:
    """Train row ``name`` once per rate of the grid on the search's training examples, score each on the dev split
    and choose (``choose_lr``). The search runs' deltas are deleted; their configs stay in OUT/lr-search/configs."""
    preset = plan.setup["methods"][name].preset
    runs: list[dict[str, Any]] = []
    for multiplier in plan.lr_grid or []:
        stem = f"{name}-x{multiplier:g}"
        folder = plan.out / SEARCH / "artifacts" / stem
        config = _search_config(plan, name, search, multiplier, folder)
        lr = config["train"]["lr"]
        config_file = _write_config(plan.out, stem, config, preset, folder=f"{SEARCH}/configs",
                                    what=f"learning-rate search of demo row {name!r} (lr x {multiplier:g})")
        result = _cached_run(plan, f"{SEARCH}-{stem}", {"kind": "train", "config": config, "search": True,
                                                        "label": f"{name} lr {lr:g}", "show": plan.show},
                             scratch=folder)
        shutil.rmtree(folder, ignore_errors=True)
        run = {"multiplier": multiplier, "lr": lr, "dev_accuracy": None, "config_file": config_file}
        if "error" in result:
            run["error"] = result["error"]
        else:
            run["dev_accuracy"] = result["summary"]["final"].get("eval_accuracy")
        runs.append(run)
    with contextlib.suppress(OSError):  # empty now, unless another demo searches in this folder at the same time
        (plan.out / SEARCH / "artifacts").rmdir()
    chosen = choose_lr(runs)
    seen = ", ".join(f"{r['lr']:g} {'failed' if r['dev_accuracy'] is None else format(r['dev_accuracy'], '.1%')}"
                     for r in runs)
    plan.console.print(f"    lr search on {search.dev} dev examples: {seen}"
                       + (f"; chosen {chosen['lr']:g}" if chosen else ""))
    return {"grid": list(plan.lr_grid or []), "runs": runs, "chosen_lr": chosen["lr"] if chosen else None,
            "chosen_multiplier": chosen["multiplier"] if chosen else None, "dev_examples": search.dev,
            "train_examples": search.train, "train_seed": plan.seed, "data": search.pool}


def demo(
    *,
    quick: bool = False,
    out: str | os.PathLike = "demo-report",
    methods: list[str] | str | None = None,
    steps: int | None = None,
    seed: int = 0,
    seeds: int = 1,
    lr_grid: list[float] | str | None = None,
    lora_options: dict[str, Any] | None = None,
    show: bool = True,
    console: Console | None = None,
    command: str | None = None,
    setup: dict[str, Any] | None = None,
    isolate: bool = True,
    resume: bool = False,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """The untrained model's accuracy, then each method trained with ``dt.train`` and scored on the same held-out
    set.

    ``quick``: MiniLM on BBC topics (about a minute) instead of SmolLM2-135M on tweets (about 5 minutes on
    2 CPU cores). ``methods``: names (or "lora,full") from the setup's list, default its ``default`` list (all
    of them when it has none); ``steps`` overrides every method's step count; ``lora_options`` override
    LoRA's config (e.g. ``{"r": 16}``). Each row trains its preset as ``run_config`` says. ``setup``: a setup
    of one's own in the form of ``QUICK_SETUP`` (another model or data, e.g. a tiny stand-in in tests);
    ``isolate=False`` runs every row in this process (peak memory is then this process's high-water mark).

    ``seeds``: every row trains that many times, with training seeds ``seed``, ``seed`` + 1, ... (initialisation,
    batch order, dropout), all on the same split (data seed ``seed``), and the table shows mean ± standard error.
    ``lr_grid`` (e.g. "0.5,1,2", multipliers of each preset's rate): before its reported runs, every row trains
    once per rate on training examples only and keeps the rate with the best accuracy on a dev split carved from
    the training data (``search_data``, ``choose_lr``); the reported runs train with it.

    ``resume``: reuse every run that OUT/runs/ already holds with the same spec (and, for a reported run, its
    artifact), so that a long protocol stopped part-way continues where it stopped; without it every run is made
    afresh. ``device``: where the runs train (``train.device``; the published tables: "cpu").

    Writes ``out``/report.md, the plots, configs/<method>.yaml and artifacts/<method> (``<method>-seed<k>`` for
    each seed when ``seeds`` > 1), rows.json (every seed's values under a row's ``seeds``, the search under its
    ``lr_search``) and lr-search/ (the search's data and configs). Returns the table rows as dicts (the baseline
    row first)."""
    setup = setup or (QUICK_SETUP if quick else DEFAULT_SETUP)
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = list(setup.get("default", setup["methods"])) if methods is None else methods
    _check_options(setup, methods, steps, lora_options, quick, seeds)
    grid = parse_lr_grid(lr_grid)

    from deltatune.core.artifact import report_folder

    out = Path(out)
    plan = Plan(setup, out, seed, [seed + k for k in range(seeds)], steps, lora_options, grid, show,
                console or Console(), isolate, resume, device)
    with report_folder(out, "deltatune demo", resume=resume):
        return _demo(plan, methods, quick, command)


def _demo(plan: Plan, methods: list[str], quick: bool, command: str | None) -> list[dict[str, Any]]:
    """``demo`` in the folder it owns."""
    from deltatune.core.artifact import replace_text

    setup, out, seed, steps, grid, console = plan.setup, plan.out, plan.seed, plan.steps, plan.lr_grid, plan.console
    (out / "artifacts").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    total = len(methods) + 1
    console.print(f"[bold]deltatune demo[/]: {setup['title']}; report in {out}/")

    search = search_data(setup, seed, out) if grid else None  # before any run: a split that fails, fails first
    row, base = _baseline_row(plan, methods[0], total)
    rows = [row]
    for i, name in enumerate(methods, start=2):
        rows.append(_method_row(plan, name, i, total, search))

    seconds = time.perf_counter() - start
    info = {"setup": setup, "base": base, "seconds": seconds, "seed": seed, "quick": quick, "out": out,
            "isolate": plan.isolate, "seeds": plan.train_seeds, "search": search,
            "command": command or _command(quick, out, methods, steps, seed, len(plan.train_seeds), grid)}
    _plots(rows, out, setup, base["majority_accuracy"])
    replace_text(out / "report.md", _markdown(rows, info))
    replace_text(out / "rows.json", json.dumps(rows, indent=2) + "\n")
    if plan.show:
        console.print(_table(rows, setup, base, seconds, len(plan.train_seeds)))
        console.print(f"report: {out / 'report.md'} (plots, example predictions, the commands that use the "
                      "artifacts)")
    return rows


def baseline_config(setup: dict[str, Any], first: str, *, seed: int, train_seed: int,
                    output: str | os.PathLike) -> dict[str, Any]:
    """The zero-shot run's config: the first row's, with the setup's own data and model. The base model as the
    setup names it: no head a preset asks for, and not the quantized base a row (``lora-nf4``) trains on, so the
    first row run does not change the table's baseline; and scored on the label words whatever objective that row
    trains with (a DPO row first in a fresh folder made the baseline a DPO run on classification data)."""
    config = _label_words(run_config(setup, first, seed=seed, output=output, train_seed=train_seed))
    config["data"] = {**setup["data"], "seed": seed}
    config["model"] = setup["model"]
    return config


def _baseline_row(plan: Plan, first: str, total: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model before training on the held-out set: the row, and the first run's figures (held-out size,
    majority class). Once per training seed when the model has a fresh head (drawn from the seed), else once."""
    setup = plan.setup
    baseline = setup.get("baseline", ZERO_SHOT)
    plan.console.print(f"[bold][1/{total}] {baseline}[/]: the model before training, on the held-out set")
    runs, zero = [], []
    for train_seed in plan.train_seeds:
        config = baseline_config(setup, first, seed=plan.seed, train_seed=train_seed,
                                 output=plan.out / "artifacts" / ZERO_SHOT)
        zs = _cached_run(plan, f"{ZERO_SHOT}-seed{train_seed}", {"kind": ZERO_SHOT, "config": config,
                                                                 "label": baseline}, reuse_error=False)
        if "error" in zs:  # it stops the demo, so a later demo makes it again
            raise DeltatuneError(f"the {baseline} evaluation failed: {zs['error']}")
        z = zs["zero_shot"]
        zero.append(z)
        runs.append(_empty_row(baseline, trainable=0, trainable_percent=0.0, peak_memory_bytes=zs["peak_rss_bytes"],
                               accuracy=z["accuracy"], eval_loss=z["eval_loss"], seconds=zs["seconds"],
                               note="the base model, no training", predictions=z["predictions"]))
        if not z["fresh_head"]:  # nothing in it depends on the seed: one run stands for every seed
            break
    row, base = aggregate(runs, plan.train_seeds[:len(runs)]), zero[0]
    plan.console.print(f"    accuracy {row['accuracy']:.1%} on {base['eval_examples']} held-out examples "
                       f"(majority class: {base['majority_accuracy']:.1%})")
    return row, base


def _method_row(plan: Plan, name: str, i: int, total: int, search: SearchData | None) -> dict[str, Any]:
    """Row ``name``: the learning-rate search (with a grid), then one run per training seed, aggregated."""
    config = run_config(plan.setup, name, seed=plan.seed, steps=plan.steps, lora_options=plan.lora_options)
    preset = plan.setup["methods"][name].preset
    plan.console.print(f"[bold][{i}/{total}] {name}[/]: {config['train']['steps']} steps of {plan.setup['batch_size']}, "
                       f"lr {config['train']['lr']:g} (preset {preset})")
    lr, extra = None, {}
    if search is not None:
        extra["lr_search"] = found = _lr_search(plan, name, search)
        lr = found["chosen_lr"]
        if lr is None:  # every rate failed: the method does not apply, or diverges at every rate
            error = found["runs"][0]["error"]
            plan.console.print(f"    [yellow]skipped[/]: {error}")
            return _empty_row(name, lr=config["train"]["lr"], note=f"skipped: {error}", config=config["method"],
                              **extra)
    runs = []
    for train_seed in plan.train_seeds:
        stem = name if len(plan.train_seeds) == 1 else f"{name}-seed{train_seed}"
        run = _train_row(plan, name, stem, train_seed, lr)
        if run["note"].startswith("skipped"):
            return {**run, **extra}
        runs.append(run)
    return {**aggregate(runs, plan.train_seeds), **extra}


def _train_row(plan: Plan, name: str, stem: str, train_seed: int, lr: float | None) -> dict[str, Any]:
    """One run of row ``name`` (training seed ``train_seed``, artifact and config named ``stem``)."""
    setup, out = plan.setup, plan.out
    folder = out / "artifacts" / stem
    config = run_config(setup, name, seed=plan.seed, output=folder, steps=plan.steps, lora_options=plan.lora_options,
                        train_seed=train_seed, lr=lr)
    config_file = _write_config(out, stem, config, setup["methods"][name].preset)
    method, lr = config["method"], config["train"]["lr"]
    result = _cached_run(plan, stem, {"kind": "train", "config": config, "label": stem, "show": plan.show}, folder)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # resume state, not part of the demo
    if "error" in result:
        plan.console.print(f"    [yellow]skipped[/]: {result['error']}")
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
    which = f"seed {train_seed}: " if len(plan.train_seeds) > 1 else ""
    plan.console.print(f"    {which}accuracy {row['accuracy']:.1%} after {s['steps']} steps "
                       f"({result['seconds']:.0f} s in all)")
    return row


def _command(quick: bool, out: Path, methods: list[str], steps: int | None, seed: int, seeds: int = 1,
             grid: list[float] | None = None) -> str:
    parts = ["deltatune", "demo"] + (["--quick"] if quick else []) + ["--out", str(out), "--methods", ",".join(methods)]
    parts += (["--steps", str(steps)] if steps is not None else []) + ["--seed", str(seed)]
    parts += (["--seeds", str(seeds)] if seeds > 1 else []) + (["--lr-grid", ",".join(f"{m:g}" for m in grid)]
                                                               if grid else [])
    return shlex.join(parts)


# -- output ------------------------------------------------------------------------------------
def _cells(row: dict[str, Any]) -> list[str]:
    trainable = "-" if row["trainable"] is None else (
        f"{row['trainable']:,} ({row['trainable_percent']:.2f}%)" if row["trainable"] else "0")
    return [
        row["method"],
        trainable,
        human_bytes(row["peak_memory_bytes"]) if row["peak_memory_bytes"] else "-",
        _with_se(row, "seconds_per_step", ".2f") if row["seconds_per_step"] else "-",
        _with_se(row, "accuracy", ".1%") if row["accuracy"] is not None else "-",
        human_bytes(row["artifact_bytes"]) if row["artifact_bytes"] else "-",
        f"[{Path(row['config_file']).name}]({row['config_file']})" if row["config_file"] else "-",
        row["note"] or (f"{row['steps']} steps, lr {row['lr']:g}" + (" (chosen on the dev split)"
                                                                     if row.get("lr_search") else "")
                        if row["steps"] else ""),
    ]


def _with_se(row: dict[str, Any], key: str, spec: str) -> str:
    """``row[key]``, and ± its standard error when the row has several seeds: '82.0% ± 1.2%'."""
    se = row.get(f"{key}_se")
    return format(row[key], spec) + ("" if se is None else f" ± {format(se, spec)}")


def _count(n: int) -> str:
    """460800 -> '460.8K'."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _percent(p: float) -> str:
    return f"{p:.0f}%" if p >= 99.5 else f"{p:.1f}%" if p >= 1 else f"{p:.2f}%"


def _table(rows: list[dict[str, Any]], setup: dict[str, Any], base: dict[str, Any], seconds: float,
           seeds: int = 1) -> Table:
    table = Table(title=f"deltatune demo: {setup['title']}", caption=(
        f"{base['eval_examples']} held-out examples, majority class {base['majority_accuracy']:.1%}; "
        + (f"mean ± standard error over {seeds} seeds; " if seeds > 1 else "")
        + f"peak memory: each run's process RSS; wall time {seconds:.0f} s"))
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
        f"{setup['batch_size']}, {_seeds_phrase(info)}. Each method is trained with `dt.train` from its preset "
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
    lines += [""]
    lines += _seeds_section(rows, info)
    lines += _search_section(rows, info)
    lines += ["![held-out accuracy against cost: trainable parameters, peak memory, seconds per step](cost.png)",
              "", "![held-out accuracy over the training steps](curves.png)", "",
              "![confusion matrices on the held-out set](confusion.png)", "", "![training loss](loss.png)", ""]
    lines += _examples_section(rows)
    lines += _commands_section(rows, info)
    lines += _configs_section(rows, info["out"])
    return "\n".join(lines)


def _seeds_phrase(info: dict[str, Any]) -> str:
    seeds = info.get("seeds") or [info["seed"]]
    if len(seeds) == 1:
        return f"seed {info['seed']}"
    return (f"data seed {info['seed']} (one split for every run) and training seeds {seeds[0]} to {seeds[-1]}; "
            f"each figure is the mean ± standard error over the {len(seeds)} seeds (the curves, confusion matrices, "
            f"example predictions and commands are seed {seeds[0]}'s)")


def _seeds_section(rows: list[dict[str, Any]], info: dict[str, Any]) -> list[str]:
    """Every seed's held-out accuracy, with the mean ± standard error the table shows (several seeds only)."""
    seeds = info.get("seeds") or [info["seed"]]
    if len(seeds) == 1:
        return []
    lines = ["## Per seed", "",
             f"Held-out accuracy of each run. Every run is scored on the same held-out split (data seed {info['seed']}) "
             "and trains on the same examples; the training seed changes the initialisation (a fresh head, LoRA's "
             "A, ...), the batch order and dropout. Standard error: the sample standard deviation over √n "
             f"(n = {len(seeds)}). Every seed's values are in `rows.json` (`seeds`).", "",
             "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± SE |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    for row in rows:
        if row.get("seeds"):
            cells = [f"{r['accuracy']:.1%}" for r in row["seeds"]]
            lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {_with_se(row, 'accuracy', '.1%')} |")
    alike = [r["method"] for r in rows if not r.get("seeds") and r["accuracy"] is not None]
    if alike:
        lines += ["", f"{', '.join(alike)}: the same for every seed (nothing in it is drawn from the seed): one run."]
    return [*lines, ""]


def _search_section(rows: list[dict[str, Any]], info: dict[str, Any]) -> list[str]:
    """The learning-rate search of every row: each rate's dev accuracy and the rate chosen (with --lr-grid)."""
    searched = [r for r in rows if r.get("lr_search")]
    search = info.get("search")
    if not searched or search is None:
        return []
    grid = searched[0]["lr_search"]["grid"]
    lines = ["## Learning-rate search", "",
             f"Before its reported runs, each row trained once per rate of the grid (its learning rate × "
             f"{', '.join(f'{m:g}' for m in grid)}; training seed {info['seed']}) on {search.train} training examples "
             f"and was scored on a dev split of {search.dev} other training examples (`{search.pool}`, split by the "
             "data layer; no held-out example is in it). The reported runs use the rate with the best dev accuracy "
             "(a tie goes to the rate nearest the preset's). The search runs' configs are in "
             f"`{SEARCH}/configs/`.", "",
             "| method | " + " | ".join(f"lr × {m:g}" for m in grid) + " | chosen lr |",
             "|---|" + "---:|" * (len(grid) + 1)]
    for row in searched:
        found = row["lr_search"]
        cells = [f"{r['lr']:g}: " + ("failed" if r["dev_accuracy"] is None else f"{r['dev_accuracy']:.1%}")
                 for r in found["runs"]]
        chosen = "-" if found["chosen_lr"] is None else f"{found['chosen_lr']:g} (× {found['chosen_multiplier']:g})"
        lines.append(f"| {row['method']} | " + " | ".join(cells) + f" | {chosen} |")
    return [*lines, ""]


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
    config = out / row["config_file"]
    commands = [f"deltatune eval {art} --config {shlex.quote(str(config))}"]
    if config.is_file() and _scored_apart(read_config(config)):  # pairs: score what the table shows, the label words
        commands[0] += " --set data.task=classification"
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
        lines += [f"# {row['method']}: {_artifact_accuracy(row)} held-out accuracy", *next_commands(row, out, example)]
    return [*lines, "```", ""]


def _artifact_accuracy(row: dict[str, Any]) -> str:
    """The held-out accuracy of the artifact the report shows (with several seeds: the first seed's)."""
    if not row.get("seeds"):
        return f"{row['accuracy']:.1%}"
    first = row["seeds"][0]
    return (f"{first['accuracy']:.1%} (seed {first['seed']}; over {len(row['seeds'])} seeds "
            f"{_with_se(row, 'accuracy', '.1%')})")


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
        shown = (counts.trace() / counts.sum()) if counts.sum() else 0.0  # these predictions' (one seed's) accuracy
        ax.set_title(f"{row['method']} ({shown:.0%})", fontsize=9)
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
