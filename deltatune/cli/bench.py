"""``deltatune bench``: deltatune's methods against Hugging Face PEFT's LoRA and plain full fine-tuning.

Every run trains the same workload (model, data, batch, sequence length, seed, optimizer, schedule) in a
fresh subprocess, so its peak memory is its own:

- ``deltatune <method>``: the engine itself, ``dt.train(config)`` (eval only at the end, no progress bar);
- ``peft lora``: ``peft.get_peft_model`` with ``LoraConfig(r=8, lora_alpha=16, target_modules=[q_proj, v_proj])``;
- ``peft prefix`` / ``peft prompt`` (named in ``methods`` as ``peft-prefix`` / ``peft-prompt``): PEFT's prefix tuning
  (30 virtual tokens through its reparametrisation MLP of 800) and prompt tuning (100 virtual tokens), the
  ``prefix`` / ``prompt`` presets' sizes, to compare those with PEFT's own;
- ``plain full``: the bare transformers model with every parameter trainable;
- ``plain forward``: the bare model running the same batches forward only, under ``torch.no_grad`` (inference):
  the floor that a method with "the memory of inference" (VQT, MeZO) is measured against.

The two baselines run a minimal plain-PyTorch loop doing the engine's work per step: zero_grad, collate
the same batch (the engine's seeded batch order), forward with the model's own loss (``labels=``: the same
mean next-token cross-entropy the engine's text task computes), backward, ``loss.item()``, clip the
gradient norm, AdamW step, LR-scheduler step. Every run then evaluates once with the same eval function
and batch size (not timed), and its peak memory is read before anything is saved: the engine writes a
checkpoint at the end, which serialises the whole state in memory, so the bench reads the engine's peak
just before that checkpoint (the engine's own end-of-run figure is kept as ``engine_peak_memory_bytes``).

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
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deltatune.cli._proc import die_with_parent
from deltatune.errors import DeltatuneError

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_METHODS = ("lora", "full")
BASELINES = ("peft-lora", "plain-full", "plain-forward")
PEFT_EXTRA = ("peft-prefix", "peft-prompt")  # PEFT runs named in ``methods``, next to deltatune's prefix / prompt
TASKS = ("text", "classification")
LORA_OPTIONS: dict[str, Any] = {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}
FIELDS = ("seconds_per_step", "tokens_per_s", "peak_memory_bytes", "trainable", "artifact_bytes", "eval_loss")
REFERENCE = "peft lora"
DOCS_PATH = "docs/benchmarks.md"
NOTES_MARKER = "<!-- notes: everything below this line is kept when the bench rewrites this file -->"


@dataclass
class Workload:
    """What every run trains: the same for each method and baseline."""

    model: str = DEFAULT_MODEL
    steps: int = 10
    warmup: int = 1  # first steps left out of the median
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 2e-4
    seed: int = 0
    threads: int = 2
    device: str = "auto"
    max_train: int = 1000  # tweets tokenized for training (packed into seq_len blocks)
    max_eval: int = 100  # tweets for the final eval
    task: str = "text"  # or "classification" (a sequence-classification model with a fresh head)

    def data(self) -> dict[str, Any]:
        common = {"name": "tweets", "max_length": self.seq_len, "max_train": self.max_train,
                  "max_eval": self.max_eval, "seed": self.seed}
        if self.task == "classification":
            return {**common, "task": "classification", "head": True}
        return {**common, "task": "text", "packing": True}

    def run_config(self, method: dict[str, Any], output: str) -> dict[str, Any]:
        """The engine config of this workload (the baselines read their data and schedule from it too)."""
        return {
            "model": self.model,
            "data": self.data(),
            "method": dict(method),
            "train": {"steps": self.steps, "batch_size": self.batch_size, "lr": self.lr, "optimizer": "adamw",
                      "weight_decay": 0.0, "schedule": "linear", "warmup": 0.0, "max_grad_norm": 1.0,
                      "seed": self.seed, "eval_every": 0, "save_every": 0, "eval_batch_size": self.batch_size,
                      "device": self.device, "progress": False},
            "output": output,
        }


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# bench names that stand for a method with options: LoRA as PEFT's baseline is configured, and the
# methods compared with it at the same trainable count (on q,v and on every linear layer of the blocks)
PRESETS: dict[str, dict[str, Any]] = {
    "lora": {"name": "lora", **LORA_OPTIONS},
    "lora-all": {"name": "lora", "r": 8, "alpha": 16, "targets": ALL_LINEAR},
    "spiel": {"name": "spiel", "match": "lora:r=8", "targets": ["q_proj", "v_proj"]},
    "spiel-all": {"name": "spiel", "match": "lora:r=8", "targets": ALL_LINEAR},
    "spiel-sm3": {"name": "spiel", "match": "lora:r=8", "targets": ["q_proj", "v_proj"], "regrow": "sm3"},
    # LISA's paper default γ=2, but a switch every 5 steps so that a 10-step bench sees one: the peak after a
    # switch (released and fresh optimizer state) is the one that must stay bounded
    "lisa": {"name": "lisa", "activated_layers": 2, "interval_steps": 5},
    # the low-rank family on LoRA's matrices at LoRA's (final) trainable count
    "kasa": {"name": "kasa", "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]},
    "dora": {"name": "dora", "r": 8, "alpha": 16, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
    # CorDA's calibration on random tokens: the step time and memory do not depend on what it calibrated on
    "corda": {"name": "corda", "r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"], "data": "random", "samples": 32},
    "adalora": {"name": "adalora", "init_r": 12, "target_r": 8, "alpha": 24, "targets": ["q_proj", "v_proj"],
                "tinit": 2, "tfinal": 2, "delta_t": 2},  # prunes within a 10-step bench
    "increlora": {"name": "increlora", "init_r": 4, "target_rank": 8, "alpha": 16, "targets": ["q_proj", "v_proj"],
                  "init_warmup": 2, "incre_interval": 2},  # grows within a 10-step bench
    # the adapter family with the example configs (about 1.1M trainable each on SmolLM2)
    "adapter": {"name": "adapter", "placement": "houlsby", "r": 16},
    "parallel_adapter": {"name": "parallel_adapter", "r": 32},
    "scaled_parallel_adapter": {"name": "scaled_parallel_adapter", "r": 32, "scale": 4.0},
    # query tokens: run with --task classification (VQT trains a head on pooled features)
    "vqt": {"name": "vqt", "tokens": 1},
    "connected": {"name": "connected", "r": 64, "adapter_r": 64},
    "prefix": {"name": "prefix", "length": 30},
    "prompt": {"name": "prompt", "length": 100},
    "ptuning_v2": {"name": "ptuning_v2", "length": 20, "init": "vocab"},
    "mam": {"name": "mam", "prefix_length": 16, "r": 16},
    # zeroth-order: the step is two forward passes (compare with `plain forward`); "lr" is the run's learning
    # rate for this preset (MeZO's paper grid: 1e-6 on the full model, 1e-4 over LoRA), not a method option
    "mezo": {"name": "mezo", "lr": 1e-6},
    "mezo-lora": {"name": "mezo", "base": "lora", "eps": 1e-2, "base_options": LORA_OPTIONS, "lr": 1e-4},
    "sparse_mezo": {"name": "sparse_mezo", "lr": 1e-6},
}


def method_config(name: str) -> dict[str, Any]:
    """The method config a bench name stands for: a preset, or a registered method with its defaults."""
    return dict(PRESETS.get(name, {"name": name}))


# -------------------------------------------------------------------------- in the subprocess


def _median(values: list[float]) -> float | None:
    values = sorted(values)
    return values[len(values) // 2] if values else None


def _mean(values: list[float] | None) -> float:
    return sum(values) / len(values) if values else 0.0


def _timed(times: list[float], warmup: int) -> list[float]:
    return times[warmup:] if len(times) > warmup else times[-1:]


def _file_bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def _run_engine(w: Workload, method: str, out: Path) -> dict[str, Any]:
    import deltatune as dt
    from deltatune.train import loop

    peak: dict[str, int] = {}
    original = loop.ckpt.save_checkpoint

    def save_checkpoint(*args: Any, **kwargs: Any) -> Any:
        # the training peak (eval included) before the checkpoint serialises the state in memory
        peak.setdefault("before_checkpoint", loop.peak_memory_bytes(loop.pick_device(w.device)))
        return original(*args, **kwargs)

    loop.ckpt.save_checkpoint = save_checkpoint
    try:
        method_cfg = method_config(method)
        config = w.run_config({k: v for k, v in method_cfg.items() if k != "lr"}, str(out))
        if "lr" in method_cfg:
            config["train"]["lr"] = method_cfg["lr"]
        summary = dt.train(config)
    finally:
        loop.ckpt.save_checkpoint = original
    times = [r["seconds"] for r in summary["history"]]
    return {
        "times": times,
        "tokens": [r["tokens"] for r in summary["history"]],
        "trainable": summary["trainable"],
        "artifact_bytes": _file_bytes(out, "*.safetensors"),
        "stored_bytes": summary["stored_bytes"],
        "eval_loss": summary["final"].get("eval_loss"),
        "train_loss": summary["history"][-1]["loss"],
        "peak_memory_bytes": peak.get("before_checkpoint", summary["peak_memory_bytes"]),
        "engine_peak_memory_bytes": summary["peak_memory_bytes"],
        "engine_seconds_per_step": summary["seconds_per_step"],
    }


def _run_baseline(w: Workload, kind: str, out: Path) -> dict[str, Any]:
    import random

    import torch

    from deltatune.data import models, tasks
    from deltatune.train import loop
    from deltatune.train.config import load_config

    cfg = load_config(w.run_config({"name": "lora", **LORA_OPTIONS}, str(out)))
    s = cfg.train
    torch.manual_seed(s.seed)
    random.seed(s.seed)
    device = loop.pick_device(s.device)
    model = models.load(cfg.model, **tasks.model_request(cfg.data, cfg.model))
    tokenizer = models.load_tokenizer(cfg.model)
    task = tasks.build_task(cfg.data, tokenizer, model)
    torch.manual_seed(s.seed)
    if kind == "plain-forward":
        return _run_forward(model, task, s, device)
    if kind.startswith("peft-"):
        from peft import get_peft_model

        model = get_peft_model(model, _peft_config(kind, "SEQ_CLS" if w.task == "classification" else "CAUSAL_LM"))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, loop.lr_lambda(s))
    batches = loop.Batches(len(task.train), s.batch_size, s.seed)
    times, tokens, loss_value = [], [], float("nan")
    for _ in range(s.steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        batch = {k: v.to(device) for k, v in task.collate([task.train[i] for i in batches.next()]).items()}
        labels = batch.pop("labels")
        tokens.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else labels.numel())
        with loop._autocast(s, device):  # the transformers model's own causal-LM loss, as PEFT users train
            loss = model(**batch, labels=labels, use_cache=False).loss
        loss.backward()
        loss_value = loss.item()
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], s.max_grad_norm)
        optimizer.step()
        scheduler.step()
        times.append(time.perf_counter() - t0)
    # PEFT's prompt tuning returns logits for its virtual tokens too, ahead of the input's: the eval reads the input's
    virtual = model.peft_config["default"].num_virtual_tokens if kind == "peft-prompt" else 0
    final = task.evaluate(_input_logits(model, virtual) if virtual else model, s.eval_batch_size)
    peak = loop.peak_memory_bytes(device)
    model.save_pretrained(out)
    pattern = "adapter_model.safetensors" if kind.startswith("peft-") else "*.safetensors"
    return {
        "times": times,
        "tokens": tokens,
        "trainable": sum(p.numel() for p in params),
        "artifact_bytes": _file_bytes(out, pattern),
        "eval_loss": final["loss"],
        "train_loss": loss_value,
        "peak_memory_bytes": peak,
    }


def _input_logits(model: Any, virtual: int) -> Any:
    """``model`` whose output logits drop the first ``virtual`` positions (PEFT prompt tuning's soft tokens)."""
    import torch

    class InputLogits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, **inputs: Any) -> Any:
            out = self.model(**inputs)
            out.logits = out.logits[:, virtual:]
            return out

    return InputLogits()


def _peft_config(kind: str, task_type: str) -> Any:
    """PEFT's config for a PEFT run: LoRA as ``LORA_OPTIONS``; prefix and prompt tuning at the sizes of the
    ``prefix`` and ``prompt`` presets."""
    import peft

    if kind == "peft-lora":
        return peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, bias="none",
                               task_type=task_type)
    if kind == "peft-prefix":
        return peft.PrefixTuningConfig(num_virtual_tokens=30, prefix_projection=True, encoder_hidden_size=800,
                                       task_type=task_type)
    if kind == "peft-prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=100, task_type=task_type)
    raise DeltatuneError(f"no PEFT run is called {kind!r}")


def _run_forward(model: Any, task: Any, s: Any, device: Any) -> dict[str, Any]:
    """The same batches through the frozen model, forward only (no autograd graph): inference's memory."""
    import torch

    from deltatune.train import loop

    model.to(device)
    model.eval()
    batches = loop.Batches(len(task.train), s.batch_size, s.seed)
    times, tokens, loss_value = [], [], float("nan")
    with torch.no_grad():
        for _ in range(s.steps):
            t0 = time.perf_counter()
            batch = {k: v.to(device) for k, v in task.collate([task.train[i] for i in batches.next()]).items()}
            labels = batch.pop("labels")
            tokens.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else labels.numel())
            with loop._autocast(s, device):
                loss_value = model(**batch, labels=labels, use_cache=False).loss.item()
            times.append(time.perf_counter() - t0)
        final = task.evaluate(model, s.eval_batch_size)
    return {"times": times, "tokens": tokens, "trainable": 0, "artifact_bytes": 0, "eval_loss": final["loss"],
            "train_loss": loss_value, "peak_memory_bytes": loop.peak_memory_bytes(device)}


def _worker(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    w = Workload(**spec["workload"])
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(w.threads)
    with tempfile.TemporaryDirectory(prefix="deltatune-bench-") as tmp:
        out = Path(tmp) / "out"
        if spec["framework"] == "deltatune":
            raw = _run_engine(w, spec["method"], out)
        else:
            raw = _run_baseline(w, spec["method"], out)
    raw["torch_threads"] = torch.get_num_threads()
    raw["device"] = "cuda" if (w.device == "auto" and torch.cuda.is_available()) else (
        "cpu" if w.device == "auto" else w.device)
    Path(result_path).write_text(json.dumps(raw))


# -------------------------------------------------------------------------- in the parent


@dataclass
class _Run:
    name: str  # "deltatune lora", "peft lora", "plain full"
    framework: str  # deltatune | peft | plain
    method: str  # deltatune's method name, or peft-lora / plain-full


def _runs(methods: list[str], baselines: bool) -> list[_Run]:
    runs = [_Run(m.replace("-", " "), "peft", m) if m in PEFT_EXTRA else _Run(f"deltatune {m}", "deltatune", m)
            for m in methods]
    if baselines:
        runs += [_Run("peft lora", "peft", "peft-lora"), _Run("plain full", "plain", "plain-full"),
                 _Run("plain forward", "plain", "plain-forward")]
    return runs


def _record(run: _Run, w: Workload, raw: dict[str, Any] | None, error: str | None, wall: float) -> dict[str, Any]:
    rec: dict[str, Any] = {"name": run.name, "framework": run.framework, "method": run.method, "model": w.model,
                           "steps": w.steps, "batch_size": w.batch_size, "seq_len": w.seq_len, "wall_s": wall}
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
    for key in ("stored_bytes", "engine_peak_memory_bytes", "engine_seconds_per_step"):
        if key in raw:
            rec[key] = raw[key]
    if timed and sps:  # what occasional slow steps (a policy's selection phase) add over the run, amortised
        rec["amortised_overhead"] = sum(timed) / (len(timed) * sps) - 1
    return rec


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
            proc = subprocess.run([sys.executable, "-m", "deltatune.cli.bench", "--worker", str(spec), str(result)],
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

    ``json_path`` writes the records as JSON; ``write_docs`` writes ``docs_path`` (markdown table, machine,
    the command), keeping any notes below the notes marker of an existing file."""
    from deltatune.core import registry

    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = list(methods) if methods is not None else list(DEFAULT_METHODS)
    known = list(registry.names()) + [p for p in PRESETS if p not in registry.names()] + list(PEFT_EXTRA)
    bad = [m for m in methods if m not in known]
    if bad:
        raise DeltatuneError(f"unknown method(s) {', '.join(bad)}; known are: {', '.join(known)}")
    if steps <= warmup:
        raise DeltatuneError(f"--steps {steps} must be more than the {warmup} warm-up step(s) left out of the median")
    if task not in TASKS:
        raise DeltatuneError(f"task={task!r} is not a bench workload; use one of {', '.join(TASKS)}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("threads", threads)):
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
    records = []
    for i, run in enumerate(runs, 1):
        t0 = time.perf_counter()
        with console.status(f"[{i}/{len(runs)}] {run.name}: training {steps} steps in a subprocess ..."):
            raw, error = _run_one(run, w, timeout)
        wall = time.perf_counter() - t0
        rec = _record(run, w, raw, error, wall)
        records.append(rec)
        if error:
            console.print(f"[{i}/{len(runs)}] {run.name}: failed ({error})", style="red", highlight=False)
        else:
            console.print(f"[{i}/{len(runs)}] {run.name}: {rec['seconds_per_step']:.3f} s/step, "
                          f"{_gib(rec['peak_memory_bytes'])} peak, eval loss {rec['eval_loss']:.4f} "
                          f"({wall:.0f} s)", highlight=False)
    _add_ratios(records)
    cmd = command or _default_command(model, methods, steps, json_path, task)
    if json_path is not None:
        payload = {"workload": asdict(w), "machine": machine(threads), "command": cmd, "records": records}
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(payload, indent=2) + "\n")
    if write_docs:
        write_markdown(records, w, docs_path, cmd)
    return records


def _default_command(model: str, methods: list[str], steps: int, json_path: Any, task: str = "text") -> str:
    parts = ["deltatune bench"]
    if model != DEFAULT_MODEL:
        parts.append(f"--model {model}")
    if task != "text":
        parts.append(f"--task {task}")
    parts += [f"--methods {','.join(methods)}", f"--steps {steps}"]
    if json_path is not None:
        parts.append(f"--json {json_path}")
    return " ".join(parts)


# -------------------------------------------------------------------------- reporting


def _gib(n: int | None) -> str:
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
    return "" if x is None else f" ({x:.2f}×)"


def rows(records: list[dict[str, Any]]) -> list[list[str]]:
    """Table cells per record: each figure with its ratio to PEFT's LoRA."""
    out = []
    for r in records:
        if r.get("error"):
            out.append([r["name"], "failed: " + str(r["error"])[:80], "", "", "", "", ""])
            continue
        out.append([
            r["name"],
            f"{r['seconds_per_step']:.3f}{_ratio(r, 'seconds_per_step')}",
            f"{r['tokens_per_s']:.0f}{_ratio(r, 'tokens_per_s')}",
            f"{_gib(r['peak_memory_bytes'])}{_ratio(r, 'peak_memory_bytes')}",
            f"{r['trainable']:,}{_ratio(r, 'trainable')}",
            f"{_bytes(r['artifact_bytes'])}{_ratio(r, 'artifact_bytes')}",
            f"{r['eval_loss']:.4f}{_ratio(r, 'eval_loss')}",
        ])
    return out


HEADERS = ["run", "s / step", "tokens / s", "peak memory", "trainable", "artifact", "eval loss"]


def table(records: list[dict[str, Any]], title: str = "deltatune bench (ratio to PEFT LoRA)") -> Any:
    from rich.table import Table

    t = Table(title=title)
    for i, h in enumerate(HEADERS):
        t.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows(records):
        t.add_row(*row)
    return t


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


def markdown(records: list[dict[str, Any]], w: Workload, command: str) -> str:
    m = machine(w.threads)
    lines = [
        "# Benchmarks: deltatune vs. Hugging Face PEFT and plain full fine-tuning",
        "",
        "Generated by `deltatune bench` (`deltatune/cli/bench.py`); re-run the command below to refresh the table.",
        "",
        f"Command: `{command}`",
        "",
        f"Workload: `{w.model}`, batch {w.batch_size} × {w.seq_len} tokens (the `tweets` texts packed into "
        f"{w.seq_len}-token blocks, the same tokens in the same order for every run), AdamW lr {w.lr:g} with "
        f"linear decay, gradient clipping at 1.0, seed {w.seed}, {w.steps} steps (median over the steps after "
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


def equal_count_lines(records: list[dict[str, Any]]) -> list[str]:
    """A second table: each method against the deltatune LoRA run with exactly its trainable count."""
    paired = [r for r in records if r.get("ratios_to_same_count_lora")]
    if not paired:
        return []
    out = ["", "At equal trainable parameters (ratio to the deltatune LoRA run with the same count; presets in "
           "`deltatune/cli/bench.py::PRESETS`):", "",
           "| run | compared with | trainable | s / step | peak memory | eval loss | amortised slow-step overhead |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for r in paired:
        q = r["ratios_to_same_count_lora"]
        over = r.get("amortised_overhead")
        out.append(f"| {r['name']} | {r['same_count_lora']} | {r['trainable']:,} | {q['seconds_per_step']:.2f}× | "
                   f"{q['peak_memory_bytes']:.2f}× | {q['eval_loss']:.2f}× | "
                   + ("-" if over is None else f"{100 * over:.1f} %") + " |")
    return out


def forward_lines(records: list[dict[str, Any]]) -> list[str]:
    """A third table: each run against a forward-only pass of the same batches (inference's floor)."""
    paired = [r for r in records if r.get("ratios_to_forward")]
    if not paired:
        return []
    out = ["", "Against a forward-only pass of the same batches (`plain forward`: the frozen model under "
           "`torch.no_grad`): s / step as a ratio to one forward pass, peak memory as a ratio to its peak:", "",
           "| run | s / step vs forward | peak memory vs forward |", "|---|---:|---:|"]
    for r in paired:
        q = r["ratios_to_forward"]
        out.append(f"| {r['name']} | {q['seconds_per_step']:.2f}× | {q['peak_memory_bytes']:.2f}× |")
    return out


def write_markdown(records: list[dict[str, Any]], w: Workload, path: str | os.PathLike, command: str) -> Path:
    path = Path(path)
    notes = ""
    if path.is_file():
        old = path.read_text()
        if NOTES_MARKER in old:
            notes = old.split(NOTES_MARKER, 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown(records, w, command) + "\n" + NOTES_MARKER + (notes or "\n"))
    return path


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m deltatune.cli.bench --worker SPEC.json RESULT.json (use `deltatune bench`)")
