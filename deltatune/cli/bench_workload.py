"""What ``deltatune bench`` runs, in each run's own subprocess: the workload, the method a bench name stands
for, and the three kinds of run (the engine, a PEFT or plain-PyTorch baseline, a forward-only pass).

Method configs come from the presets (``deltatune/presets/``), as ``deltatune train <name>`` and the demo use
them; the bench trains them on its own workload (model, data, batch, sequence length, steps, learning rate),
the same for every run, and changes a preset's method only where ``SHORT_RUN`` says why.

The baselines run a minimal plain-PyTorch loop doing the engine's work per step: zero_grad, collate the same
batch (the engine's seeded batch order), forward with the model's own loss (``labels=``: the same mean
next-token cross-entropy the engine's text task computes), backward, ``loss.item()``, clip the gradient norm,
AdamW step, LR-scheduler step. Every run then evaluates once with the same eval function and batch size (not
timed), and its peak memory is read before anything is saved: the engine writes a checkpoint at the end,
which serialises the whole state in memory, so the bench reads the engine's peak after its last step, before
that checkpoint (the engine's own end-of-run figure is kept as ``engine_peak_memory_bytes``).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltatune.errors import DeltatuneError
from deltatune.train.callbacks import PeakMemory

DEFAULT_MODEL = "smollm2-135m"
PEFT_EXTRA = ("peft-prefix", "peft-prompt")  # PEFT runs named in ``methods``, next to deltatune's prefix / prompt
PEFT_SAME = "peft-"  # ``peft-<method>``: PEFT's own implementation of a method that has a PEFT type (ia3, vera, ...)
TASKS = ("text", "classification")


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
# bench names that are a preset with other method options: the comparisons with LoRA at its trainable count on
# every linear layer of the blocks, SpIEL with SM3's regrowth statistics, full / LISA with W0 kept in memory
# (the presets keep it on disk), to measure what the disk saves, and LoRA with PiSSA's init by PEFT's fast SVD
# (PEFT rewrites W0, so its PiSSA trains at plain LoRA's cost: ``peft lora``; deltatune keeps W0 and carries the
# principal part as frozen factors, which this run prices)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora-pissa": ("lora", {"init": "pissa_niter_4"}),
    "lora-all": ("lora", {"targets": ALL_LINEAR}),
    "spiel-all": ("spiel", {"targets": ALL_LINEAR}),
    "spiel-sm3": ("spiel", {"regrow": "sm3"}),
    "full-memory": ("full", {"keep_w0": "memory"}),
    "lisa-memory": ("lisa", {"keep_w0": "memory"}),
    # over a quantized base (bitsandbytes, docs/quantization.md): QLoRA's setting, the lora preset unchanged
    "lora-nf4": ("lora", {}),
    "lora-int8": ("lora", {}),
}
# the variants whose base model is quantized (the run config's ``model: {name, quantize}``); each has a PEFT twin
# (``peft-lora-nf4``: PEFT's LoRA on the same quantized base, as PEFT users run QLoRA with bitsandbytes)
QUANTIZED = {"lora-nf4": "nf4", "lora-int8": "int8"}
# what the bench changes in a preset's method, so that a run of about 10 steps shows the policy at work
SHORT_RUN: dict[str, dict[str, Any]] = {
    # a switch every 5 steps (the preset: 20): the peak after a switch (released and fresh optimizer state) is
    # the one that must stay bounded
    "lisa": {"interval_steps": 5},
    # the rank budget shrinks from step 2 on, masks every 2 steps (the preset: shares of a 60-step run)
    "adalora": {"tinit": 2, "tfinal": 2, "delta_t": 2},
    # ranks grow every 2 steps from step 2 on
    "increlora": {"init_warmup": 2, "incre_interval": 2},
    # calibration on 32 random-token sequences: step time and memory do not depend on what CorDA calibrated on
    "corda": {"data": "random", "samples": 32},
}
# zeroth-order presets keep their learning rate (MeZO's paper grid); every other run trains at the workload's
OWN_LR = ("mezo", "mezo-lora", "sparse_mezo")


def _preset(name: str) -> dict[str, Any] | None:
    from deltatune.train.config import preset_path, read_config

    return read_config(name) if preset_path(name) is not None else None


def bench_names() -> list[str]:
    """Every name ``methods`` accepts: registered methods, presets, the variants and PEFT's extra runs."""
    from deltatune.core import registry
    from deltatune.train.config import preset_names

    names = list(registry.names())
    names += [n for n in [*preset_names(), *VARIANTS] if n not in names]
    return names + list(PEFT_EXTRA) + [PEFT_SAME + m for m in ["lora", *peft_typed_methods(), *QUANTIZED]]


def peft_typed_methods() -> list[str]:
    """Registered methods with a PEFT type of their own (IA3, VERA, LOHA, ...): each has a ``peft-<name>`` run."""
    from deltatune.core import registry

    return [m for m in registry.names() if registry.get(m).peft is not None]


def is_peft_run(name: str) -> bool:
    """Whether a bench name is a PEFT run (``peft-lora``: the reference, named to run it without the other
    baselines; ``peft-prefix``, ``peft-prompt`` or ``peft-<method>``)."""
    rest = name[len(PEFT_SAME):] if name.startswith(PEFT_SAME) else None
    return (name in PEFT_EXTRA or rest == "lora" or rest in QUANTIZED
            or (rest is not None and rest in peft_typed_methods()))


def quantization(name: str) -> dict[str, Any] | None:
    """The model mapping's quantization keys of a bench name's base (``lora-nf4``, ``peft-lora-nf4``), or None."""
    scheme = QUANTIZED.get(name[len(PEFT_SAME):] if name.startswith(PEFT_SAME) else name)
    return {"quantize": scheme} if scheme else None


def method_config(name: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """The method config a bench name stands for: its preset's method (or a variant of one) with its base method's
    ``SHORT_RUN`` changes, or a registered method with its defaults. A method that reads data itself reads
    ``data`` (the workload's) where given."""
    base, options = VARIANTS.get(name, (name, {}))
    preset = _preset(base)
    method = {**(dict(preset["method"]) if preset else {"name": base}), **options}
    if data is not None and "data" in method:
        method["data"] = dict(data)
    return {**method, **SHORT_RUN.get(base, {})}  # a variant's run is as short as its base method's


def learning_rate(name: str, w: Workload) -> float:
    """The run's learning rate: the workload's, or for a zeroth-order preset its own."""
    preset = _preset(name) if name in OWN_LR else None
    return float(preset["train"]["lr"]) if preset else w.lr


def _file_bytes(folder: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(pattern))


def _run_engine(w: Workload, method: str, out: Path) -> dict[str, Any]:
    import deltatune as dt
    from deltatune.train.loop import pick_device

    config = w.run_config(method_config(method, w.data()), str(out))
    config["train"]["lr"] = learning_rate(method, w)
    if quantization(method):
        config["model"] = {"name": w.model, **quantization(method)}
    peak = PeakMemory(pick_device(w.device))
    summary = dt.train(config, callbacks=[peak])
    times = [r["seconds"] for r in summary["history"]]
    return {
        "times": times,
        "tokens": [r["tokens"] for r in summary["history"]],
        "trainable": summary["trainable"],
        "artifact_bytes": _file_bytes(out, "*.safetensors"),
        "stored_bytes": summary["stored_bytes"],
        "eval_loss": summary["final"].get("eval_loss"),
        "train_loss": summary["history"][-1]["loss"],
        "peak_memory_bytes": peak.peak if peak.peak is not None else summary["peak_memory_bytes"],
        "train_peak_memory_bytes": peak.train_peak,
        "engine_peak_memory_bytes": summary["peak_memory_bytes"],
        "engine_seconds_per_step": summary["seconds_per_step"],
    }


def _run_baseline(w: Workload, kind: str, out: Path) -> dict[str, Any]:
    import torch

    from deltatune.data.tasks import load_for_task
    from deltatune.train import loop
    from deltatune.train.config import load_config

    cfg = load_config(w.run_config(method_config("lora"), str(out)))  # the workload's data and schedule
    s = cfg.train
    device = loop.pick_device(s.device)
    model, _, task = load_for_task(cfg.data, cfg.model, seed=s.seed, quantization=quantization(kind))
    torch.manual_seed(s.seed)
    if kind == "plain-forward":
        return _run_forward(model, task, s, device)
    if kind.startswith("peft-"):
        from peft import get_peft_model

        task_type = "SEQ_CLS" if w.task == "classification" else "CAUSAL_LM"
        if kind == "peft-lora" or quantization(kind) is not None:  # PEFT's LoRA, over a quantized base or not
            config = _peft_config("peft-lora", task_type)
        elif kind in PEFT_EXTRA:
            config = _peft_config(kind, task_type)
        else:
            config = _peft_config_of(kind[len(PEFT_SAME):], model, task_type, w)
        model = get_peft_model(model, config)
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
    loaded = loop.peak_memory_bytes(device)  # the peak so far: loading; then the steps' own (PeakMemory's way)
    resettable = loop.reset_peak_memory(device)
    for _ in range(s.steps):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        batch = {k: v.to(device) for k, v in task.collate([task.train[i] for i in batches.next()]).items()}
        labels = batch.pop("labels")
        tokens.append(int(batch["attention_mask"].sum()) if "attention_mask" in batch else labels.numel())
        with loop.autocast(s, device):  # the transformers model's own causal-LM loss, as PEFT users train
            loss = model(**batch, labels=labels, use_cache=False).loss
        loss.backward()
        loss_value = loss.item()
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], s.max_grad_norm)
        optimizer.step()
        scheduler.step()
        times.append(time.perf_counter() - t0)
    train_peak = loop.peak_memory_bytes(device) if resettable else None
    # PEFT's prompt tuning returns logits for its virtual tokens too, ahead of the input's: the eval reads the input's
    virtual = model.peft_config["default"].num_virtual_tokens if kind == "peft-prompt" else 0
    final = task.evaluate(_input_logits(model, virtual) if virtual else model, s.eval_batch_size)
    peak = max(loop.peak_memory_bytes(device), loaded)
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
        "train_peak_memory_bytes": train_peak,
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
    """PEFT's config for a PEFT run, at the sizes of deltatune's ``lora``, ``prefix`` and ``prompt`` presets."""
    import peft

    if kind == "peft-lora":
        m = method_config("lora")
        return peft.LoraConfig(r=m["r"], lora_alpha=m["alpha"], target_modules=m["targets"], lora_dropout=0.0,
                               bias="none", task_type=task_type)
    if kind == "peft-prefix":
        m = method_config("prefix")
        return peft.PrefixTuningConfig(num_virtual_tokens=m["length"], prefix_projection=m["reparam"],
                                       encoder_hidden_size=m["mid_dim"], task_type=task_type)
    if kind == "peft-prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=method_config("prompt")["length"], task_type=task_type)
    raise DeltatuneError(f"no PEFT run is called {kind!r}")


def _peft_config_of(method: str, model: Any, task_type: str, w: Workload) -> Any:
    """PEFT's config for the method's own PEFT type at the method's preset options (``method_config``): the config
    ``deltatune export`` writes for that delta, so both runs train the same modules with the same sizes."""
    import peft

    import deltatune as dt
    from deltatune.interop.peft import export_peft

    options = method_config(method, w.data())
    tuned = dt.attach(model, options.pop("name"), **options)
    with tempfile.TemporaryDirectory(prefix="deltatune-bench-peft-") as tmp:
        export_peft(tuned, tmp, overwrite=True)
        tuned.detach()
        config = peft.PeftConfig.from_pretrained(tmp)
    config.inference_mode = False
    config.task_type = task_type
    return config


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
            with loop.autocast(s, device):
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


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m deltatune.cli.bench_workload --worker SPEC.json RESULT.json (use `deltatune bench`)")
