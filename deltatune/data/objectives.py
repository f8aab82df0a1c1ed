"""Training objectives: what ``train.objective`` names, the options each takes and the data task it trains on.

``train.objective`` is a name or a mapping like the method section: ``objective: dpo`` or ``objective: {name: dpo,
beta: 0.1}``. ``sft`` (the default) is the data task's own loss (next-token cross-entropy, classification
cross-entropy, ...); the others are registered here with an options dataclass (its fields' trailing comments are
their meanings, as for a method's options) and the data task they need:

    register("dpo", preference.DPO, task="preference", summary="...")

An objective that needs a task trains on that task only, and that task trains with such an objective only: the
config check names the key to change before anything loads.

Each objective also says which evaluation metric judges it (``metric``, ``eval_<metric>`` in a run's records: the
default of ``train.early_stopping.metric``; ``eval_loss`` unless it says otherwise, GRPO's is ``eval_reward``,
higher is better) and, where its loss value alone carries no signal, why it needs gradients (``gradients``: a
method that trains from forward passes, zeroth-order, is refused with that reason when the config is read).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from deltatune.core import registry
from deltatune.data import grpo, preference
from deltatune.errors import DeltatuneError

DEFAULT = "sft"


@dataclass(frozen=True)
class Objective:
    name: str
    options: type  # a dataclass: the objective's options with their defaults
    task: str | None = None  # the data task it trains on (data.task); None: the task's own loss, any task
    summary: str = ""
    metric: str = "loss"  # the evaluation metric that judges it (early stopping's default: eval_<metric>)
    gradients: str | None = None  # why it needs gradients (its loss value says nothing); None: a value will do

    @property
    def eval_metric(self) -> str:
        """The key of its headline evaluation metric in a run's records (``eval_loss``, ``eval_reward``)."""
        return f"eval_{self.metric}"


@dataclass
class SFT:
    """The data task's own loss; it takes no options."""


_OBJECTIVES: dict[str, Objective] = {}


def register(name: str, options: type, *, task: str | None = None, summary: str = "", metric: str = "loss",
             gradients: str | None = None) -> Objective:
    """Make ``train.objective: NAME`` available: its options dataclass, the data task it trains on, the evaluation
    metric that judges it and (``gradients``) why it cannot train from forward passes alone."""
    if not dataclasses.is_dataclass(options):
        raise TypeError(f"the options of objective {name!r} must be a dataclass, got {options!r}")
    _OBJECTIVES[name] = Objective(name, options, task, summary, metric, gradients)
    return _OBJECTIVES[name]


def names() -> list[str]:
    return list(_OBJECTIVES)


def get(name: str) -> Objective:
    if name not in _OBJECTIVES:
        raise DeltatuneError(f"unknown objective {name!r}{registry.did_you_mean(name, names())}; train.objective is "
                             f"one of {', '.join(names())}")
    return _OBJECTIVES[name]


def _split(value: Any) -> tuple[str, dict[str, Any]]:
    """(name, options) of ``train.objective``: a name, or a mapping with ``name`` and options."""
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        return value["name"], {k: v for k, v in value.items() if k != "name"}
    if isinstance(value, dict):
        raise DeltatuneError(f"train.objective={value!r} has no name: set train.objective.name to one of "
                             f"{', '.join(names())} (--set train.objective.name=dpo)")
    raise DeltatuneError(f"train.objective={value!r}: give a name ({', '.join(names())}) or a mapping with a "
                         "name and options, e.g. {name: dpo, beta: 0.1}")


def problems(value: Any) -> list[str]:
    """Every problem of a ``train.objective`` value, one per line: the name, unknown keys, bad values."""
    try:
        name, values = _split(value)
        objective = get(name)
    except DeltatuneError as e:
        return [str(e)]
    fields = [f.name for f in dataclasses.fields(objective.options)]
    hints = typing.get_type_hints(objective.options)
    out = []
    for key, given in values.items():
        if key not in fields:
            hint = registry.did_you_mean(key, fields) if fields else f" ({name} takes no options)"
            out.append(f"unknown key train.objective.{key} for {name}{hint}")
        elif not registry._is_instance(given, hints[key]):
            out.append(f"train.objective.{key}={given!r}: should be {registry.type_name(hints[key])}")
    if not out:
        try:
            objective.options(**values)
        except (TypeError, ValueError, DeltatuneError) as e:
            out.append(f"train.objective ({name}): {e}")
    return out


def parse(value: Any) -> tuple[Objective, Any]:
    """The objective ``train.objective`` names and its options (an instance of its dataclass)."""
    found = problems(value)
    if found:
        raise DeltatuneError(registry.problem_list("bad train.objective", found))
    name, values = _split(value)
    objective = get(name)
    return objective, objective.options(**values)


def task_problem(objective: Objective, task: str) -> str | None:
    """Why ``objective`` cannot train on data task ``task`` (``data.task``, or a task's ``kind``), or None."""
    kind = task.split("-")[0]  # a task's kind: "classification-head" is data.task classification
    if objective.task is not None and kind != objective.task:
        return (f"train.objective {objective.name!r} trains on {objective.task} data, but data.task is {kind!r}; set "
                f"data.task: {objective.task}{_rows_hint(objective.task)}, or train.objective: {DEFAULT}")
    needing = [o.name for o in _OBJECTIVES.values() if o.task == kind]
    if objective.task is None and needing:
        return (f"data.task {kind!r} needs an objective made for it, not {objective.name!r}; set train.objective to "
                f"one of {', '.join(needing)}")
    return None


def _rows_hint(task: str) -> str:
    return {"preference": " (rows with prompt, chosen and rejected)",
            "prompts": " (rows with a prompt and the columns the rewards read)"}.get(task, "")


def method_problem(objective: Objective, method: str, options: dict[str, Any] | None = None) -> str | None:
    """Why ``method`` (with its ``options``) cannot train with ``objective``, or None: an objective that needs
    gradients refuses a method that trains from forward passes (the registry's ``gradient_free`` trait)."""
    if objective.gradients is None or method not in registry.names():
        return None
    try:
        free = registry.get(method).has("gradient_free", options)
    except DeltatuneError:
        return None  # bad method options: said by the method's own check
    if not free:
        return None
    return (f"train.objective {objective.name} needs gradients ({objective.gradients}), but {method!r} trains from "
            "forward passes (its policy takes the whole step); use a method that trains by gradients, or another "
            "objective")


def eval_metric(value: Any) -> str:
    """The headline evaluation metric (``eval_loss``, ``eval_reward``) of a ``train.objective`` value; eval_loss for
    a value that does not parse (its problems are said elsewhere)."""
    try:
        return get(_split(value)[0]).eval_metric
    except DeltatuneError:
        return "eval_loss"


register(DEFAULT, SFT, summary="the data task's own loss (the default)")
register("dpo", preference.DPO, task="preference", summary="DPO: -log σ(β Δ) of summed log-ratios to the base")
register("ipo", preference.IPO, task="preference", summary="IPO: (Δ̄ - 1/(2β))² of per-token log-ratios")
register("simpo", preference.SimPO, task="preference", summary="SimPO: -log σ(β ā_w - β ā_l - γ), no reference")
register("orpo", preference.ORPO, task="preference", summary="ORPO: NLL(chosen) - λ log σ(log odds ratio)")
register("grpo", grpo.GRPOOptions, task=grpo.KIND, metric="reward", gradients=grpo.WHY_GRADIENTS,
         summary="GRPO: sampled groups scored by reward functions, clipped surrogate of group-normalised advantages")
