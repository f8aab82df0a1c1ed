"""``deltatune demo``: a short, honest LoRA fine-tune of the shipped SmolLM2-135M on tweet sentiment.

The task is framed as next-token classification: the prompt ``"Tweet: {text}\\nSentiment:"`` is fed to the
causal LM and the logits of the first tokens of ``" negative"``, ``" neutral"`` and ``" positive"`` at the
last prompt position are the three class scores; the loss is cross-entropy over those three logits. Batches
are left-padded with explicit position ids, so every example sees the positions it would see alone and the
class scores are read at position -1 (``logits_to_keep=1``: the 49k-word head runs on one position only).

Accuracy and loss are measured on a held-out, stratified set of tweets before and after training; the
training batches come from a disjoint pool. Everything is seeded, so a run repeats exactly on one machine.
"""

from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from deltatune.errors import DeltatuneError

MODEL = "smollm2-135m"
DATA = "tweets"
PROMPT = "Tweet: {text}\nSentiment:"
LABEL_WORDS = (" negative", " neutral", " positive")
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "lora": {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]},
}
DEFAULT_STEPS = 120
DEFAULT_LR = 2e-3
EVAL_FRACTION = 0.2  # of the data set held out; the eval examples are drawn from it, training never sees it
EVAL_BATCH = 32


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


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass


class _Encoder:
    """Prompt building and batching: the tweet is truncated, never the prompt around it."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        def ids(s: str) -> list[int]:
            return tokenizer(s, add_special_tokens=False)["input_ids"]

        self.ids = ids
        head, tail = PROMPT.split("{text}")
        self.space = " " if head.endswith(" ") else ""  # the space goes with the tweet, as in the joint text
        self.head, self.tail = ids(head.removesuffix(" ")), ids(tail)
        self.budget = max_length - len(self.head) - len(self.tail)
        if self.budget < 1:
            raise DeltatuneError(
                f"max_length={max_length} leaves no room for the tweet: the prompt alone takes "
                f"{len(self.head) + len(self.tail)} tokens; use max_length >= {len(self.head) + len(self.tail) + 8}"
            )
        firsts = [ids(w)[0] for w in LABEL_WORDS]
        if len(set(firsts)) != len(firsts):
            raise DeltatuneError(
                f"the tokenizer maps the label words {LABEL_WORDS} to first tokens {firsts}, which are not "
                "distinct, so they cannot serve as class scores"
            )
        self.label_ids = torch.tensor(firsts)

    def encode(self, text: str) -> list[int]:
        text = self.space + " ".join(text.split())  # one line: newlines in a tweet would fake a new field
        return self.head + self.ids(text)[: self.budget] + self.tail

    def batch(self, encoded: list[list[int]]) -> dict[str, torch.Tensor]:
        """Left-padded input ids, attention mask and position ids (0 at each example's first real token)."""
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, width - len(e):] = torch.tensor(e)
            mask[i, width - len(e):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": positions}


def _length_grouped(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Batches of similar length (less padding, ~25% faster on CPU): sort each run of 16 batches by
    length, cut it into batches, then shuffle the batches."""
    chunk = batch_size * 16
    batches: list[list[int]] = []
    for start in range(0, len(lengths), chunk):
        part = sorted(range(start, min(start + chunk, len(lengths))), key=lambda i: lengths[i])
        batches += [part[j:j + batch_size] for j in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def _class_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], label_ids: torch.Tensor) -> torch.Tensor:
    out = model(**batch, logits_to_keep=1, use_cache=False)
    return out.logits[:, -1, :].index_select(-1, label_ids).float()


@torch.no_grad()
def _evaluate(
    model: torch.nn.Module, enc: _Encoder, encoded: list[list[int]], labels: list[int],
    progress: Progress, what: str,
) -> dict[str, float]:
    """Accuracy and mean cross-entropy over the three label logits, batched by length (order-free)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    correct, loss_sum = 0, 0.0
    task = progress.add_task(what, total=len(order), info="")
    for start in range(0, len(order), EVAL_BATCH):
        idx = order[start:start + EVAL_BATCH]
        logits = _class_logits(model, enc.batch([encoded[i] for i in idx]), enc.label_ids)
        y = torch.tensor([labels[i] for i in idx])
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(-1) == y).sum())
        progress.update(task, advance=len(idx), info=f"loss {loss_sum / (start + len(idx)):.3f}")
    progress.remove_task(task)
    model.train(was_training)
    return {"accuracy": correct / len(order), "loss": loss_sum / len(order)}


def _progress(console: Console, show: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not show,
        transient=False,
    )


def demo(
    *,
    steps: int = DEFAULT_STEPS,
    method: str = "lora",
    options: dict[str, Any] | None = None,
    lr: float = DEFAULT_LR,
    batch_size: int = 8,
    eval_size: int = 300,
    max_length: int = 64,
    seed: int = 0,
    out: str | os.PathLike | None = "runs/demo",
    console: Console | None = None,
    show: bool = True,
) -> dict[str, Any]:
    """Fine-tune SmolLM2-135M on tweet sentiment for ``steps`` AdamW steps and report before/after metrics.

    ``method`` is any registered method; ``options`` override its demo config (for LoRA: r=8, alpha=16 on
    q_proj and v_proj; other methods: their defaults). The peak learning rate ``lr`` is reached after a
    10% warm-up and decays linearly to 0. The artifact is saved to ``out`` (None: not saved); ``show``
    prints progress and the final table. Returns the metrics as a dict.
    """
    import deltatune as dt

    if steps < 0:
        raise DeltatuneError(f"steps={steps} must be 0 or more")
    if batch_size < 1:
        raise DeltatuneError(f"batch_size={batch_size} must be at least 1")
    if eval_size < 1:
        raise DeltatuneError(f"eval_size={eval_size} must be at least 1")
    if not lr > 0:
        raise DeltatuneError(f"lr={lr} must be positive")
    options = {**DEFAULT_OPTIONS.get(method, {}), **(options or {})}
    console = console or Console()
    start = time.perf_counter()
    _seed(seed)

    # -- data: a held-out eval set and a disjoint, stratified training pool ------------------
    dataset = dt.data.load(DATA)
    train_part, held = dataset.split(EVAL_FRACTION, seed=seed)
    if eval_size > len(held):
        raise DeltatuneError(f"eval_size={eval_size} is more than the {len(held)} held-out tweets")
    evalset = held.subset(eval_size, seed=seed)
    pool = train_part.subset(min(max(steps, 1) * batch_size, len(train_part)), seed=seed)

    # -- model ---------------------------------------------------------------------------------
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar would cut through the status line
    try:
        with console.status(f"loading {MODEL}"):
            model = dt.models.load(MODEL)
            tokenizer = dt.models.load_tokenizer(MODEL)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    enc = _Encoder(tokenizer, max_length)
    eval_x = [enc.encode(t) for t in evalset.texts]
    train_x = [enc.encode(t) for t in pool.texts]
    base_params = sum(p.numel() for p in model.parameters())
    tuned = dt.attach(model, method, **options)
    trainable = tuned.trainable_parameters()
    num_trainable = sum(p.numel() for p in trainable)
    if not trainable:
        raise DeltatuneError(f"method {method!r} with options {options} has no trainable parameters")

    with _progress(console, show) as progress:
        before = _evaluate(tuned, enc, eval_x, evalset.labels, progress, "eval (before)")

        # -- train: AdamW, linear warm-up over the first 10% of steps, then linear decay --------
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
        warmup = max(1, steps // 10)

        def lr_factor(step: int) -> float:
            return (step + 1) / warmup if step < warmup else max(0.0, (steps - step) / max(1, steps - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        tuned.train()
        task = progress.add_task("train", total=steps, info="")
        train_start = time.perf_counter()
        smooth = float("nan")
        losses: list[float] = []
        batches = _length_grouped([len(e) for e in train_x], batch_size, random.Random(seed))
        for step in range(steps):
            idx = batches[step % len(batches)]
            logits = _class_logits(tuned, enc.batch([train_x[i] for i in idx]), enc.label_ids)
            loss = F.cross_entropy(logits, torch.tensor([pool.labels[i] for i in idx]))
            value = loss.item()
            if not math.isfinite(value):
                raise DeltatuneError(f"the loss became {value} at step {step}: lower the learning rate (lr={lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(value)
            smooth = value if step == 0 else 0.9 * smooth + 0.1 * value
            rate = (step + 1) / (time.perf_counter() - train_start)
            progress.update(task, advance=1, info=f"loss {smooth:.3f}  {rate:.2f} steps/s")
        train_seconds = time.perf_counter() - train_start
        tuned.eval()

        after = _evaluate(tuned, enc, eval_x, evalset.labels, progress, "eval (after)")

    artifact_bytes = None
    if out is not None:
        tuned.save(out)
        artifact_bytes = sum(f.stat().st_size for f in Path(out).iterdir() if f.is_file())
    seconds = time.perf_counter() - start
    majority = max(evalset.labels.count(k) for k in range(len(evalset.label_names))) / len(evalset)

    metrics: dict[str, Any] = {
        "method": method,
        "options": dict(options),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "eval_examples": len(evalset),
        "train_examples": min(steps * batch_size, len(pool)),
        "majority_accuracy": majority,
        "accuracy_before": before["accuracy"],
        "accuracy_after": after["accuracy"],
        "eval_loss_before": before["loss"],
        "eval_loss_after": after["loss"],
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": smooth if losses else None,
        "trainable_params": num_trainable,
        "model_params": base_params,
        "trainable_percent": 100.0 * num_trainable / base_params,
        "artifact": str(out) if out is not None else None,
        "artifact_bytes": artifact_bytes,
        "train_seconds": train_seconds,
        "steps_per_second": steps / train_seconds if steps and train_seconds > 0 else None,
        "seconds": seconds,
    }
    if show:
        console.print(_table(metrics))
    return metrics


def _table(m: dict[str, Any]) -> Table:
    table = Table(title=f"deltatune demo: {m['method']} on {MODEL}, {DATA} sentiment ({m['eval_examples']} held-out)")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("accuracy", f"{m['accuracy_before']:.1%}", f"[bold]{m['accuracy_after']:.1%}")
    table.add_row("eval loss", f"{m['eval_loss_before']:.3f}", f"[bold]{m['eval_loss_after']:.3f}")
    table.add_row("majority-class accuracy", f"{m['majority_accuracy']:.1%}", "")
    table.add_row(
        "trainable params", "", f"{m['trainable_params']:,} ({m['trainable_percent']:.2f}% of {m['model_params']:,})"
    )
    table.add_row(
        "artifact", "", f"{m['artifact']} ({human_bytes(m['artifact_bytes'])})" if m["artifact"] else "not saved"
    )
    rate = f", {m['steps_per_second']:.2f} steps/s" if m["steps_per_second"] else ""
    table.add_row("training", "", f"{m['steps']} steps x {m['batch_size']}{rate}")
    table.add_row("wall time", "", f"{m['seconds']:.0f} s")
    return table
