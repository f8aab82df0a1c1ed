"""The run config: one schema for ``deltatune train CONFIG.yaml`` and ``dt.train(config)``.

A config is a YAML file, a mapping, or the name of a preset that ships with the package
(``deltatune/presets/<name>.yaml``: ``lora``, ``lora-minilm``, ... one or more per method; ``preset_names()``
lists them). The demo and the bench start from the same presets.

    model: smollm2-135m
    data: {name: tweets, task: classification, max_length: 128, eval_fraction: 0.1}
    method: {name: lora, r: 8, alpha: 16, targets: [q_proj, v_proj]}
    train: {steps: 100, batch_size: 8, lr: 2.0e-4, seed: 0, eval_every: 50, save_every: 50}
    output: runs/lora

Validation collects every bad field (its value and what is allowed) into one error.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import json
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deltatune.core import registry
from deltatune.core.options import set_dotted
from deltatune.core.yamlfile import load_yaml
from deltatune.errors import DeltatuneError
from deltatune.train.distributed_fsdp import FsdpSettings
from deltatune.train.token_elimination import TokenEliminationSettings

if typing.TYPE_CHECKING:
    from deltatune.data.tasks import LossTerms

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("auto", "fp32", "bf16")
# Adam-style optimizers move every weight by about lr per step, and weights are of order 0.01-1: a learning rate
# above 10 throws each weight far past its own scale at the first step, and values near float32's limit (3e38)
# overflow in the optimizer. Fine-tuning rates are 1e-5 to 1e-2; prompt tuning's largest are about 0.3.
MAX_LR = 10.0


REPORTERS = ("tensorboard", "csv", "wandb", "mlflow")
# the reporters that write through a package of their own, and how to install it (tensorboard is a dependency)
REPORTER_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}
DEFAULT_STEPS = 100


@dataclass
class EarlyStopping:
    """``train.early_stopping``: stop when the evaluation metric stops improving, and end with the best delta.

    Trainer's names: ``metric`` is ``metric_for_best_model``, ``patience`` is ``early_stopping_patience``,
    ``threshold`` is ``early_stopping_threshold`` and ``mode: max`` is ``greater_is_better: true``. The artifact the
    run writes is the best one (Trainer's ``load_best_model_at_end``)."""

    # a key of the evaluation ("loss" means "eval_loss"); null: the objective's, eval_loss (GRPO: eval_reward)
    metric: str | None = None
    patience: int | None = 3  # evaluations without improvement before the run stops; null: never stop, keep the best
    mode: str | None = None  # "min" | "max"; null: min for a loss, max for anything else (accuracy, reward)
    threshold: float = 0.0  # an evaluation improves on the best only by more than this

    def __post_init__(self) -> None:
        if isinstance(self.metric, str) and self.metric and not self.metric.startswith("eval_"):
            self.metric = f"eval_{self.metric}"  # as Trainer reads metric_for_best_model

    def for_objective(self, objective: Any) -> None:
        """An unset metric becomes the headline of ``train.objective`` (``eval_loss``; GRPO, which has no loss to
        evaluate: ``eval_reward``, higher is better)."""
        if self.metric is None:
            from deltatune.data import objectives

            self.metric = objectives.eval_metric(objective)

    @property
    def greater_is_better(self) -> bool:
        metric = self.metric or "eval_loss"
        return self.mode == "max" if self.mode is not None else not metric.endswith("loss")

    def problems(self, prefix: str = "train.early_stopping") -> list[str]:
        out = []
        if self.metric is not None and not self.metric.removeprefix("eval_"):
            out.append(f"{prefix}.metric={self.metric!r}: name an evaluation metric, e.g. eval_loss")
        if self.patience is not None and self.patience < 1:
            out.append(f"{prefix}.patience={self.patience!r}: must be >= 1 (null: never stop, keep the best)")
        if self.mode not in (None, "min", "max"):
            out.append(f"{prefix}.mode={self.mode!r}: allowed are min, max (null: min for a loss, max otherwise)")
        if not math.isfinite(self.threshold) or self.threshold < 0:
            out.append(f"{prefix}.threshold={self.threshold!r}: must be a finite number >= 0")
        return out


@dataclass
class TrainSettings:
    steps: int = DEFAULT_STEPS  # optimizer steps
    epochs: float | None = None  # passes over the training split instead of steps (Trainer's num_train_epochs)
    batch_size: int = 8  # examples per micro-batch (Trainer's per_device_train_batch_size); GRPO: prompts, each sampled num_generations times
    grad_accum: int = 1  # micro-batches of batch_size per optimizer step
    lr: float = 2e-4  # peak learning rate (presets set each method's own)
    optimizer: str = "adamw"  # adamw | adam | sgd (a method may bring its own, e.g. SpIEL's SM3)
    weight_decay: float = 0.0  # decoupled weight decay of the trained tensors
    # LoRA+ (Hayou et al., 2024): the B factors of low-rank deltas train at loraplus_ratio·lr (paper, PEFT: 16);
    # PEFT's create_loraplus_optimizer groups (biases and norms with B, undecayed); null: off
    loraplus_ratio: float | None = None
    loraplus_lr_embedding: float = 1e-6  # LoRA+: the learning rate of low-rank deltas on embeddings (PEFT's default)
    schedule: str = "linear"  # learning-rate schedule after warmup: constant | linear | cosine (to 0)
    warmup: float = 0.0  # a fraction of steps if < 1, else a number of steps
    max_grad_norm: float | None = 1.0  # None: no clipping
    seed: int = 0  # initial values, batch order, dropout and the policies' draws
    eval_every: int = 0  # 0: evaluate only at the end
    save_every: int = 0  # 0: checkpoint only at the end
    keep_last: int = 2  # checkpoints kept (and the best one, with early_stopping)
    eval_batch_size: int = 16  # examples per evaluation batch
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower steps
    chunked_loss: bool = True  # next-token losses from the hidden states in chunks, never the whole logits (exact)
    # CPU: after each step, hand the heap's freed pages back to the system (glibc's malloc_trim): about 9 % less peak
    # memory, about 17 % more time per step (docs/quantization.md, "The allocator's share")
    trim_memory: bool = False
    # LeMo token elimination (docs/lemo.md): {sparsity, segment, exempt_layers, predictor_every}; null: off
    token_elimination: TokenEliminationSettings | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # FSDP2 instead of DDP under torchrun / accelerate launch with 2+ processes (docs/distributed.md): true, or
    # {mixed_precision: bf16 | null, reshard_after_forward: true}; one process ignores it (a warning); false: DDP
    # unless DELTATUNE_FSDP=1 or an accelerate FSDP config asks for FSDP2
    fsdp: bool | FsdpSettings = False
    progress: bool = True  # a progress bar and the summary table on the terminal
    early_stopping: EarlyStopping | None = None  # judged at every eval_every; the artifact is the best delta
    report_to: list[str] | str = field(default_factory=list)  # tensorboard, csv, wandb, mlflow (logs/metrics.jsonl always)
    # classification loss terms any method can add (deltatune.data.tasks.LossTerms)
    mixup: float = 0.0  # classification: α of mixup, representations mixed in pairs by λ ~ Beta(α, α); 0: off
    contrastive: float = 0.0  # classification: weight w of a supervised contrastive loss, CE + w·SCL; 0: off
    contrastive_temperature: float = 0.1  # τ of the contrastive loss (train.contrastive)
    # the loss: sft (the data task's own), a preference objective on data.task preference: dpo | ipo | simpo | orpo,
    # or grpo on data.task prompts, with options as a mapping like the method's ({name: dpo, beta: 0.1};
    # {name: grpo, rewards: [numeric]}; docs/preference.md)
    objective: str | dict[str, Any] = "sft"

    def __post_init__(self) -> None:
        if isinstance(self.report_to, str):  # Trainer takes one name as a string
            self.report_to = [self.report_to]
        if isinstance(self.report_to, list | tuple):
            self.report_to = [r for r in self.report_to if r != "none"]
        if isinstance(self.early_stopping, dict):  # a RunConfig built in Python from a mapping
            self.early_stopping = EarlyStopping(**self.early_stopping)
        if isinstance(self.early_stopping, EarlyStopping):
            self.early_stopping.for_objective(self.objective)

    def problems(self) -> list[str]:
        out = []
        for name in ("steps", "batch_size", "grad_accum", "keep_last", "eval_batch_size"):
            if getattr(self, name) < 1:
                out.append(f"train.{name}={getattr(self, name)!r}: must be >= 1")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                out.append(f"train.{name}={getattr(self, name)!r}: must be >= 0 (0 = only at the end)")
        out += self._float_problems()
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("precision", PRECISIONS)):
            if getattr(self, name) not in allowed:
                out.append(f"train.{name}={getattr(self, name)!r}: allowed are {', '.join(allowed)}")
        return (out + self._length_problems() + self._early_stopping_problems() + self._report_problems()
                + self._objective_problems())

    def _objective_problems(self) -> list[str]:
        from deltatune.data import objectives

        return objectives.problems(self.objective)

    def _length_problems(self) -> list[str]:
        if self.epochs is None:
            return []
        if not math.isfinite(self.epochs) or self.epochs <= 0:
            return [f"train.epochs={self.epochs!r}: must be a number > 0 (passes over the training split)"]
        if self.steps != DEFAULT_STEPS:
            return [f"train.steps={self.steps!r} and train.epochs={self.epochs!r} both set the run's length: keep one "
                    "(--set train.epochs=N on the command line replaces the config's steps)"]
        return []

    def _early_stopping_problems(self) -> list[str]:
        if self.early_stopping is None:
            return []
        out = self.early_stopping.problems()
        if self.eval_every < 1:
            out.append("train.early_stopping is judged at each evaluation: set train.eval_every (e.g. "
                       f"{max(1, self.steps // 10)})")
        return out

    def _report_problems(self) -> list[str]:
        out = []
        for name in self.report_to if isinstance(self.report_to, list) else []:
            if name not in REPORTERS:
                out.append(f"train.report_to: {name!r} is not a reporter{registry.did_you_mean(name, list(REPORTERS))}")
            elif name in REPORTER_PACKAGES and importlib.util.find_spec(REPORTER_PACKAGES[name]) is None:
                out.append(f"train.report_to: {name!r} needs the {REPORTER_PACKAGES[name]} package: "
                           f"pip install {REPORTER_PACKAGES[name]}, or remove it")
        return out

    def _float_problems(self) -> list[str]:
        """The float settings: finite (YAML's ``.nan`` and ``.inf`` parse as floats) and in range."""
        rules: dict[str, tuple[Callable[[float], bool], str]] = {
            "lr": (lambda v: 0 < v <= MAX_LR, f"must be > 0 and at most {MAX_LR:g} (an optimizer step moves each "
                   "weight by about lr; fine-tuning uses 1e-5 to 1e-2)"),
            "weight_decay": (lambda v: v >= 0, "must be >= 0"),
            "warmup": (lambda v: v >= 0, "must be >= 0"),
            "max_grad_norm": (lambda v: v > 0, "must be > 0 (null: no clipping)"),
            "mixup": (lambda v: v >= 0, "must be >= 0 (the α of Beta(α, α); 0: off)"),
            "contrastive": (lambda v: v >= 0, "must be >= 0 (the weight of the contrastive loss; 0: off)"),
            "contrastive_temperature": (lambda v: v > 0, "must be > 0"),
            "loraplus_ratio": (lambda v: v > 0, "must be > 0 (the B factors train at loraplus_ratio·lr; the paper's "
                               "default is 16; null: LoRA+ off)"),
            "loraplus_lr_embedding": (lambda v: 0 < v <= MAX_LR, f"must be > 0 and at most {MAX_LR:g}"),
        }
        out = []
        for name, (allowed, rule) in rules.items():
            value = getattr(self, name)
            if value is None:
                continue
            if not math.isfinite(value):
                out.append(f"train.{name}={value!r}: must be a finite number")
            elif not allowed(value):
                out.append(f"train.{name}={value!r}: {rule}")
        return out


# ``model: {name: smollm2-135m, quantize: nf4}``: a quantized base (bitsandbytes; docs/quantization.md), the keys
# beside ``name`` are ``deltatune.data.models.load``'s keywords
QUANTIZE_SCHEMES = ("nf4", "fp4", "int8")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
MODEL_KEYS = ("name", "quantize", "double_quant", "compute_dtype")


@dataclass
class RunConfig:
    model: str
    data: Any  # deltatune.data.tasks.DataConfig
    method: dict[str, Any]
    output: str
    train: TrainSettings = field(default_factory=TrainSettings)
    # the model mapping's quantization keys (quantize, double_quant, compute_dtype); None: a full-precision base
    quantization: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model if not self.quantization else {"name": self.model, **self.quantization},
            "data": dataclasses.asdict(self.data),
            "method": dict(self.method),
            "train": dataclasses.asdict(self.train),
            "output": self.output,
        }

    def identity(self) -> dict[str, Any]:
        """The config as far as it decides the computation: what a resumed run must share with the run that wrote
        its checkpoint. Not the output folder (a run folder moved elsewhere still resumes), nor how long the run is
        (``train.steps`` may grow) or how often it reports and saves."""
        d = self.to_dict()
        del d["output"]
        d["train"] = {k: v for k, v in d["train"].items() if k not in RESUMABLE_CHANGES}
        return json.loads(json.dumps(d))  # JSON types, as a checkpoint's state.json holds it


# train settings a resumed run may change
RESUMABLE_CHANGES = ("steps", "epochs", "progress", "eval_every", "save_every", "keep_last", "eval_batch_size",
                     "report_to")


def same_run(saved: dict[str, Any], config: RunConfig) -> bool:
    """A checkpoint's recorded config (``identity``) is that of ``config``; a checkpoint written when the output
    folder was part of the identity still counts."""
    return not config_differences(saved, config)


def config_differences(saved: dict[str, Any], config: RunConfig) -> list[str]:
    """What differs between a checkpoint's recorded config (``identity``) and ``config``, one
    ``dotted.key: old -> new`` line per leaf, in key order (a checkpoint's ``output`` is ignored, as older
    checkpoints recorded it)."""
    old = {k: v for k, v in saved.items() if k != "output"}
    if isinstance(old.get("train"), dict):
        # a train setting added since the checkpoint was written (train.mixup) ran at its default there
        defaults = json.loads(json.dumps(dataclasses.asdict(TrainSettings())))
        new_keys = set(config.identity()["train"]) - set(old["train"])
        old["train"] = {**{k: defaults[k] for k in new_keys if k in defaults}, **old["train"]}
    return [f"{key}: {_shown(a)} -> {_shown(b)}" for key, a, b in _leaf_differences(old, config.identity(), "")]


_ABSENT = object()  # a key one side has and the other lacks


def _leaf_differences(old: Any, new: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _leaf_differences(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{prefix}{key}.")
        return out
    if {_shown(old), _shown(new)} == {"(unset)", "null"}:  # a setting added since, at its default of null
        return []
    return [] if old == new else [(prefix.rstrip("."), old, new)]


def _shown(value: Any) -> str:
    return "(unset)" if value is _ABSENT else json.dumps(value)


TOP_KEYS = ["model", "data", "method", "train", "output"]


def _sections() -> dict[str, list[str]]:
    """The keys of every section of a run config but the method's (``""``: the top level)."""
    from deltatune.data.tasks import DataConfig

    fields = {cls: [f.name for f in dataclasses.fields(cls)] for cls in (DataConfig, TrainSettings, EarlyStopping)}
    return {"": TOP_KEYS, "data": fields[DataConfig], "train": fields[TrainSettings],
            "train.early_stopping": fields[EarlyStopping]}


def _nearest(key: str, allowed: list[str], section: str = "") -> str:
    """What an unknown ``key`` of ``section`` likely meant: a key of this section (``registry.did_you_mean``), or
    where another section holds the deltatune name of a key from Trainer / PEFT / TRL (``max_seq_length`` in
    ``train`` is ``data.max_length``)."""
    home = _elsewhere(key, allowed, section)
    if home is None:
        return registry.did_you_mean(key, allowed)
    note = registry.ALIAS_NOTES.get(str(key).lower())
    return f" (did you mean {home!r}?{' ' + note if note else ''})"


def _elsewhere(key: str, allowed: list[str], section: str) -> str | None:
    """The dotted key of another section that is deltatune's name for ``key`` (an alias), if ``allowed`` lacks it."""
    alias = registry.ALIASES.get(str(key).lower())
    if alias is None or alias in allowed:
        return None
    for home, names in _sections().items():
        if alias in names and home != section:
            return f"{home}.{alias}" if home else alias
    return None


def _nested(hint: Any) -> type | None:
    """The dataclass a field holds as a sub-section (``train.early_stopping``), if it is one."""
    for h in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(h):
            return h  # type: ignore[return-value]
    return None


def _section(cls: type, values: Any, prefix: str, problems: list[str]) -> Any:
    if values is None:
        values = {}
    if not isinstance(values, dict):
        problems.append(f"{prefix}: should be a mapping of keys to values, got {values!r}")
        return cls()
    names = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    good = {}
    for key, value in values.items():
        hint = hints.get(key)
        if key not in names:
            problems.append(f"unknown key {prefix}.{key}{_nearest(key, names, prefix)}")
        elif _nested(hint) is not None and isinstance(value, dict):
            inner = _section(_nested(hint), value, f"{prefix}.{key}", problems)
            if inner is not None:
                good[key] = inner
        elif not registry._is_instance(value, hint):
            problems.append(f"{prefix}.{key}={value!r}: should be {registry.type_name(hint)}")
        else:
            good[key] = _as_float(value, hint)
    try:
        return cls(**good)
    except (TypeError, ValueError, DeltatuneError) as e:
        problems.append(f"{prefix}: {e}")
        return None


def _as_float(value: Any, hint: Any) -> Any:
    """A whole number given for a float setting (``epochs: 2``, ``lr: 1``) as a float."""
    takes_float = hint is float or (float in typing.get_args(hint) and int not in typing.get_args(hint))
    return float(value) if takes_float and isinstance(value, int) and not isinstance(value, bool) else value


def parse_config(raw: dict[str, Any]) -> RunConfig:
    """Validate a config mapping; one DeltatuneError lists every problem, one per line."""
    from deltatune.data.tasks import DataConfig

    if not isinstance(raw, dict):
        raise DeltatuneError(f"a run config is a mapping with keys model, data, method, train, output; got {raw!r}")
    problems: list[str] = []
    for key in raw:
        if key not in TOP_KEYS:
            problems.append(f"unknown key {key!r}{_nearest(key, TOP_KEYS)}")
    for key in ("model", "data", "method", "output"):
        if key not in raw:
            problems.append(f"missing key {key!r}")
    model, output = raw.get("model"), raw.get("output")
    model, quantization = _model_section(model, problems) if isinstance(model, dict) else (model, None)
    for key, value in (("model", model), ("output", output)):
        if key in raw and not isinstance(value, str):
            problems.append(f"{key}={value!r}: should be text (a shipped model name or a folder; a folder)")
    if isinstance(output, str):
        problems += _output_problems(output)
    data_values = raw.get("data")
    if isinstance(data_values, list):  # several data sets: the mix of them
        data_values = {"mix": data_values}
    data = _section(DataConfig, data_values, "data", problems)
    if data is not None and "data" in raw:
        problems += data.problems()
    train = _section(TrainSettings, raw.get("train"), "train", problems)
    if train is not None:
        problems += train.problems()
    if train is not None and data is not None and "data" in raw:
        problems += _loss_term_problems(train, data) + _objective_task_problems(train, data)
    method = raw.get("method")
    if isinstance(method, str):
        method = {"name": method}
    if not isinstance(method, dict) or "name" not in method:
        if "method" in raw:
            problems.append(f"method={method!r}: should be a mapping with a 'name' (see `deltatune methods`)")
    else:
        found = _method_problems(method)
        problems += found
        if train is not None and not found:
            problems += _objective_method_problems(train, method) + _loraplus_method_problems(train, method)
    if problems:
        raise DeltatuneError(registry.problem_list("bad run config", problems))
    return RunConfig(model=model, data=data, method=dict(method), output=output, train=train,
                     quantization=quantization)


def _model_section(raw: dict[str, Any], problems: list[str]) -> tuple[Any, dict[str, Any] | None]:
    """``model: {name, quantize, double_quant, compute_dtype}``: the name and the quantization keys given."""
    for key in raw:
        if key not in MODEL_KEYS:
            problems.append(f"unknown key model.{key}{_nearest(str(key), list(MODEL_KEYS))} (the model mapping "
                            f"takes {', '.join(MODEL_KEYS)})")
    quantization = {k: raw[k] for k in MODEL_KEYS[1:] if k in raw}
    if "name" not in raw:
        problems.append("model: the mapping needs a name (model: {name: smollm2-135m, quantize: nf4})")
    if not quantization:  # model: {name: X} is the full-precision base, as model: X
        return raw.get("name"), None
    if "quantize" not in quantization:
        problems.append(f"model.{', model.'.join(quantization)} apply to a quantized base: add model.quantize (one of "
                        f"{', '.join(QUANTIZE_SCHEMES)}) or remove them")
    elif quantization["quantize"] not in QUANTIZE_SCHEMES:
        problems.append(f"model.quantize={quantization['quantize']!r}: one of {', '.join(QUANTIZE_SCHEMES)} "
                        "(or leave it out for a full-precision base)")
    if not isinstance(quantization.get("double_quant", True), bool):
        problems.append(f"model.double_quant={quantization['double_quant']!r}: true or false")
    if quantization.get("compute_dtype", "float32") not in COMPUTE_DTYPES:
        problems.append(f"model.compute_dtype={quantization['compute_dtype']!r}: one of {', '.join(COMPUTE_DTYPES)}")
    return raw.get("name"), quantization


def loss_terms(s: TrainSettings) -> LossTerms | None:
    """The run's ``deltatune.data.tasks.LossTerms`` (mixup, contrastive), None when both are off."""
    from deltatune.data.tasks import LossTerms

    terms = LossTerms(mixup=s.mixup, contrastive=s.contrastive, temperature=s.contrastive_temperature)
    return terms if terms.active else None


def _loss_term_problems(train: TrainSettings, data: Any) -> list[str]:
    """train.mixup / train.contrastive on data they cannot apply to (not classification, packed prompts)."""
    from deltatune.data.tasks import loss_terms_problem

    if loss_terms(train) is None:
        return []
    problem = loss_terms_problem(data.task, bool(data.packing) and data.task == "classification")
    return [problem] if problem is not None else []


def _objective_task_problems(train: TrainSettings, data: Any) -> list[str]:
    """train.objective on a data task it cannot train on (dpo on chat data, sft on preference pairs)."""
    from deltatune.data import objectives

    if objectives.problems(train.objective):
        return []  # said already
    problem = objectives.task_problem(objectives.parse(train.objective)[0], data.task)
    return [problem] if problem is not None else []


def _objective_method_problems(train: TrainSettings, method: dict[str, Any]) -> list[str]:
    """train.objective with a method that cannot train it (GRPO needs gradients; a zeroth-order method has none)."""
    from deltatune.data import objectives

    if objectives.problems(train.objective):
        return []  # said already
    options = {k: v for k, v in method.items() if k != "name"}
    problem = objectives.method_problem(objectives.parse(train.objective)[0], str(method["name"]), options)
    return [problem] if problem is not None else []


def _loraplus_method_problems(train: TrainSettings, method: dict[str, Any]) -> list[str]:
    """train.loraplus_ratio with a method that trains from forward passes (no optimizer to give groups to). A
    method without B factors is refused once its delta is built (``deltatune.core.optim.loraplus_param_groups``)."""
    if train.loraplus_ratio is None:
        return []
    try:
        free = registry.get(str(method["name"])).has("gradient_free", {k: v for k, v in method.items() if k != "name"})
    except DeltatuneError:
        return []  # bad method options: said by the method's own check
    if not free:
        return []
    return [f"train.loraplus_ratio (LoRA+) sets the B factors' learning rate, but {method['name']!r} trains from "
            "forward passes (its policy takes the whole step): remove train.loraplus_ratio"]


def _method_problems(method: dict[str, Any]) -> list[str]:
    """The ``method:`` section's problems, one per key; a Trainer / PEFT key that belongs to another section
    (``learning_rate``) is pointed there."""
    try:
        m = registry.get(str(method["name"]))
    except DeltatuneError as e:
        return [f"method: {e}"]
    fields = [f.name for f in dataclasses.fields(m.config_cls)]
    options, problems = {}, []
    for key, value in method.items():
        if key == "name":
            continue
        if key not in fields and _elsewhere(key, fields, "method") is not None:
            problems.append(f"unknown key method.{key} for {m.name}{_nearest(key, fields, 'method')}")
        else:
            options[key] = value
    problems += registry.config_problems(m, options, prefix="method.")
    if not problems:
        try:
            registry.make_config(m, options)
        except DeltatuneError as e:
            problems.append(f"method: {e}")
    return problems


def _output_problems(output: str) -> list[str]:
    """Why ``output`` cannot hold a run: the run writes its artifact by swapping a new folder in at that path
    (and its checkpoints below it), so the path must name a folder that may be replaced."""
    if not output.strip():
        return ["output='': name the run's folder, e.g. runs/lora"]
    path = Path(output)
    if path.exists() and not path.is_dir():
        return [f"output={output!r} is a file: name a folder for the run, e.g. runs/lora"]
    file_above = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if file_above is not None:
        return [f"output={output!r} lies under {str(file_above)!r}, which is a file: name a folder elsewhere"]
    here = Path.cwd().resolve()
    target = path.resolve()
    if target == here or target in here.parents:
        return [f"output={output!r} is the current folder or holds it, and the run replaces its output folder "
                "when it writes the artifact: name a new folder, e.g. runs/lora"]
    return []


def parse_data_section(values: dict[str, Any]) -> Any:
    """A ``data:`` section on its own (``deltatune eval --set``): a ``DataConfig``; every unknown key (with the
    nearest known one) and bad value in one error."""
    from deltatune.data.tasks import DataConfig

    problems: list[str] = []
    if isinstance(values, list):  # several data sets: the mix of them
        values = {"mix": values}
    data = _section(DataConfig, values, "data", problems)
    if data is not None:
        problems += data.problems()
    if problems:
        raise DeltatuneError(registry.problem_list("bad data options", problems))
    return data


def apply_overrides(raw: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """``--set train.steps=10 --set method.r=16``: values are parsed as YAML (numbers, lists, null). Setting the
    run's length one way (``train.epochs`` or ``train.steps``) drops the other from the config (a preset's steps)."""
    # a deep copy leaves the caller's mapping as it was and keeps YAML aliases shared (SPT's `data: *data`
    # follows the run's data section, overrides included)
    raw = copy.deepcopy(raw)
    keys = []
    for item in overrides or []:
        if "=" not in item:
            raise DeltatuneError(f"--set {item!r}: write key=value, e.g. --set train.steps=10")
        key, value = item.split("=", 1)
        keys.append(key.strip())
        set_dotted(raw, key.strip(), _yaml_value(item, value))
    for given, dropped in (("epochs", "steps"), ("steps", "epochs")):
        if f"train.{given}" in keys and f"train.{dropped}" not in keys and isinstance(raw.get("train"), dict):
            raw["train"] = {k: v for k, v in raw["train"].items() if k != dropped}
    return raw


def _yaml_value(item: str, value: str) -> Any:
    try:
        return load_yaml(value)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise DeltatuneError(
            f"--set {item!r}: the value is not valid YAML ({problem}); quote it as a string or fix the brackets, "
            "e.g. --set train.steps=10 or --set 'method.targets=[q_proj, v_proj]'"
        ) from e


def preset_names() -> list[str]:
    """The presets that ship with the package: ``deltatune train NAME`` / ``dt.train("NAME")``."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path | None:
    """The file of preset ``name`` (``lora`` or ``lora.yaml``), None when there is no such preset."""
    stem = name.removesuffix(".yaml")
    if not stem or "/" in stem or "\\" in stem or stem.startswith("."):
        return None
    path = PRESETS_DIR / f"{stem}.yaml"
    return path if path.is_file() else None


def read_config(config: str | Path) -> dict[str, Any]:
    """The mapping in a config file or a preset (a file of that name comes first). A preset's relative
    ``data.path`` names a file shipped next to it (``locft``'s edits)."""
    path = Path(config)
    preset = None if path.is_file() else preset_path(str(config))
    if preset is None and not path.is_file():
        near = difflib.get_close_matches(path.stem, preset_names(), n=1)
        hint = f"; did you mean the preset {near[0]!r}?" if near else ""
        raise DeltatuneError(
            f"{config} is neither a config file nor a preset{hint} (presets: {', '.join(preset_names())})"
        )
    source = preset or path
    try:
        raw = load_yaml(source.read_text())
    except yaml.YAMLError as e:
        raise DeltatuneError(f"{source} is not valid YAML: {e}") from e
    if preset is not None and isinstance(raw, dict) and isinstance(raw.get("data"), dict):
        shipped = raw["data"].get("path")
        if isinstance(shipped, str) and not Path(shipped).is_absolute() and (PRESETS_DIR / shipped).exists():
            raw["data"] = {**raw["data"], "path": str(PRESETS_DIR / shipped)}
    return raw


def load_config(config: str | Path | dict[str, Any] | RunConfig, overrides: list[str] | None = None) -> RunConfig:
    """A validated ``RunConfig`` from a YAML path, a preset name, a mapping or a ``RunConfig``, with
    ``key=value`` overrides (``train.steps=10``) applied."""
    if isinstance(config, RunConfig):
        if overrides:
            return parse_config(apply_overrides(config.to_dict(), overrides))
        return config
    raw = read_config(config) if isinstance(config, (str, Path)) else dict(config)
    return parse_config(apply_overrides(raw, overrides))
