"""Multi-task training: several classification data sets in one run, one head each, one shared delta.

``data: {multitask: [{name: tweets, labels: [negative, positive]}, {name: bbc}]}``. Each item is a data section of
its own (task ``classification`` with a head); a key set beside ``multitask`` (``max_length``, ``max_train``, ...) is
the default of every item, and an item's own value wins.

The model is loaded once for classification and its head module (``classifier`` / ``score``) is replaced by
``TaskHeads``: one copy of the head per task, each with its own number of classes, all fresh and trained fully next
to whatever delta the method builds (``core/fresh_head.py``: the names ``classifier.heads.<t>.*`` are marked).

A task id selects what each forward pass uses: ``active_task(model, t)`` calls ``deltatune_select_task(t)`` on
every module of the model (and of its delta) that has one: ``TaskHeads`` switches head, a method whose delta is
task-conditioned (adapters a hypernetwork generates per task) switches the adapters it generates. A method without such a module
trains one shared delta for every task (the "shared adapter" multi-task baseline).

Batches: the training examples of all tasks in one list, drawn by the loop's seeded order, so each task's share of
a batch follows its share of the training examples (proportional sampling; a part's ``weight`` scales its share as
in ``data.mix``, round(w x n) examples). A batch holds examples of several tasks: ``collate`` pads each task's rows
apart, and ``loss`` runs one forward per task present, each with its task selected; the batch loss is the mean
cross-entropy over all its examples (each task's weighted by its count), and each task's mean is logged as
``loss/<task>``. Evaluation runs every task's eval split under its own task id: ``<task>/accuracy``,
``<task>/loss``, and ``accuracy`` / ``loss`` as their unweighted means over tasks (what early stopping reads).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from deltatune.core import fresh_head
from deltatune.data import models, rows
from deltatune.data.config import DataConfig, part_message
from deltatune.data.tasks import (
    HeadClassificationTask,
    Loaded,
    Task,
    _unwrap,
    build_task,
    model_request,
)
from deltatune.errors import DeltatuneError

SELECT = "deltatune_select_task"  # the method a task-conditioned module offers: SELECT(index)
HEAD_NAMES = ("classifier", "score")  # the head module a sequence-classification model calls


# ---------------------------------------------------------------- the data section


def resolve_parts(cfg: DataConfig) -> list[DataConfig]:
    """``data.multitask``'s items as data sections: the keys set beside the list are every item's defaults."""
    items = cfg.multitask
    if not isinstance(items, list) or len(items) < 2:
        raise DeltatuneError(f"data.multitask={items!r} must list at least two data sections (one per task)")
    if cfg.mix is not None:
        raise DeltatuneError("data.multitask and data.mix cannot be combined: each task is one data section")
    if cfg.name is not None or cfg.path is not None:
        raise DeltatuneError("data.multitask names its sources in its items; set data.multitask[i].name or .path "
                             "and not beside the list")
    defaults = DataConfig.__dataclass_fields__
    skip = {"multitask", "mix", "name", "path", "weight"}
    top = {k: getattr(cfg, k) for k in defaults if k not in skip and getattr(cfg, k) != defaults[k].default}
    parts = []
    for i, item in enumerate(items):
        try:
            if isinstance(item, DataConfig):
                part = dataclasses.replace(item, **{k: v for k, v in top.items()
                                                    if getattr(item, k) == defaults[k].default})
            elif isinstance(item, dict):
                if item.get("multitask") is not None or item.get("mix") is not None:
                    raise DeltatuneError("an item of data.multitask is one data section, not a list of them")
                part = DataConfig(**{**top, **item})
            else:
                raise DeltatuneError(f"{item!r} must be a data section (a mapping with name or path, ...)")
        except TypeError as e:  # an unknown key
            names = [f.name for f in dataclasses.fields(DataConfig) if f.name not in ("mix", "multitask")]
            raise DeltatuneError(f"data.multitask[{i}]: {e}; an item takes the keys of a data section "
                                 f"({', '.join(names)})") from e
        except DeltatuneError as e:
            raise DeltatuneError(part_message(str(e), i).replace(f"data[{i}]", f"data.multitask[{i}]")) from e
        if part.task != "classification" or part.head is False or part.packing:
            raise DeltatuneError(f"data.multitask[{i}]: multi-task training gives each task a classification head; "
                                 "set task: classification (with a head, no packing) in every item")
        parts.append(part)
    return parts


def task_names(parts: list[DataConfig]) -> list[str]:
    """Each part's name: its shipped set or its file's stem, made unique with -2, -3, ..."""
    out: list[str] = []
    for part in parts:
        base = part.name or Path(str(part.path)).stem
        name, n = base, 1
        while name in out:
            n += 1
            name = f"{base}-{n}"
        out.append(name)
    return out


# ---------------------------------------------------------------- selecting a task


@contextlib.contextmanager
def active_task(model: nn.Module, index: int) -> Iterator[None]:
    """Select task ``index`` in every task-conditioned module of ``model`` (a Tuned: its delta too) for the block."""
    selectors = [m for m in model.modules() if callable(getattr(type(m), SELECT, None))]
    before = [getattr(m, "task", 0) for m in selectors]
    for m in selectors:
        getattr(m, SELECT)(index)
    try:
        yield
    finally:
        for m, t in zip(selectors, before, strict=True):
            getattr(m, SELECT)(t)


def carried_tasks(model: nn.Module) -> list[str] | None:
    """The task names of the ``TaskHeads`` a multi-task model carries (None: a single-task model)."""
    for m in _unwrap(model).modules():
        if isinstance(m, TaskHeads):
            return list(m.names)
    return None


class TaskHeads(nn.Module):
    """One classification head per task; the selected one (``task``) computes the logits."""

    def __init__(self, heads: list[nn.Module], names: list[str]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.names = list(names)
        self.task = 0

    def deltatune_select_task(self, index: int) -> None:
        if not 0 <= index < len(self.heads):
            raise DeltatuneError(f"task {index} does not exist: the model has {len(self.heads)} task heads")
        self.task = int(index)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.heads[self.task](*args, **kwargs)


def _head_for(head: nn.Module, num_labels: int, init: Any) -> nn.Module:
    """A copy of ``head`` whose last Linear has ``num_labels`` outputs, every Linear of it freshly initialised."""
    new = copy.deepcopy(head)
    linears = [(n, m) for n, m in new.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise DeltatuneError(f"the classification head {type(head).__name__} has no Linear layer to size per task")
    name, last = linears[-1]
    out = nn.Linear(last.in_features, num_labels, bias=last.bias is not None).to(last.weight.device, last.weight.dtype)
    if name:
        new.set_submodule(name, out)
    else:
        new = out
    for m in new.modules():
        if isinstance(m, nn.Linear):
            init(m)
    return new


def _init_linear(model: nn.Module, task: int) -> Any:
    """N(0, initializer_range) weights and zero biases from a generator seeded by the task's index: like the loader's
    fresh head, every load makes the same heads, so an artifact's fingerprint matches the model ``eval`` loads."""
    std = float(getattr(model.config, "initializer_range", 0.02))
    generator = torch.Generator().manual_seed(1_000 + task)

    def init(m: nn.Linear) -> None:
        with torch.no_grad():
            m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * std)
            if m.bias is not None:
                m.bias.zero_()

    return init


def add_task_heads(model: nn.Module, num_labels: list[int], names: list[str]) -> TaskHeads:
    """Replace the model's classification head by ``TaskHeads`` (one fresh copy per task) and mark them fresh."""
    base = _unwrap(model)
    attr = next((n for n in HEAD_NAMES if isinstance(getattr(base, n, None), nn.Module)), None)
    if attr is None:
        raise DeltatuneError(f"multi-task training needs a sequence-classification model with a `classifier` or "
                             f"`score` head, not a {type(base).__name__}; use an encoder such as minilm-l6")
    head = getattr(base, attr)
    heads = TaskHeads([_head_for(head, n, _init_linear(base, t)) for t, n in enumerate(num_labels)], names)
    setattr(base, attr, heads)
    fresh_head.mark(base, [f"{attr}.{n}" for n, _ in heads.named_parameters()])
    return heads


# ---------------------------------------------------------------- the task


class MultiTask(Task):
    """Several head-classification tasks on one model; see the module docstring."""

    kind = "classification-multitask"

    def __init__(self, cfg: DataConfig, tokenizer: Any, tasks: list[HeadClassificationTask], names: list[str]) -> None:
        self.tasks, self.names = tasks, names
        parts = cfg.parts()
        trains = [[{**f, "task": t} for f in task.train] for t, task in enumerate(tasks)]
        train = rows.mix(trains, [p.weight for p in parts], cfg.seed)
        held = [{**f, "task": t} for t, task in enumerate(tasks) for f in task.eval]
        super().__init__(cfg, tokenizer, train, held, None)
        self._losses: dict[str, list[float]] = {}

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}: {len(t.train)}/{len(t.eval)}" for n, t in zip(self.names, self.tasks, strict=True))
        return f"MultiTask({inner})"

    def collate(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """Each task's rows padded apart, keys ``<task index>.<key>``."""
        out: dict[str, torch.Tensor] = {}
        for t, task in enumerate(self.tasks):
            mine = [f for f in features if f["task"] == t]
            if mine:
                out.update({f"{t}.{k}": v for k, v in task.collate(mine).items()})
        return out

    @staticmethod
    def split(batch: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
        """A collated batch as {task index: that task's batch}."""
        out: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in batch.items():
            t, _, k = key.partition(".")
            out.setdefault(int(t), {})[k] = value
        return out

    def use_loss_terms(self, terms: Any) -> None:
        super().use_loss_terms(terms)
        for task in self.tasks:
            task.use_loss_terms(terms)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        total: torch.Tensor | None = None
        count, n_tok = 0, 0
        for t, sub in sorted(self.split(batch).items()):
            n = len(sub["labels"])
            with active_task(model, t):
                loss, tok = self.tasks[t].loss(model, sub)
            self._losses.setdefault(self.names[t], []).append(float(loss.detach()))
            total = loss * n if total is None else total + loss * n
            count, n_tok = count + n, n_tok + tok
        if total is None:
            raise DeltatuneError("an empty multi-task batch: raise train.batch_size")
        return total / count, n_tok

    def scores(self, model: nn.Module, batch: dict[str, torch.Tensor], task: int) -> torch.Tensor:
        """Task ``task``'s class scores for its batch (one task's keys, not prefixed)."""
        with active_task(model, task):
            return self.tasks[task].scores(model, batch)

    def take_metrics(self) -> dict[str, float]:
        """The mean loss of each task over the step's micro-batches (``loss/<task>``), then cleared."""
        out = {f"loss/{name}": sum(v) / len(v) for name, v in self._losses.items()}
        self._losses = {}
        return out

    def _evaluate(self, model: nn.Module, batch_size: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for t, (name, task) in enumerate(zip(self.names, self.tasks, strict=True)):
            with active_task(model, t):
                metrics = task._evaluate(model, batch_size)
            out.update({f"{name}/{k}": v for k, v in metrics.items()})
        for key in ("loss", "accuracy"):
            out[key] = sum(out[f"{n}/{key}"] for n in self.names) / len(self.names)
        return out


def _check_model(model: nn.Module) -> None:
    base = _unwrap(model)
    if not type(base).__name__.endswith("ForSequenceClassification"):
        raise DeltatuneError(f"multi-task training needs a sequence-classification model, not a {type(base).__name__}")


def build_multitask(cfg: DataConfig, tokenizer: Any, model: nn.Module) -> MultiTask:
    """The multi-task task on a model that carries ``TaskHeads`` (as ``load_multitask`` makes it)."""
    parts, names = cfg.parts(), task_names(cfg.parts())
    base = _unwrap(model)
    heads = next((m for m in base.modules() if isinstance(m, TaskHeads)), None)
    if heads is None or heads.names != names:
        raise DeltatuneError(f"data.multitask has the tasks {names}, but the model carries "
                             f"{'no task heads' if heads is None else heads.names}; load it with "
                             "deltatune.data.tasks.load_for_task(cfg, model)")
    tasks = []
    saved = base.config.num_labels
    try:
        for i, (part, head) in enumerate(zip(parts, heads.heads, strict=True)):
            outputs = [m for m in head.modules() if isinstance(m, nn.Linear)][-1].out_features
            base.config.num_labels = outputs  # the single-task builder checks the head's size against the data
            try:
                task = build_task(dataclasses.replace(part, weight=1.0), tokenizer, model)  # weight: MultiTask's
            except DeltatuneError as e:
                raise DeltatuneError(f"data.multitask[{i}]: {e}") from e
            if not isinstance(task, HeadClassificationTask):
                raise DeltatuneError(f"data.multitask[{i}] is not classification with a head")
            tasks.append(task)
    finally:
        base.config.num_labels = saved
    return MultiTask(cfg, tokenizer, tasks, names)


def load_multitask(cfg: DataConfig, model_name: str, quantization: dict[str, Any] | None = None) -> Loaded:
    """The model loaded for classification with one fresh head per task, its tokenizer and the ``MultiTask``."""
    parts = cfg.parts()
    names = task_names(parts)
    requests = []
    for i, part in enumerate(parts):
        try:
            request = model_request(dataclasses.replace(part, weight=1.0), model_name)
        except DeltatuneError as e:
            raise DeltatuneError(f"data.multitask[{i}]: {e}") from e
        if request.get("task") != "classification":
            raise DeltatuneError(f"data.multitask[{i}]: {model_name!r} would score label words, not train a head; "
                                 "set head: true (or use an encoder such as minilm-l6)")
        requests.append(request)
    quant = dict(quantization or {})
    if "compute_dtype" in quant:
        quant["compute_dtype"] = getattr(torch, quant["compute_dtype"])
    model = models.load(model_name, **requests[0], **quant)
    _check_model(model)
    add_task_heads(model, [r["num_labels"] for r in requests], names)
    tokenizer = models.load_tokenizer(model_name)
    return Loaded(model, tokenizer, build_multitask(cfg, tokenizer, model))


def cross_entropy_by_task(task: MultiTask, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each task's mean cross-entropy on a collated batch (no gradient): for tests and scripts."""
    out = {}
    with torch.no_grad():
        for t, sub in task.split(batch).items():
            scores = task.scores(model, sub, t)
            out[task.names[t]] = float(F.cross_entropy(scores, sub["labels"].to(scores.device)))
    return out
