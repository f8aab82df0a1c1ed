"""``deltatune bench``: deltatune's methods against Hugging Face PEFT's LoRA and plain full fine-tuning.

Every run trains the same workload (model, data, batch, sequence length, seed, optimizer, schedule) in a
fresh subprocess, so its peak memory is its own:

- ``deltatune <method>``: the engine itself, ``dt.train(config)`` (eval only at the end, no progress bar), with
  the method's preset (``deltatune/presets/``; ``bench_workload.py`` says what a short run changes in it);
- ``peft lora``: ``peft.get_peft_model`` with ``LoraConfig(r=8, lora_alpha=16, target_modules=[q_proj, v_proj])``,
  the ``lora`` preset's sizes;
- ``peft prefix`` / ``peft prompt`` (named in ``methods`` as ``peft-prefix`` / ``peft-prompt``): PEFT's prefix tuning
  (30 virtual tokens through its reparametrisation MLP of 800) and prompt tuning (100 virtual tokens), the
  ``prefix`` / ``prompt`` presets' sizes, to compare those with PEFT's own;
- ``peft <method>`` (named ``peft-<method>``) for every method with a PEFT type of its own (``peft-ia3``,
  ``peft-vera``, ``peft-loha``, ``peft-lokr``, ``peft-trainable_tokens``): PEFT's implementation with the config
  ``deltatune export`` writes for the method's preset, so both train the same modules at the same sizes;
  each ``deltatune <method>`` run is then also compared with it;
- ``deltatune lora-nf4`` / ``lora-int8``: the lora preset over a base quantized with bitsandbytes (the run config's
  ``model: {name, quantize}``), and ``peft lora-nf4`` / ``peft lora-int8``: PEFT's LoRA over the same base (QLoRA as
  PEFT users run it); each is also compared with its framework's run over the full-precision base;
- ``plain full``: the bare transformers model with every parameter trainable;
- ``plain forward``: the bare model running the same batches forward only, under ``torch.no_grad`` (inference):
  the floor that a method with "the memory of inference" (VQT, MeZO) is measured against.

The baselines do the engine's work per step in a minimal plain-PyTorch loop, and every run's peak memory is
read before anything is saved (``bench_workload.py`` has the details).

The data are the shipped ``tweets`` as causal-LM text packed into full blocks of ``seq_len`` tokens (EOS
between tweets, no padding), so every run sees exactly the same tokens in the same order. With
``task="classification"`` they are the tweets' sentiment labels read by a sequence-classification model
(a fresh head, ``data.head: true``; tweets cut to ``seq_len`` tokens): the workload of methods that train a
head on pooled features (VQT).

Figures: seconds per step (median over the steps after ``warmup`` warm-up steps), tokens per second
(batch × seq_len / that median), peak memory (ru_maxrss on CPU, ``torch.cuda.max_memory_allocated`` on
CUDA), trainable parameters, artifact bytes (the saved tensor file: ``delta.safetensors``,
``adapter_model.safetensors``, the full model's ``model.safetensors``) and the final eval loss, each also
as a ratio to PEFT's LoRA.

The runs themselves (in each run's subprocess) are in ``bench_workload.py``, the table and
``docs/benchmarks.md`` in ``bench_report.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from deltatune.cli._proc import die_with_parent
from deltatune.cli.bench_report import equal_count_lines, gib, machine, table, write_markdown
from deltatune.cli.bench_workload import (
    ALL_LINEAR,
    DEFAULT_MODEL,
    PEFT_SAME,
    TASKS,
    Workload,
    bench_names,
    is_peft_run,
    method_config,
    quantization,
)
from deltatune.errors import DeltatuneError
from deltatune.ops.search_refit import mean_se  # the rule `deltatune demo` reports its seeds with

# the bench's names other modules and tests reach through this one
__all__ = ["ALL_LINEAR", "DEFAULT_MODEL", "FIELDS", "Workload", "bench", "equal_count_lines", "method_config", "table",
           "write_markdown"]

DEFAULT_METHODS = ("lora", "full")
FIELDS = ("seconds_per_step", "tokens_per_s", "peak_memory_bytes", "trainable", "artifact_bytes", "eval_loss")
REFERENCE = "peft lora"
DOCS_PATH = "docs/benchmarks.md"


def _median(values: list[float]) -> float | None:
    values = sorted(values)
    return values[len(values) // 2] if values else None


def _mean(values: list[float] | None) -> float:
    return sum(values) / len(values) if values else 0.0


def _timed(times: list[float], warmup: int) -> list[float]:
    return times[warmup:] if len(times) > warmup else times[-1:]



@dataclass
class _Run:
    name: str  # "deltatune lora", "peft lora", "plain full"
    framework: str  # deltatune | peft | plain
    method: str  # deltatune's method name, or peft-lora / plain-full


def _runs(methods: list[str], baselines: bool) -> list[_Run]:
    runs = [_Run(m.replace("-", " ", 1), "peft", m) if is_peft_run(m) else _Run(f"deltatune {m}", "deltatune", m)
            for m in methods]
    if baselines:
        named = {run.name for run in runs}
        runs += [b for b in (_Run("peft lora", "peft", "peft-lora"), _Run("plain full", "plain", "plain-full"),
                             _Run("plain forward", "plain", "plain-forward")) if b.name not in named]
    return runs


def _record(run: _Run, w: Workload, raw: dict[str, Any] | None, error: str | None, wall: float) -> dict[str, Any]:
    rec: dict[str, Any] = {"name": run.name, "framework": run.framework, "method": run.method, "model": w.model,
                           "steps": w.steps, "batch_size": w.batch_size, "seq_len": w.seq_len, "seed": w.seed,
                           "wall_s": wall}
    if raw is None:
        rec.update({f: None for f in FIELDS})
        rec["error"] = error
        return rec
    timed = _timed(raw["times"], w.warmup)
    sps = _median(timed)
    rec.update({
        "seconds_per_step": sps,
        # real (non-padding) tokens per step: the packed text workload has batch × seq_len of them
        "tokens_per_s": _mean(raw.get("tokens")) / sps if sps and raw.get("tokens") else None,
        "peak_memory_bytes": raw["peak_memory_bytes"],
        "trainable": raw["trainable"],
        "artifact_bytes": raw["artifact_bytes"],
        "eval_loss": raw["eval_loss"],
        "train_loss": raw["train_loss"],
        "first_step_s": raw["times"][0] if raw["times"] else None,
        "step_times": raw["times"],
        "device": raw["device"],
        "torch_threads": raw["torch_threads"],
    })
    for key in ("stored_bytes", "engine_peak_memory_bytes", "engine_seconds_per_step", "train_peak_memory_bytes"):
        if key in raw:
            rec[key] = raw[key]
    if timed and sps:  # what occasional slow steps (a policy's selection phase) add over the run, amortised
        rec["amortised_overhead"] = sum(timed) / (len(timed) * sps) - 1
    return rec


# the figures that vary from seed to seed, reported as mean ± standard error when a bench runs several seeds
SPREAD = ("seconds_per_step", "tokens_per_s", "peak_memory_bytes", "eval_loss")


def _combine(recs: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's records over its seeds as one record: every number the mean over the seeds (SPREAD's figures with
    their standard error, ``<field>_se``), each seed's own record under ``per_seed``. A failed seed fails the run."""
    if len(recs) == 1:
        return recs[0]
    failed = next((r for r in recs if r.get("error")), None)
    if failed is not None:
        return {**failed, "error": f"seed {failed['seed']}: {failed['error']}"}
    out = dict(recs[0])
    for key, value in recs[0].items():
        values = [r.get(key) for r in recs]
        if isinstance(value, bool) or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            continue
        mean, se = mean_se(values)
        out[key] = round(mean) if all(isinstance(v, int) for v in values) else mean
        if key in SPREAD:
            out[f"{key}_se"] = se
    out["seed"] = [r["seed"] for r in recs]
    out["per_seed"] = recs
    return out


def _paired_ratios(records: list[dict[str, Any]]) -> None:
    """With several seeds, each run's ratio to PEFT's LoRA is the mean of the per-seed ratios (the two runs of a
    seed train the same data, one right after the other), with its standard error under ``ratios_se``: the spread
    that tells a 5 % difference from the machine's drift."""
    ref = next((r for r in records if r["name"] == REFERENCE and r.get("error") is None), None)
    if ref is None or "per_seed" not in ref:
        return
    for r in records:
        if r.get("error") is not None or "per_seed" not in r:
            continue
        r["ratios_se"] = {}
        for f in FIELDS:
            pairs = [(a.get(f), b.get(f)) for a, b in zip(r["per_seed"], ref["per_seed"], strict=True)]
            if all(a is not None and b for a, b in pairs):
                r["ratios"][f], r["ratios_se"][f] = mean_se([a / b for a, b in pairs])


def _ratios_to(r: dict[str, Any], ref: dict[str, Any] | None) -> dict[str, float | None]:
    out = {}
    for f in FIELDS:
        a, b = r.get(f), ref.get(f) if ref else None
        out[f] = a / b if a is not None and b else None
    return out


def _add_ratios(records: list[dict[str, Any]]) -> None:
    """Ratios to PEFT's LoRA for every run; and, for a non-LoRA deltatune run, to the deltatune LoRA run
    with the same trainable count (the comparison at equal parameters), with that run's name."""
    ok = [r for r in records if r.get("error") is None]
    ref = next((r for r in ok if r["name"] == REFERENCE), None)
    forward = next((r for r in ok if r["method"] == "plain-forward"), None)
    loras = [r for r in ok if r["framework"] == "deltatune" and method_config(r["method"])["name"] == "lora"]
    for r in records:
        r["ratios"] = _ratios_to(r, ref)
        same = next((lo for lo in loras if lo is not r and lo["trainable"] == r.get("trainable")), None)
        if same is not None and r["framework"] == "deltatune" and method_config(r["method"])["name"] != "lora":
            r["same_count_lora"] = same["name"]
            r["ratios_to_same_count_lora"] = _ratios_to(r, same)
        if quantization(r["method"]) and r.get("error") is None:  # the same framework's run over the plain base
            plain = next((p for p in ok if p["framework"] == r["framework"]
                          and p["method"] == ("peft-lora" if r["framework"] == "peft" else "lora")), None)
            if plain is not None:
                r["full_precision"] = plain["name"]
                r["ratios_to_full_precision"] = _ratios_to(r, plain)
                a, b = r.get("train_peak_memory_bytes"), plain.get("train_peak_memory_bytes")
                r["ratios_to_full_precision"]["train_peak_memory_bytes"] = a / b if a and b else None
        twin = next((p for p in ok if r["framework"] == "deltatune" and p["method"] == PEFT_SAME + r["method"]), None)
        if twin is not None and r.get("error") is None:  # PEFT's implementation of the same method, same run
            r["peft_same"] = twin["name"]
            r["ratios_to_peft_same"] = _ratios_to(r, twin)
        if forward is not None and r is not forward and r.get("error") is None:
            r["ratios_to_forward"] = _ratios_to(r, forward)


def _run_one(run: _Run, w: Workload, timeout: float | None) -> tuple[dict[str, Any] | None, str | None]:
    with tempfile.TemporaryDirectory(prefix="deltatune-bench-") as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({"workload": asdict(w), "framework": run.framework, "method": run.method}))
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(w.threads)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        try:
            proc = subprocess.run([sys.executable, "-m", "deltatune.cli.bench_workload", "--worker", str(spec), str(result)],
                                  env=env, capture_output=True, text=True, timeout=timeout,
                                  preexec_fn=die_with_parent)
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout} s"
        if proc.returncode != 0 or not result.is_file():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            return None, f"exit code {proc.returncode}: " + " | ".join(tail)
        return json.loads(result.read_text()), None


def bench(
    model: str = DEFAULT_MODEL,
    methods: list[str] | str | None = None,
    steps: int = 10,
    *,
    json_path: str | os.PathLike | None = None,
    write_docs: bool = False,
    docs_path: str | os.PathLike = DOCS_PATH,
    batch_size: int = 4,
    seq_len: int = 128,
    lr: float = 2e-4,
    seed: int = 0,
    seeds: int = 1,
    threads: int = 2,
    warmup: int = 1,
    device: str = "auto",
    max_train: int = 1000,
    max_eval: int = 100,
    task: str = "text",
    baselines: bool = True,
    timeout: float | None = None,
    console: Any = None,
    command: str | None = None,
) -> list[dict[str, Any]]:
    """Train the same workload with each deltatune method, PEFT's LoRA and plain full fine-tuning, each in a
    fresh subprocess; return one record per run (figures and their ratios to PEFT's LoRA).

    ``seeds`` > 1 runs every workload once per seed (``seed``, ``seed`` + 1, ...; seed by seed, so a drift of the
    machine's load falls on every run alike) and reports each figure as the mean ± standard error over the seeds,
    each ratio to PEFT's LoRA paired by seed. ``json_path`` writes the records as JSON; ``write_docs`` writes
    ``docs_path`` (markdown table, machine, the command), keeping any notes below the notes marker of an existing
    file."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = list(methods) if methods is not None else list(DEFAULT_METHODS)
    known = bench_names()
    bad = [m for m in methods if m not in known]
    if bad:
        raise DeltatuneError(f"unknown method(s) {', '.join(bad)}; known are: {', '.join(known)}")
    if steps <= warmup:
        raise DeltatuneError(f"--steps {steps} must be more than the {warmup} warm-up step(s) left out of the median")
    if task not in TASKS:
        raise DeltatuneError(f"task={task!r} is not a bench workload; use one of {', '.join(TASKS)}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("threads", threads), ("seeds", seeds)):
        if value < 1:
            raise DeltatuneError(f"{name}={value} must be at least 1")
    from deltatune.data import models

    models.resolve(model)  # fail fast on a bad model name (and build the SmolLM2 cache once, not per run)
    w = Workload(model=model, steps=steps, warmup=warmup, batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed,
                 threads=threads, device=device, max_train=max_train, max_eval=max_eval, task=task)
    if console is None:
        from rich.console import Console

        console = Console(stderr=True)
    runs = _runs(methods, baselines)
    per_run: dict[str, list[dict[str, Any]]] = {run.name: [] for run in runs}
    total = len(runs) * seeds
    for k in range(seeds):
        wk = replace(w, seed=seed + k)
        for j, run in enumerate(runs, 1):
            label = f"[{k * len(runs) + j}/{total}] {run.name}" + (f", seed {wk.seed}" if seeds > 1 else "")
            t0 = time.perf_counter()
            with console.status(f"{label}: training {steps} steps in a subprocess ..."):
                raw, error = _run_one(run, wk, timeout)
            wall = time.perf_counter() - t0
            rec = _record(run, wk, raw, error, wall)
            per_run[run.name].append(rec)
            if error:
                console.print(f"{label}: failed ({error})", style="red", highlight=False)
            else:
                console.print(f"{label}: {rec['seconds_per_step']:.3f} s/step, "
                              f"{gib(rec['peak_memory_bytes'])} peak, eval loss {rec['eval_loss']:.4f} "
                              f"({wall:.0f} s)", highlight=False)
    records = [_combine(per_run[run.name]) for run in runs]
    _add_ratios(records)
    _paired_ratios(records)
    cmd = command or _default_command(model, methods, steps, json_path, task, seeds)
    if json_path is not None:
        payload = {"workload": asdict(w), "seeds": seeds, "machine": machine(threads), "command": cmd,
                   "records": records}
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(payload, indent=2) + "\n")
    if write_docs:
        write_markdown(records, w, docs_path, cmd, seeds)
    return records


def _default_command(model: str, methods: list[str], steps: int, json_path: Any, task: str = "text",
                     seeds: int = 1) -> str:
    parts = ["deltatune bench"]
    if model != DEFAULT_MODEL:
        parts.append(f"--model {model}")
    if task != "text":
        parts.append(f"--task {task}")
    parts += [f"--methods {','.join(methods)}", f"--steps {steps}"]
    if seeds > 1:
        parts.append(f"--seeds {seeds}")
    if json_path is not None:
        parts.append(f"--json {json_path}")
    return " ".join(parts)

