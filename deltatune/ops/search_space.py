"""The search section of ``deltatune search``: its settings, the space over a run config and the objectives.

A space maps dotted keys of a run config to the values a trial may give them::

    method.name: [lora, adapter]           # choices (any YAML values: lists too)
    method.r: [4, 8, 16]
    train.lr: {log: [1.0e-5, 1.0e-2]}      # a log-uniform range (whole numbers at both ends: integers)
    train.steps: {range: [20, 60], step: 20}

A ``method.KEY`` applies to a trial whose method has the option ``KEY`` (``deltatune methods NAME``); for another
method it is not suggested at all (the space is conditional), and the base config's method options that the
chosen method lacks are dropped too, so one base config serves every method of the space. Everything is checked
before any trial: the problems of a bad space are raised together in one error.

``encode`` / ``decode`` turn values into optuna's parameters and back: optuna's categorical choices must be
None, bool, int, float or str, so the choices of a key that holds any other value (a list of targets) are stored
as JSON text, all of that key's choices alike (a text choice that looks like JSON is never mistaken for a list).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deltatune.core import registry
from deltatune.core.options import set_dotted
from deltatune.errors import DeltatuneError

SAMPLERS = ("tpe", "nsga2", "random", "botorch")
DIRECTIONS = {"maximize": "maximize", "max": "maximize", "minimize": "minimize", "min": "minimize"}
# objectives every run has (the cost side); the metric objectives come from the dev evaluation, by task
COSTS = {"trainable": "trainable parameters", "peak_memory": "peak memory (bytes)",
         "seconds_per_step": "seconds per step"}
METRICS = {"classification": ("accuracy", "loss"), "text": ("loss", "perplexity"), "chat": ("loss", "perplexity"),
           "edit": ("edit_success", "token_accuracy", "loss")}
SETTINGS = ("space", "trials", "objectives", "sampler", "seed", "startup", "dev_size", "study", "reference",
            "refit_seeds", "pruner")
PRUNERS = ("none", "median", "hyperband")
SEARCHABLE = ("model", "data", "method", "train")  # a run config's sections a key may name (not its output)
PLACEHOLDER_OUTPUT = "runs/deltatune-search-trial"  # validation only: a trial sets its own output

# a validator: the problems of a run config mapping (one line each), [] when it is good
Validator = Callable[[dict[str, Any]], list[str]]


@dataclass(frozen=True)
class Dimension:
    """One key of the space: a list of choices, or a numeric range (``log``: log-uniform; ``step``: a grid)."""

    key: str
    choices: tuple[Any, ...] | None = None
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    as_json: bool = False  # the choices are stored as JSON text (some choice is not a plain scalar)
    # a dimension of a method's declared space (``space: NAME``): not a run config key; the method named here turns
    # the trial's values of its dimensions into its options (its module's ``options_from_search``)
    owner: str | None = None

    @property
    def is_method_option(self) -> bool:
        return self.owner is None and self.key.startswith("method.") and self.key != "method.name"

    @property
    def integer(self) -> bool:
        return self.choices is None and all(isinstance(v, int) for v in (self.low, self.high))

    def samples(self) -> list[Any]:
        """Values that stand for the dimension when it is checked: every choice, or both ends of the range."""
        return list(self.choices) if self.choices is not None else [self.low, self.high]


@dataclass
class Search:
    """A parsed ``search:`` section."""

    space: list[Dimension]
    objectives: dict[str, str]  # name -> maximize | minimize, in the study's order
    trials: int = 20
    sampler: str = "tpe"
    seed: int = 0
    startup: int | None = None  # random trials before the sampler models (None: a third of trials, 2 to 10)
    dev_size: int | None = None  # dev examples carved from the training data (None: as many as the eval split)
    study: str = "deltatune-search"
    reference: dict[str, float] = field(default_factory=dict)  # hypervolume reference point (default: worst seen)
    refit_seeds: int = 3  # seeds of each configuration --refit trains again
    pruner: str = "none"  # none | median | hyperband: stop a trial whose dev metric lags at its intermediate evals

    @property
    def n_startup(self) -> int:
        return self.startup if self.startup is not None else max(2, min(10, self.trials // 3))

    def record(self) -> dict[str, Any]:
        """What decides the study (a resumed search must share it): everything but the number of trials."""
        d = dataclasses.asdict(self)
        d.pop("trials")
        d.pop("refit_seeds")  # the refit comes after the study: it does not change it
        if d["pruner"] == "none":  # a study made before pruners existed resumes
            d.pop("pruner")
        return json.loads(json.dumps(d, default=str))


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def _number(value: Any) -> float | int | None:
    """A range's end: a number, or text YAML did not read as one (``1e-5`` without a dot is text in YAML 1.1)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _dimension(key: str, spec: Any, problems: list[str]) -> Dimension | None:
    where = f"search.space.{key}"
    if isinstance(spec, list | tuple):
        if not spec:
            problems.append(f"{where}: an empty list of choices (give at least one value)")
            return None
        as_json = not all(_scalar(v) for v in spec)
        if len({json.dumps(v, sort_keys=True) for v in spec}) != len(spec):
            problems.append(f"{where}={list(spec)!r}: a choice is listed twice")
            return None
        return Dimension(key, choices=tuple(spec), as_json=as_json)
    if not isinstance(spec, dict):
        problems.append(f"{where}={spec!r}: give a list of choices, {{range: [low, high]}} or {{log: [low, high]}}")
        return None
    kinds = [k for k in ("range", "log") if k in spec]
    extra = [k for k in spec if k not in ("range", "log", "step")]
    if len(kinds) != 1 or extra:
        what = f"unknown key(s) {', '.join(map(str, extra))}" if extra else "give exactly one of range, log"
        problems.append(f"{where}: {what} (a range is {{range: [low, high]}} or {{log: [low, high]}}, "
                        "with an optional step)")
        return None
    kind = kinds[0]
    ends = spec[kind]
    if not isinstance(ends, list | tuple) or len(ends) != 2 or any(_number(v) is None for v in ends):
        problems.append(f"{where}.{kind}={ends!r}: give two finite numbers [low, high]")
        return None
    low, high = (_number(v) for v in ends)
    step = spec.get("step")
    if step is not None and (_number(step) is None or _number(step) <= 0):  # type: ignore[operator]
        problems.append(f"{where}.step={step!r}: must be a number > 0")
        return None
    step = _number(step) if step is not None else None
    if not low < high:  # type: ignore[operator]
        problems.append(f"{where}.{kind}=[{low}, {high}]: an empty range (low must be below high)")
        return None
    if kind == "log" and low <= 0:  # type: ignore[operator]
        problems.append(f"{where}.log=[{low}, {high}]: a log range needs low > 0")
        return None
    if kind == "log" and step is not None:
        problems.append(f"{where}: step does not go with log (optuna samples a log range continuously)")
        return None
    if not all(isinstance(v, int) for v in (low, high, step if step is not None else 1)):
        low, high = float(low), float(high)  # type: ignore[arg-type]
        step = float(step) if step is not None else None
    return Dimension(key, low=low, high=high, log=kind == "log", step=step)


DECLARED = "from"  # space: {from: autopeft, train.lr: {log: [...]}}: a method's declared space plus generic keys


def _mapping_space(raw: dict[str, Any], config: dict[str, Any], problems: list[str]) -> list[Dimension]:
    """Generic dimensions, after the declared space of the method named by ``from`` when there is one."""
    declared = raw.get(DECLARED)
    space = declared_space(str(declared), config, problems) if declared is not None else []
    owned = {d.key for d in space}
    for key, spec in raw.items():
        if key == DECLARED:
            continue
        if declared is not None and (key in owned or key == "method.name"):
            problems.append(f"search.space.{key}: already decided by the {declared!r} space (from: {declared}); "
                            "remove it")
            continue
        dim = _dimension(str(key), spec, problems)
        if dim is not None:
            space.append(dim)
    return space


def parse_search(raw: Any, config: dict[str, Any], validate: Validator) -> Search:
    """The ``search`` section of ``config`` (a run config mapping plus ``search:``) checked against the config: one
    DeltatuneError lists every problem of the space, the objectives and the settings, before any trial runs."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise DeltatuneError("a search config is a run config with a search: section, e.g. search: {space: "
                             "{method.r: [4, 8, 16]}, trials: 20, objectives: {accuracy: maximize, trainable: "
                             f"minimize}}}}; got search={raw!r}")
    for key in raw:
        if key not in SETTINGS:
            problems.append(f"unknown key search.{key}{registry.did_you_mean(str(key), list(SETTINGS))}")
    space_raw = raw.get("space")
    space: list[Dimension] = []
    if isinstance(space_raw, str):
        space = declared_space(space_raw, config, problems)
    elif not isinstance(space_raw, dict) or not space_raw:
        problems.append(f"search.space={space_raw!r}: give a mapping of run config keys to choices or ranges, "
                        "e.g. {method.r: [4, 8, 16], train.lr: {log: [1.0e-5, 1.0e-2]}}, or the name of a "
                        "method that declares its space (space: autopeft), or both ({from: autopeft, train.lr: "
                        "{log: [1.0e-4, 1.0e-2]}})")
    else:
        space = _mapping_space(space_raw, config, problems)
    settings = _settings(raw, problems)
    methods = _methods(space, config, problems)
    problems += _key_problems(space, config, methods, validate)
    objectives = _objectives(raw.get("objectives"), config, problems)
    reference = _reference(raw.get("reference"), objectives, problems)
    if settings["pruner"] not in ("none", None):
        problems += _pruner_problems(objectives, config)
    if problems:
        raise DeltatuneError(registry.problem_list("bad search config", list(dict.fromkeys(problems))))
    return Search(space=space, objectives=objectives, reference=reference, **settings)


def botorch_installed() -> bool:
    """Whether AutoPEFT's own acquisition (qNEHVI through optuna-integration's BoTorch sampler) can run here."""
    try:  # optuna_integration is a lazy module (no __spec__ once imported): try the imports themselves
        import botorch  # noqa: F401
        from optuna_integration import BoTorchSampler  # noqa: F401
    except ImportError:
        return False
    return True


def _settings(raw: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, least, default in (("trials", 1, 20), ("seed", 0, 0), ("startup", 0, None), ("dev_size", 1, None),
                                ("refit_seeds", 1, 3)):
        value = raw.get(key, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            problems.append(f"search.{key}={value!r}: must be a whole number >= {least}")
        out[key] = value
    sampler = raw.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        problems.append(f"search.sampler={sampler!r}: allowed are {', '.join(SAMPLERS)}")
    elif sampler == "botorch" and not botorch_installed():
        problems.append("search.sampler=botorch needs the optional extra: pip install 'deltatune[search]' "
                        "(optuna-integration and botorch), or choose sampler tpe")
    pruner = raw.get("pruner", "none")
    if pruner not in PRUNERS:
        problems.append(f"search.pruner={pruner!r}: allowed are {', '.join(PRUNERS)}")
    study = raw.get("study", "deltatune-search")
    if not isinstance(study, str) or not study.strip():
        problems.append(f"search.study={study!r}: name the study (text)")
    return {**out, "sampler": sampler, "study": study, "pruner": pruner}


def _base_method(config: dict[str, Any]) -> dict[str, Any]:
    method = config.get("method")
    if isinstance(method, str):
        return {"name": method}
    return dict(method) if isinstance(method, dict) else {}


def _methods(space: list[Dimension], config: dict[str, Any], problems: list[str]) -> list[registry.Method]:
    """The methods a trial may train: a declared space's method, ``method.name``'s choices, else the base config's."""
    owner = _owner(space)
    if owner is not None:
        return [registry.get(owner)]
    names = next((list(d.choices or ()) for d in space if d.key == "method.name"), None)
    where = "search.space.method.name"
    if names is None:
        names = [_base_method(config).get("name")] if _base_method(config).get("name") is not None else []
        where = "method.name"
    found = []
    for name in names:
        try:
            found.append(registry.get(str(name)))
        except DeltatuneError as e:
            problems.append(f"{where}: {e}")
    return found


def _key_problems(space: list[Dimension], config: dict[str, Any], methods: list[registry.Method],
                  validate: Validator) -> list[str]:
    """Unknown keys and values a run config would refuse: a method option against every searched method that has
    it, any other key by validating the base config with each of its values (the base's own problems once)."""
    problems: list[str] = []
    base = {k: v for k, v in config.items() if k != "search"}
    base.setdefault("output", PLACEHOLDER_OUTPUT)
    base_problems = [] if not methods else _base_problems(base, methods, validate)
    problems += base_problems
    for dim in space:
        section = dim.key.split(".", 1)[0]
        if dim.key == "method.name" or dim.owner is not None:  # a declared dimension: checked where it is declared
            continue
        if section not in SEARCHABLE or (section != "model" and "." not in dim.key) or \
                (section == "model" and dim.key != "model"):
            problems.append(f"search.space: unknown key {dim.key!r}: keys are run config keys such as model, "
                            "method.r, train.lr, data.max_length (not output)")
            continue
        if dim.is_method_option:
            problems += _option_problems(dim, methods)
            continue
        for value in dim.samples():
            trial = copy.deepcopy(base)
            if methods:  # as a trial runs it: the base's method options cut to a searched method's
                trial["method"] = applicable(methods[0], _base_method(base))
            set_dotted(trial, dim.key, value)
            problems += [f"search.space.{dim.key}: {p}" for p in validate(trial) if p not in base_problems]
    return problems


def _base_problems(base: dict[str, Any], methods: list[registry.Method], validate: Validator) -> list[str]:
    """The base config's problems with each searched method in it (its inapplicable options dropped)."""
    problems: list[str] = []
    for method in methods:
        trial = copy.deepcopy(base)
        trial["method"] = applicable(method, _base_method(base))
        problems += validate(trial)
    return problems


def _option_problems(dim: Dimension, methods: list[registry.Method]) -> list[str]:
    option = dim.key.removeprefix("method.")
    having = [m for m in methods if option in option_names(m)]
    if not having:
        near = registry.did_you_mean(option, sorted({n for m in methods for n in option_names(m)}))
        names = ", ".join(m.name for m in methods) or "(none)"
        return [f"search.space: unknown key {dim.key!r}: no searched method ({names}) has the option "
                f"{option!r}{near}"]
    problems = []
    for method in having:
        for value in dim.samples():
            problems += [f"search.space.{dim.key} for {method.name}: {p}"
                         for p in registry.config_problems(method, {option: value})]
    return problems


def option_names(method: registry.Method) -> list[str]:
    return [f.name for f in dataclasses.fields(method.config_cls)]


def applicable(method: registry.Method, options: dict[str, Any]) -> dict[str, Any]:
    """``{"name": method, ...}`` with only the options ``method`` has: another method's options are dropped."""
    names = option_names(method)
    return {"name": method.name, **{k: v for k, v in options.items() if k in names}}


def _task(config: dict[str, Any]) -> str:
    data = config.get("data")
    if isinstance(data, list):
        data = data[0] if data and isinstance(data[0], dict) else {}
    return str((data or {}).get("task", "classification")) if isinstance(data, dict) else "classification"


def default_objectives(config: dict[str, Any]) -> dict[str, str]:
    metric = METRICS.get(_task(config), ("loss",))[0]
    return {metric: "minimize" if metric == "loss" else "maximize", "trainable": "minimize"}


def _objectives(raw: Any, config: dict[str, Any], problems: list[str]) -> dict[str, str]:
    if raw is None:
        return default_objectives(config)
    task = _task(config)
    known = [*METRICS.get(task, ()), *COSTS]
    if not isinstance(raw, dict) or not raw:
        problems.append(f"search.objectives={raw!r}: give a mapping of objective to maximize or minimize, e.g. "
                        "{accuracy: maximize, trainable: minimize}")
        return {}
    out = {}
    for name, direction in raw.items():
        if name not in known:
            problems.append(f"search.objectives: {name!r} is not an objective of task {task!r}"
                            f"{registry.did_you_mean(str(name), known)} (objectives: {', '.join(known)})")
        elif direction not in DIRECTIONS:
            problems.append(f"search.objectives.{name}={direction!r}: allowed are maximize, minimize")
        else:
            out[str(name)] = DIRECTIONS[direction]
    return out


def _pruner_problems(objectives: dict[str, str], config: dict[str, Any]) -> list[str]:
    """A pruner judges a trial by its first objective at the run's intermediate evaluations: both must exist."""
    problems = []
    first = next(iter(objectives), None)
    if first is None or first in COSTS:
        problems.append(f"search.pruner: the first objective ({first}) must be a dev metric (accuracy, loss, ...): "
                        "the pruner compares trials by it at their intermediate evaluations")
    every = (config.get("train") or {}).get("eval_every") if isinstance(config.get("train"), dict) else None
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        problems.append(f"search.pruner: train.eval_every={every!r}; give the run intermediate evaluations for the "
                        "pruner to judge (e.g. train.eval_every: 10 with train.steps: 40)")
    return problems


def _reference(raw: Any, objectives: dict[str, str], problems: list[str]) -> dict[str, float]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.append(f"search.reference={raw!r}: give a value per objective, e.g. {{accuracy: 0.2}}")
        return {}
    out = {}
    for name, value in raw.items():
        if name not in objectives:
            problems.append(f"search.reference.{name}: not one of the objectives ({', '.join(objectives)})")
        elif _number(value) is None:
            problems.append(f"search.reference.{name}={value!r}: must be a finite number")
        else:
            out[str(name)] = float(_number(value))  # type: ignore[arg-type]
    return out


# -- encoding: values <-> optuna parameters ---------------------------------------------------------------------
def distribution(dim: Dimension) -> Any:
    """The optuna distribution of a dimension."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if dim.choices is not None:
        return CategoricalDistribution([_encoded(dim, v) for v in dim.choices])
    if dim.integer:
        return IntDistribution(int(dim.low), int(dim.high), log=dim.log, step=int(dim.step or 1))  # type: ignore[arg-type]
    return FloatDistribution(float(dim.low), float(dim.high), log=dim.log, step=dim.step)  # type: ignore[arg-type]


def _encoded(dim: Dimension, value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if dim.as_json else value


def applies(dim: Dimension, method: registry.Method | None) -> bool:
    """Whether the dimension is part of a trial that trains ``method`` (a method option only where it has it)."""
    return not dim.is_method_option or (method is not None and dim.key.removeprefix("method.") in option_names(method))


def chosen_method(space: list[Dimension], values: dict[str, Any], config: dict[str, Any]) -> registry.Method | None:
    name = _owner(space) or values.get("method.name", _base_method(config).get("name"))
    return registry.get(str(name)) if name is not None else None


def encode(space: list[Dimension], values: dict[str, Any]) -> dict[str, Any]:
    """Values of the space's keys as optuna parameters (the JSON text of a non-scalar choice)."""
    by_key = {d.key: d for d in space}
    return {key: _encoded(by_key[key], value) for key, value in values.items()}


def decode(space: list[Dimension], params: dict[str, Any]) -> dict[str, Any]:
    """Optuna parameters as values of the space's keys, in the space's order."""
    out = {}
    for dim in space:
        if dim.key in params:
            value = params[dim.key]
            out[dim.key] = json.loads(value) if dim.as_json else value
    return out


def suggest(trial: Any, space: list[Dimension], config: dict[str, Any]) -> dict[str, Any]:
    """A trial's values: ``method.name`` first, then every key that applies to the chosen method."""
    params: dict[str, Any] = {}
    ordered = sorted(space, key=lambda d: d.key != "method.name")  # stable: the rest keep the space's order
    method = None
    for dim in ordered:
        if dim.key != "method.name" and method is None:
            method = chosen_method(space, decode(space, params), config)
        if not applies(dim, method):
            continue
        params[dim.key] = _suggest_one(trial, dim)
    return decode(space, params)


def _suggest_one(trial: Any, dim: Dimension) -> Any:
    if dim.choices is not None:
        return trial.suggest_categorical(dim.key, [_encoded(dim, v) for v in dim.choices])
    if dim.integer:
        return trial.suggest_int(dim.key, int(dim.low), int(dim.high), step=int(dim.step or 1),  # type: ignore[arg-type]
                                 log=dim.log)
    return trial.suggest_float(dim.key, float(dim.low), float(dim.high), step=dim.step, log=dim.log)  # type: ignore[arg-type]


def trial_config(config: dict[str, Any], space: list[Dimension], values: dict[str, Any]) -> dict[str, Any]:
    """The run config of a trial: the base config (without ``search``) with the values set, and the method's
    section cut to the chosen method's options."""
    out = copy.deepcopy({k: v for k, v in config.items() if k != "search"})
    owned = {d.key for d in space if d.owner is not None}
    for key, value in values.items():
        if key not in owned:
            set_dotted(out, key, copy.deepcopy(value))
    method = chosen_method(space, values, config)
    if method is not None:
        options = _base_method(out)
        if owned:  # the declared space's values become the method's options (they win over the base's)
            options.update(declared_hooks(method)[1]({k: v for k, v in values.items() if k in owned},
                                                     model_config(out)))
        out["method"] = applicable(method, options)
    return out


# -- a space a method declares (space: NAME) ---------------------------------------------------------------------
# A method module may declare a search space of its own: ``search_dimensions(model_config) -> {key: [choices]}``
# and ``options_from_search(values, model_config) -> options``. The search finds them through the registry (the
# module that registered the method), so nothing here names a method; AutoPEFT's space is the one that does.
DECLARE, DECODE = "search_dimensions", "options_from_search"


def declared_hooks(method: registry.Method) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """A method's ``search_dimensions`` and ``options_from_search`` (a DeltatuneError where it declares none)."""
    import sys

    module = sys.modules.get(getattr(method.build, "__module__", ""))
    hooks = (getattr(module, DECLARE, None), getattr(module, DECODE, None))
    if not all(callable(h) for h in hooks):
        raise DeltatuneError(f"method {method.name!r} declares no search space of its own (space: {method.name}); "
                             "give the space as a mapping of run config keys instead")
    return hooks  # type: ignore[return-value]


def model_config(config: dict[str, Any]) -> Any:
    """The transformers config of a run config's model (a shipped name or a folder), read without the weights."""
    from transformers import AutoConfig

    from deltatune.data.models import resolve

    model = config.get("model")
    if not isinstance(model, str):
        raise DeltatuneError(f"model={model!r}: a declared search space needs the model's name or folder")
    return AutoConfig.from_pretrained(resolve(model), local_files_only=True)


def _owner(space: list[Dimension]) -> str | None:
    return next((d.owner for d in space if d.owner is not None), None)


def declared_space(name: str, config: dict[str, Any], problems: list[str]) -> list[Dimension]:
    """The dimensions method ``name`` declares for the run config's model; problems are appended, not raised."""
    try:
        method = registry.get(name)
        declare, decode = declared_hooks(method)
        geometry = model_config(config)
        dims = declare(geometry)
    except DeltatuneError as e:
        problems.append(f"search.space={name!r}: {e}")
        return []
    except (OSError, ValueError) as e:  # a folder without a readable config.json
        problems.append(f"search.space={name!r}: cannot read the model's config: {' '.join(str(e).split())}")
        return []
    space = [Dimension(str(k), choices=tuple(v), owner=method.name) for k, v in dims.items()]
    for pick in (0, -1):  # both ends of every dimension must give options the method takes
        values = {d.key: d.choices[pick] for d in space}  # type: ignore[index]
        problems += [f"search.space={name!r}: {p}" for p in registry.config_problems(method, decode(values, geometry))]
    return space
