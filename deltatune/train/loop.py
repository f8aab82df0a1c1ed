"""The native training loop: read it top to bottom in ``train``.

Policies plug in around the optimizer step (``train/step.py``, shared with the ``transformers.Trainer``
bridge), or take the whole step (``Policy.train_step``); the optimizer follows when they change what
trains. Callers watch a run through callbacks (``train/callbacks.py``: progress bar, summary table, their
own). Checkpoints hold everything a resumed run needs to continue bit-exactly: the delta, optimizer,
scheduler, policy state, RNG states and the position in the data.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import json
import math
import os
import random
import resource
import signal
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from deltatune.core import artifact
from deltatune.core.forms.base import WeightDelta
from deltatune.core.optim import loraplus_optimizer
from deltatune.core.tuned import Tuned, attach
from deltatune.errors import DeltatuneError
from deltatune.train import distributed_fsdp as fsdp
from deltatune.train import state as ckpt
from deltatune.train import token_elimination
from deltatune.train.callbacks import Callback, ProgressBar, SummaryTable
from deltatune.train.config import RunConfig, TrainSettings, config_differences, load_config, loss_terms
from deltatune.train.early_stopping import Stopper
from deltatune.train.reporting import reporters
from deltatune.train.step import PolicyStep, mean_over_ranks, takes_whole_steps
from deltatune.train.step import sync_optimizer as sync_optimizer  # callers and tests import it from here

FAULT_ENV = "DELTATUNE_FAULT_KILL_AT_STEP"  # fault injection for the resume test: SIGKILL self before this step


# -- pieces -------------------------------------------------------------------------------
class Batches:
    """Seeded, resumable batch order: epoch e visits a permutation seeded by (seed, e); under data
    parallelism each rank takes its own slice of every global batch."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.global_batch = batch_size * world
        if n < self.global_batch:
            raise DeltatuneError(
                f"the training split has {n} examples, fewer than one batch ({self.global_batch}): "
                "lower train.batch_size or use more data"
            )
        self.epoch, self.cursor = 0, 0
        self._perm: list[int] | None = None

    def _order(self) -> list[int]:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(self.n, generator=g).tolist()
        return self._perm

    def next(self) -> list[int]:
        if self.cursor + self.global_batch > self.n:  # drop the ragged end: every batch is full
            self.epoch, self.cursor, self._perm = self.epoch + 1, 0, None
        chunk = self._order()[self.cursor:self.cursor + self.global_batch]
        self.cursor += self.global_batch
        return chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def epochs_done(self) -> float:
        """Passes over the training split so far (2.5: half way through the third); each drops its ragged end."""
        return self.epoch + self.cursor / ((self.n // self.global_batch) * self.global_batch)

    def epoch_done(self) -> bool:
        """The batches handed out so far end a pass: the next one starts a new permutation."""
        return self.cursor + self.global_batch > self.n

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, s: dict[str, int]) -> None:
        self.epoch, self.cursor, self._perm = int(s["epoch"]), int(s["cursor"]), None


def lr_lambda(settings: TrainSettings, restarts: list[int] | None = None):
    """Warm-up then constant / linear / cosine decay; a policy's ``restarts`` split the run into segments
    that each get the whole schedule (a training phase with a fresh schedule, as LT-SFT's phase 2)."""
    total = settings.steps
    bounds = [0] + sorted(r for r in (restarts or []) if 0 < r < total) + [total]

    def f(step: int) -> float:
        i = max(j for j in range(len(bounds) - 1) if bounds[j] <= step) if step < total else len(bounds) - 2
        start, length = bounds[i], bounds[i + 1] - bounds[i]
        local = step - start
        warm = settings.warmup if settings.warmup >= 1 else settings.warmup * length
        warm = int(round(warm))
        if warm and local < warm:
            return (local + 1) / warm
        if settings.schedule == "constant":
            return 1.0
        progress = (local - warm) / max(1, length - warm)
        if settings.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def run_length(s: TrainSettings, n_train: int, world: int = 1) -> int:
    """The run's optimizer steps: ``train.steps``, or ``train.epochs`` passes over a training split of ``n_train``
    examples (Trainer's ``num_train_epochs``). A pass is the split's full batches (the ragged end is dropped), a step
    takes ``grad_accum`` of them, and the count is rounded up, so every example is seen ``epochs`` times."""
    if s.epochs is None:
        return s.steps
    batches_per_epoch = max(1, n_train // (s.batch_size * world))
    return max(1, math.ceil(round(s.epochs * batches_per_epoch / s.grad_accum, 9)))


def make_optimizer(params: list[torch.nn.Parameter], s: TrainSettings, tuned: Tuned | None = None
                   ) -> torch.optim.Optimizer:
    if s.loraplus_ratio is not None and tuned is not None:  # LoRA+: PEFT's groups, B factors at ratio·lr
        cls, extra = {"adamw": (torch.optim.AdamW, {}), "adam": (torch.optim.Adam, {}),
                      "sgd": (torch.optim.SGD, {"momentum": 0.9})}[s.optimizer]
        return loraplus_optimizer(cls, tuned.forms, params, lr=s.lr, ratio=s.loraplus_ratio,
                                  lr_embedding=s.loraplus_lr_embedding, weight_decay=s.weight_decay,
                                  what=f"method {tuned.method.name!r}", **extra)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.optimizer == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    return torch.optim.SGD(params, lr=s.lr, weight_decay=s.weight_decay, momentum=0.9)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim this way
        return None


def release_freed_memory() -> None:
    """Hand the pages the heap holds free back to the system (glibc's ``malloc_trim(0)``). glibc keeps memory that
    tensors of a few MiB freed (its mmap threshold rises as large blocks are freed, so later ones come from the
    heap), and the resident set then carries one step's freed activations into the next: trimming between steps
    (``train.trim_memory``) took 8 % (fp32) to 16 % (nf4) off a LoRA step's peak on SmolLM2-135M, and added about
    17 % to its step time (the next step faults the pages in again). A no-op where libc is not glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def reset_peak_memory(device: torch.device) -> bool:
    """Reset the peak ``peak_memory_bytes`` reads to the current use (CUDA's peak allocation; on Linux the
    resident set's high-water mark, through /proc/self/clear_refs, which ru_maxrss reads too). False where it
    cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def rng_state() -> dict[str, Any]:
    out: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    v = s["python"]
    random.setstate((v[0], tuple(v[1]), v[2]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _distributed() -> tuple[int, int]:
    """(rank, world size); joins the process group torchrun / accelerate launch set up in the environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():  # one GPU per process, as torchrun / accelerate assign them
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


@dataclass
class Run:
    """Everything ``train`` builds, kept together so tests and the demo can reach it."""

    config: RunConfig
    tuned: Tuned
    task: Any
    tokenizer: Any
    device: torch.device


def build(config: RunConfig) -> Run:
    """The model, tokenizer and task of the config, and the delta attached, on the run's device."""
    from deltatune.data.tasks import load_for_task

    s = config.train
    device = pick_device(s.device)
    model, tokenizer, task = load_for_task(config.data, config.model, seed=s.seed, objective=s.objective,
                                           quantization=config.quantization)
    options = {k: v for k, v in config.method.items() if k != "name"}
    torch.manual_seed(s.seed)  # the delta's initialisation depends on the seed only
    tuned = attach(model, config.method["name"], **options).to(device)
    use_loss_terms(task, tuned, config)
    use_objective(task, tuned, config)
    task.chunked_loss = s.chunked_loss
    # a run with its own chat template (data.chat_template) saves it with the delta, for generation
    tuned.delta.chat_template = getattr(task, "chat_template", None)
    if s.gradient_checkpointing:
        if not hasattr(model, "gradient_checkpointing_enable"):
            raise DeltatuneError(f"{type(model).__name__} has no gradient checkpointing; set train.gradient_checkpointing=false")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return Run(config, tuned, task, tokenizer, device)


def use_loss_terms(task: Any, tuned: Tuned, config: RunConfig) -> None:
    """``train.mixup`` / ``train.contrastive`` into the task's loss (the task refuses them where they do not
    fit). A policy that takes its own steps (zeroth-order: SPSA from two forward passes in eval mode) would
    compare losses with different mixes, so it is refused."""
    terms = loss_terms(config.train)
    if terms is not None and takes_whole_steps(tuned.policy):
        raise DeltatuneError(
            f"train.mixup and train.contrastive need gradients, but {config.method['name']} trains from "
            "forward passes (its policy takes the whole step); set both to 0"
        )
    task.use_loss_terms(terms)


def use_objective(task: Any, tuned: Tuned, config: RunConfig) -> Any:
    """``train.objective`` into the task (refused on a task it cannot train on, and GRPO with a method that trains
    from forward passes: before anything trains); an objective with options of its own (dpo, grpo, ...) sets the
    task's loss, and ``disable_dropout`` sets every dropout of the model and the delta to 0 (TRL's default for
    DPO: the policy then equals the reference at step 0). Returns the objective's options."""
    from deltatune.data import objectives
    from deltatune.data.grpo import GRPOOptions, grpo_refusal

    objective, options = objectives.parse(config.train.objective)
    problem = objectives.task_problem(objective, task.kind)
    if problem is None and isinstance(options, GRPOOptions):
        problem = grpo_refusal(tuned.policy, config.method["name"])
    if problem is not None:
        raise DeltatuneError(problem)
    if objective.task is not None:
        task.use_objective(options)
    if getattr(options, "disable_dropout", False):
        from deltatune.data.preference import disable_dropout

        disable_dropout(tuned)
    return options


def prepare_reference(run: Run, out: Path, *, resume: bool, rank: int) -> None:
    """The reference log-probs a task computes once before training (a preference objective on a delta trained in
    place), kept in ``out/reference`` and read back on resume; before a checkpoint restores the delta, so the
    base model they come from is the one the run started from. Rank 0 writes."""
    prepare = getattr(run.task, "prepare_reference", None)
    if prepare is None:
        return
    s = run.config.train
    from deltatune.data.preference import REFERENCE_DIR

    prepare(run.tuned, out / REFERENCE_DIR, resume=resume, write=rank == 0, batch_size=s.eval_batch_size,
            precision=f"{s.precision}/{run.device.type}", autocast=lambda: autocast(s, run.device))


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def autocast(s: TrainSettings, device: torch.device) -> contextlib.AbstractContextManager:
    """The run's mixed precision: bf16 autocast where asked (or on a CUDA device that has it), else none."""
    use_bf16 = s.precision == "bf16" or (s.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# -- the loop -------------------------------------------------------------------------------
def train(config: str | Path | dict | RunConfig, overrides: list[str] | None = None, *, resume: bool = False,
          overwrite: bool = False, force: bool = False, callbacks: list[Callback] | None = None) -> dict[str, Any]:
    """Train a method as the config says (a YAML path, a preset name, a mapping or a ``RunConfig``); write
    the artifact and checkpoints to ``config.output``. ``callbacks`` watch the run (``train/callbacks.py``).

    A fresh run needs an empty (or new) output folder: ``resume`` continues the run there from its newest intact
    checkpoint, ``overwrite`` replaces whatever the folder holds. The folder is this process's for the whole run
    (another one gets "in use by PID N"). A resume whose config differs from the checkpoint's (beyond
    ``train.steps`` and the reporting settings) is refused with the keys that differ; ``force`` resumes anyway.

    ``train.epochs`` sets the length in passes over the training split; with ``train.early_stopping`` the run stops
    when the metric stops improving and the artifact is the best step's delta (its checkpoint is never pruned).
    Metrics stream to ``OUTPUT/logs/metrics.jsonl`` as steps end, and to the ``train.report_to`` reporters
    (``train/reporting.py``).

    Returns the summary: final metrics, history, epochs, seconds per step, tokens per second, peak memory, ``best``
    (with early stopping: the step, metric and value the artifact holds) and ``warnings`` (a corrupt checkpoint
    skipped on resume, a run that looks diverged)."""
    if force and not resume:
        raise DeltatuneError("force=True (--force) only accepts a changed config on resume: add resume=True "
                             "(--resume), or use overwrite=True (--overwrite) to replace a finished run")
    cfg = load_config(config, overrides)
    rank, world = _distributed()
    with _own_output(cfg, rank, world, resume=resume, overwrite=overwrite):
        return _train(cfg, rank, world, resume=resume, force=force, callbacks=callbacks)


@contextlib.contextmanager
def _own_output(cfg: RunConfig, rank: int, world: int, *, resume: bool, overwrite: bool) -> Iterator[None]:
    """Rank 0 owns the output folder for the whole run (``artifact.destination``: the lock, a half-done swap put
    right, a used folder or one that holds the model or data refused); the other ranks start once it has."""
    owner: contextlib.AbstractContextManager = contextlib.nullcontext()
    if rank == 0:
        owner = artifact.destination(cfg.output, "run", inputs=[cfg.model, *cfg.data.paths()],
                                     overwrite=overwrite, resume=resume)
    with owner:
        if rank == 0:
            ckpt.recover(Path(cfg.output) / "checkpoints")
        if world > 1:
            dist.barrier()
        yield


SHOWN_DIFFERENCES = 4  # a resume refusal lists this many differing keys, then how many more


def check_same_run(checkpoint: Path, saved: dict[str, Any], cfg: RunConfig, *, force: bool) -> None:
    """Refuse to resume from a checkpoint written by another config, naming the keys that differ; with ``force``,
    warn with them and go on (the checkpoint's tensors must still fit the delta the config builds)."""
    differences = config_differences(saved, cfg)
    if not differences:
        return
    shown = "; ".join(differences[:SHOWN_DIFFERENCES])
    more = len(differences) - SHOWN_DIFFERENCES
    listed = shown + (f"; and {more} more" if more > 0 else "")
    if force:
        warnings.warn(f"--resume --force: resuming {checkpoint} under a changed config ({listed})", stacklevel=4)
        return
    raise DeltatuneError(
        f"--resume: {checkpoint} was written by another config ({listed}); resume with the same config (only "
        "train.steps and the reporting settings may change), add --force (force=True) to resume anyway, or write "
        "to another output"
    )


def load_checkpoint_delta(tuned: Tuned, tensors: dict[str, torch.Tensor], checkpoint: Path) -> None:
    """The checkpoint's delta tensors into ``tuned``; a forced resume whose method options changed the delta's
    shapes gets one line instead of torch's list of mismatched keys."""
    try:
        with torch.no_grad():
            tuned.deltas.load_state_dict(tensors)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise DeltatuneError(
            f"--resume: the delta in {checkpoint} does not fit the delta this config builds ({first}); change back "
            "the method options that shape the delta, or start a new run in another output"
        ) from e


def restore(tuned: Tuned, saved: dict[str, Any], checkpoint: Path) -> None:
    """A checkpoint's delta into ``tuned``: the policy first (it may restructure the delta, a phase switch, before
    the tensors load into it), then the tensors and which of them train."""
    tuned.policy.load_state_dict(saved["policy"])
    load_checkpoint_delta(tuned, saved["delta"], checkpoint)
    for i, p in enumerate(tuned.deltas.parameters()):
        p.requires_grad_(bool(saved["trainable"][str(i)]))


def restore_best(tuned: Tuned, ckpt_dir: Path, best: dict[str, Any] | None, last_step: int) -> list[str]:
    """End with the best delta (Trainer's ``load_best_model_at_end``): the checkpoint of the best step, unless it
    is the last step. Returns a warning when that checkpoint cannot be read (the last delta is kept)."""
    if best is None or best["step"] == last_step:
        return []
    path = ckpt_dir / str(ckpt.step_name(best["step"]))
    try:
        restore(tuned, ckpt.load_checkpoint(path), path)
    except (DeltatuneError, OSError) as e:
        return [f"the best step {best['step']} ({best['metric']} {best['value']:.4g}) cannot be restored "
                f"({' '.join(str(e).split())}): the artifact holds the delta of step {last_step}"]
    return []


def _train(cfg: RunConfig, rank: int, world: int, *, resume: bool, force: bool, callbacks: list[Callback] | None
           ) -> dict[str, Any]:
    run = build(cfg)
    tuned, task, device = run.tuned, run.task, run.device
    # train.epochs becomes a number of steps once the training split's size is known
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=run_length(cfg.train, len(task.train),
                                                                                         world)))
    s = cfg.train
    out = Path(cfg.output)
    ckpt_dir = out / "checkpoints"
    callbacks = ([ProgressBar(), SummaryTable()] if s.progress and rank == 0 else []) + \
        (reporters(out, s.report_to, cfg.to_dict(), task) if rank == 0 else []) + list(callbacks or [])

    # FSDP2 when train.fsdp or the launcher asks for it (train/distributed_fsdp.py): sharded once, after a resume
    # restored the delta and before the optimizer holds its (then sharded) tensors; otherwise DDP
    sharding = fsdp.resolve(s.fsdp, world)

    def wrap() -> torch.nn.Module:
        if world == 1 or sharding is not None:  # FSDP2 follows the trainable set itself: never re-wrapped
            return tuned
        ids = [torch.cuda.current_device()] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(tuned, device_ids=ids)

    tuned.policy.plan(s.steps, s.grad_accum)
    elimination = token_elimination.install(tuned, s.token_elimination, task, cfg.data)  # docs/lemo.md
    batches = Batches(len(task.train), s.batch_size, s.seed, rank, world)
    history: list[dict[str, Any]] = []
    start = 0
    saved: dict[str, Any] | None = None
    notes: list[str] = []  # the summary's warnings
    prepare_reference(run, out, resume=resume, rank=rank)
    if resume:
        found = ckpt.newest_intact(ckpt_dir, set_aside=rank == 0)
        if found is None:
            raise DeltatuneError(f"--resume: no checkpoint in {ckpt_dir}; start without --resume")
        resumed_from, saved, notes = found
        for note in notes:
            warnings.warn(note, stacklevel=3)
        check_same_run(resumed_from, saved["config"], cfg, force=force)
        restore(tuned, saved, resumed_from)
    if sharding is not None:
        fsdp.shard(tuned, sharding)
    params = list(tuned.deltas.parameters())  # all delta tensors, trainable or not: a stable order
    own = tuned.policy.make_optimizer(params, s.lr, s.weight_decay)
    if own is not None and s.loraplus_ratio is not None:
        raise DeltatuneError(f"train.loraplus_ratio (LoRA+) groups the run's optimizer, but {tuned.method.name!r} "
                             "brings its own (its policy's): remove train.loraplus_ratio")
    optimizer = own or make_optimizer(params, s, tuned)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(s, tuned.policy.lr_restarts(s.steps)))
    model_for_step: torch.nn.Module = wrap()
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"] if sharding is None
                                  else fsdp.shard_optimizer_state(optimizer, saved["optimizer"]))
        scheduler.load_state_dict(saved["scheduler"])
        batches.load_state_dict(saved["data"])
        set_rng_state(saved["rng"][rank] if isinstance(saved["rng"], list) else saved["rng"])
        history, start = saved["history"], int(saved["step"])
        elimination.load_state_dict(saved.get("token_elimination"))
    # early stopping replays the history: a resumed run judges as the run it continues
    stopper = Stopper(s.early_stopping, history) if s.early_stopping is not None else None
    policy_step = PolicyStep(tuned)  # the optimizer holds every delta tensor (add_frozen): a stable order

    def checkpoint(step: int) -> Path | None:
        rngs = [rng_state()]
        if world > 1:
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        # sharded: every rank gathers the delta and the optimizer state whole, rank 0 writes them
        gather = fsdp.gathered(tuned) if sharding is not None else contextlib.nullcontext()
        with gather:
            optimizer_state = optimizer.state_dict() if sharding is None else fsdp.full_optimizer_state(optimizer)
            if rank != 0:
                return None
            delta_state = tuned.deltas.state_dict()
            policy_state = tuned.policy.state_dict()  # whole too (a prefix's policy carries its MLP's tensors)
        return ckpt.save_checkpoint(ckpt_dir, step, {
            "step": step,
            "config": cfg.identity(),
            "delta": delta_state,
            "trainable": {str(i): p.requires_grad for i, p in enumerate(params)},
            "policy": policy_state,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "data": batches.state_dict(),
            "rng": rngs if world > 1 else rngs[0],
            "history": history,
            "token_elimination": elimination.state_dict(),
        }, s.keep_last, keep=stopper.best_step if stopper is not None else None)

    def next_batch() -> dict[str, torch.Tensor]:
        return _to(task.collate([task.train[i] for i in batches.next()]), device)

    def batch_loss(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """The task loss (+ the policy's regulariser) under the run's mixed precision, and the batch's tokens."""
        with autocast(s, device), elimination.batch(batch):
            loss, n_tok = task.loss(model_for_step, batch)
            extra = tuned.policy.extra_loss(tuned)
            if extra is not None:
                loss = loss + extra
        return loss, n_tok

    policy_tokens = [0]  # tokens of the batch that a policy taking its own step evaluated (for tokens/s)

    def policy_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's loss as the loop computes it, for a policy that takes its own step; the mean over ranks,
        so that every rank takes the same step."""
        loss, policy_tokens[0] = batch_loss(batch)
        return mean_over_ranks(loss.detach().float().clone())

    kill_at = int(os.environ.get(FAULT_ENV, "-1"))
    tokens_seen, step_times = 0, []
    tuned.train()
    for cb in callbacks:
        cb.on_begin(s.steps, start)
    # a resumed run that had stopped early takes no more steps
    last = start if stopper is not None and stopper.exhausted else s.steps
    try:
        for step in range(start, last):
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            batch = next_batch()
            policy_tokens[0] = 0
            own = tuned.policy.train_step(step, tuned, batch, policy_loss, optimizer.param_groups[0]["lr"], s.weight_decay)
            if own is not None:  # the policy took the whole step (zeroth-order): no backward, no optimizer step
                loss_sum, tokens = own, policy_tokens[0]
            else:
                loss_sum, tokens = 0.0, 0
                for i in range(s.grad_accum):
                    if i:
                        batch = next_batch()
                    loss, n_tok = batch_loss(batch)
                    (loss / s.grad_accum).backward()
                    loss_sum += loss.item() / s.grad_accum
                    tokens += n_tok
                if world > 1:  # the global loss: logged, seen by skip_step, and every rank stops together on NaN
                    loss_sum = mean_over_ranks(torch.tensor([loss_sum], dtype=torch.float64, device=device)).item()
            if not math.isfinite(loss_sum):
                good = ckpt.checkpoints(ckpt_dir)
                where = f"the last good checkpoint is {good[-1]}" if good else "no checkpoint was written yet"
                raise DeltatuneError(
                    f"the loss became {loss_sum} at step {step + 1}; stopped ({where}). "
                    "Lower train.lr, raise train.warmup, or set train.max_grad_norm"
                )
            lr_used = optimizer.param_groups[0]["lr"]  # the scheduler's step below sets the next step's
            skip = False
            if own is None:
                skip = policy_step.before(step, optimizer, loss_sum)
                if not skip:  # a skipped step makes no update; it still counts
                    if s.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], s.max_grad_norm)
                    optimizer.step()
            scheduler.step()
            if policy_step.after(step, optimizer) and world > 1:
                model_for_step = wrap()  # DDP fixes its parameter list when it wraps
            params = list(tuned.deltas.parameters())
            if s.trim_memory and device.type == "cpu":
                release_freed_memory()
            dt_step = time.perf_counter() - t0
            step_times.append(dt_step)
            tokens_seen += tokens * world
            record: dict[str, Any] = {"step": step + 1, "epoch": round(batches.epochs_done(), 4), "loss": loss_sum,
                                      "lr": lr_used, "tokens_per_s": tokens * world / dt_step, "seconds": dt_step,
                                      "tokens": tokens * world}
            if skip:
                record["skipped"] = True
            record.update(step_metrics(task))
            done = step + 1
            stop = tuned.policy.should_stop(step, batches.epoch_done())
            improved = False
            if (s.eval_every and done % s.eval_every == 0) or done == s.steps or stop:
                metrics = task.evaluate(tuned, s.eval_batch_size)
                tuned.train()
                record.update({f"eval_{k}": v for k, v in metrics.items()})
                for cb in callbacks:
                    cb.on_eval(done, metrics)
                if stopper is not None:
                    judged = stopper.judge(record)
                    improved, stop = judged.improved, stop or judged.stop
            history.append(record)
            for cb in callbacks:
                cb.on_step_end(record)
            # an improvement gets a checkpoint: the run ends with the best step's delta
            if (s.save_every and done % s.save_every == 0) or done == s.steps or stop or improved:
                path = checkpoint(done)
                if path is not None:
                    for cb in callbacks:
                        cb.on_checkpoint(done, path)
            if stop:
                break

        best = stopper.summary() if stopper is not None else None
        # sharded: every rank gathers the whole delta (a collective), rank 0 judges and writes it
        with fsdp.gathered(tuned) if sharding is not None else contextlib.nullcontext():
            if rank == 0:
                for note in restore_best(tuned, ckpt_dir, best, history[-1]["step"] if history else start):
                    warnings.warn(note, stacklevel=3)
                    notes.append(note)
            summary = _summary(cfg, tuned, history, step_times, tokens_seen, device, start)
            if stopper is not None:
                summary["best"] = best
            diverged = divergence(history, tuned, weights=sharding is None) if rank == 0 else []
            for note in diverged:
                warnings.warn(note, stacklevel=3)
            summary["warnings"] = notes + diverged
            if sharding is not None:
                summary["fsdp"] = dataclasses.asdict(sharding)
            if rank == 0:
                tuned.save(out)
                logs = out / "logs"
                logs.mkdir(exist_ok=True)
                (logs / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    except BaseException:
        for cb in callbacks:  # a progress bar stops, a callback lets go of what it holds
            cb.on_end(None)
        raise
    for cb in callbacks:
        cb.on_end(summary)
    if world > 1:
        dist.barrier()  # the artifact exists for every rank when train() returns
    return summary


def step_metrics(task: Any) -> dict[str, Any]:
    """What the task measured while it computed the step's losses (a preference objective's rewards/..., GRPO's
    reward, kl, completions/...: averaged over the step's micro-batches), as the step's record holds them next to
    the loss; every reporter gets them with the record."""
    take = getattr(task, "take_metrics", None)
    return take() if take is not None else {}


# A run can go wrong without a NaN: the outputs saturate and the loss pins flat (a classifier's at chance level,
# ln 2 for two classes), or the delta runs off. Both are judged on the finished run, and short runs are never judged
# flat: batches differ, so a model that reads its input gives each its own loss.
FLAT_STEPS = 10  # the last steps compared; a run needs twice as many to be judged
FLAT_SPREAD = 1e-4  # the spread of their losses, relative to their mean, under which the loss is flat
EXPLODED_RMS = 10.0  # trained weights are of order 0.01 to 1: a change of this root-mean-square wipes a tensor out


def divergence(history: list[dict[str, Any]], tuned: Tuned, *, weights: bool = True) -> list[str]:
    """Warnings for a run that looks diverged: a loss flat over the last ``FLAT_STEPS`` steps (on different
    batches) that did not fall to half of where it started, or a weight delta ΔW whose root-mean-square exceeds
    ``EXPLODED_RMS`` (or is not finite). Activation-side deltas (adapters, prompts) are judged by the loss only, and so is every delta
    without ``weights`` (under FSDP: ΔW of a form such as DoRA's reads base tensors that are sharded)."""
    found = []
    losses = [r["loss"] for r in history if not r.get("skipped")]
    if len(losses) >= 2 * FLAT_STEPS:
        last, first = losses[-FLAT_STEPS:], losses[:FLAT_STEPS]
        mean = sum(last) / len(last)
        if max(last) - min(last) <= FLAT_SPREAD * abs(mean) and mean >= 0.5 * sum(first) / len(first):
            found.append(f"the training loss stayed at {mean:.4g} over the last {FLAT_STEPS} steps without falling: "
                         "the run looks diverged (saturated outputs); lower train.lr")
    if not weights:
        return found
    name, rms = _largest_change(tuned)
    if not math.isfinite(rms) or rms > EXPLODED_RMS:
        found.append(f"the delta changes {name} by a root-mean-square of {rms:.3g} (trained weights are of order 1): "
                     "the run looks diverged; lower train.lr or set train.max_grad_norm")
    return found


def _largest_change(tuned: Tuned) -> tuple[str, float]:
    """The base tensor a weight delta changes most (by the root-mean-square of its ΔW), and that size."""
    worst = ("", 0.0)
    with torch.no_grad():
        for name, form in tuned.forms().items():
            if isinstance(form, WeightDelta):
                change = form.delta_weight()
                rms = float(torch.linalg.vector_norm(change, dtype=torch.float32)) / max(1, change.numel()) ** 0.5
                if not math.isfinite(rms) or rms > worst[1]:
                    worst = (name, rms)
                if not math.isfinite(rms):
                    break
    return worst


def _summary(cfg: RunConfig, tuned: Tuned, history: list[dict], step_times: list[float], tokens: int,
             device: torch.device, start: int) -> dict[str, Any]:
    timed = step_times[1:] or step_times  # the first step pays for warm-up
    final = history[-1] if history else {}
    return {
        "method": cfg.method["name"],
        "model": cfg.model,
        "output": cfg.output,
        "steps": len(history),
        "epochs": final.get("epoch"),
        "resumed_from": start,
        "trainable": tuned.num_trainable(),
        "model_parameters": sum(p.numel() for p in tuned.model.parameters()),
        "stored_bytes": tuned.stored_bytes(),
        "seconds_per_step": sorted(timed)[len(timed) // 2] if timed else None,
        "tokens_per_s": tokens / sum(step_times) if step_times else None,
        "peak_memory_bytes": peak_memory_bytes(device),
        "final": {k: v for k, v in final.items() if k.startswith("eval_") or k == "loss"},
        "history": history,
    }
