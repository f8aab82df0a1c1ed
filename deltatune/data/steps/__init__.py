"""The data step: which rows a fine-tune sees, chosen or made before it trains (``docs/data.md``).

Four verbs, each with the paper's method (one module per method here, ``STEPS``):

    select   GOT-D: the candidates whose optimal-transport potentials pull the pool towards a target set
    prune    DEALRec: influence on empirical risk + the target model's effort, sampled across score strata
    curate   DART: difficulty-aware rejection sampling of solutions from a generator, kept when a verifier agrees
    augment  EDA (and back-translation): label-keeping variants of every row

Each reads a pool of rows (``read_pool``: rows, a file, a shipped set, a data section or a run config's, whose
*training part* is the pool, so a held-out split never feeds a choice), runs its method, and returns a
``StepResult``; with ``out`` it writes ``data.jsonl`` + ``manifest.json`` there atomically. Inline in a training
YAML (``data: {name: tweets, select: {method: gotd, budget: 0.1, target: t.jsonl}}``) the steps run on the training
part after the split and before ``max_train``, in the order select, prune, curate, augment, and their results are
cached by the manifest's key (``_manifest.py``).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltatune.data.steps import _manifest
from deltatune.data.steps._base import Outcome, Pool, Progress, no_progress, options_from
from deltatune.errors import DeltatuneError

if TYPE_CHECKING:
    from deltatune.data.config import DataConfig
    from deltatune.data.sets import TextDataset

# verb -> method -> module; the first method of each verb is its default
STEPS: dict[str, dict[str, str]] = {
    "select": {"gotd": "deltatune.data.steps.gotd", "random": "deltatune.data.steps.random_subset"},
    "prune": {"dealrec": "deltatune.data.steps.dealrec", "random": "deltatune.data.steps.random_subset"},
    "curate": {"dart": "deltatune.data.steps.dart"},
    "augment": {"eda": "deltatune.data.steps.eda", "backtranslation": "deltatune.data.steps.backtranslate"},
}
ORDER = tuple(STEPS)  # inline steps run in this order
# options that name another data source: read into a Pool and passed to run() as a keyword of the same name
SOURCE_OPTIONS = ("target",)

__all__ = ["ORDER", "STEPS", "Outcome", "Pool", "StepResult", "augment", "curate", "prune", "read_pool", "run_step",
           "select"]


@dataclass
class StepResult:
    """What a step made: its rows, its manifest, and the folder it was written to (None when not written)."""

    rows: list[dict[str, Any]]
    manifest: dict[str, Any]
    folder: Path | None = None

    def __len__(self) -> int:
        return len(self.rows)


def method_module(step: str, method: str) -> Any:
    """The module of ``step``'s ``method``, with an error naming the known ones."""
    if step not in STEPS:
        raise DeltatuneError(f"unknown data step {step!r}; the steps are: {', '.join(STEPS)}")
    if method not in STEPS[step]:
        raise DeltatuneError(f"{step}: unknown method {method!r}; {step} has: {', '.join(STEPS[step])}")
    return importlib.import_module(STEPS[step][method])


def method_options(step: str, given: Mapping[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """(method, options without ``method``) of an inline step's mapping or a call's keywords."""
    given = dict(given or {})
    method = given.pop("method", next(iter(STEPS[step])))
    return str(method), given


# ---------------------------------------------------------------- the pool


def _labelled_rows(ds: TextDataset) -> list[dict[str, Any]]:
    return [{"text": t, "label": ds.label_names[y]} for t, y in zip(ds.texts, ds.labels, strict=True)]


def read_pool(source: Any, *, text_field: str | None = None, label_field: str | None = None) -> Pool:
    """The rows a step works on.

    ``source``: a list of dicts; a ``Pool``; a shipped set's name ("tweets": every row); a data file (every row); a
    run config YAML or a ``DataConfig`` / data-section mapping (its *training part*: the rows left after its
    ``eval_fraction`` split, so the held-out rows never influence what is chosen)."""
    from deltatune import data
    from deltatune.data.config import DataConfig

    if isinstance(source, Pool):
        return source
    if isinstance(source, list):
        if not all(isinstance(r, dict) for r in source):
            raise DeltatuneError("a pool given as a list must hold dicts (one per row)")
        return Pool(list(source), text_field or "text", label_field if label_field is not None else "label",
                    source="rows")
    if isinstance(source, str | os.PathLike) and str(source) in data.SHIPPED:
        return Pool(_labelled_rows(data.load(str(source))), "text", "label", source=str(source))
    if isinstance(source, str | os.PathLike) and Path(source).suffix in (".yaml", ".yml"):
        from deltatune.core.yamlfile import load_yaml

        raw = load_yaml(Path(source).read_text())
        if not isinstance(raw, dict) or "data" not in raw:
            raise DeltatuneError(f"{source} has no data section; pass a run config with `data:` or a data file")
        source = raw["data"]
    if isinstance(source, Mapping):
        known = {f.name for f in dataclasses.fields(DataConfig)}
        source = DataConfig(**{k: v for k, v in source.items() if k in known and k not in ORDER})
    if isinstance(source, DataConfig):
        return training_part(source)
    if isinstance(source, str | os.PathLike):
        path = Path(source).expanduser()
        if not path.exists():
            raise DeltatuneError(f"data source {source!s} is neither a shipped set ({', '.join(data.names())}) nor a "
                                 "file that exists")
        records = data.read_records(path)
        return Pool(list(records.rows), text_field or "text", label_field if label_field is not None else "label",
                    task="classification" if (label_field or "label") in records.fields else "text",
                    source=str(path))
    raise DeltatuneError(f"cannot read a pool from a {type(source).__name__}; pass rows, a file, a shipped set's name "
                         "or a data section")


def training_part(cfg: DataConfig) -> Pool:
    """The rows of a data section's training part (after its split; before ``max_train``)."""
    from deltatune.data import rows as rows_mod

    if cfg.mix is not None:
        raise DeltatuneError("a data step reads one data set; put the step inside each part of data.mix")
    if cfg.task == "classification":
        train, _ = rows_mod.classification_data(cfg).split(cfg.eval_fraction, seed=cfg.seed)
        return Pool(_labelled_rows(train), "text", "label", task="classification", source=cfg.name or str(cfg.path))
    if cfg.name is not None:
        texts = rows_mod.texts(cfg)
        train_idx, _ = rows_mod.split_indices(len(texts), cfg.eval_fraction, cfg.seed)
        return Pool([{"text": texts[i]} for i in train_idx], "text", None, task=cfg.task, source=cfg.name)
    table = rows_mod.records(cfg)
    train_idx, _ = rows_mod.split_indices(len(table.rows), cfg.eval_fraction, cfg.seed)
    return Pool([table.rows[i] for i in train_idx], cfg.text_field,
                cfg.label_field if cfg.task == "classification" else None, task=cfg.task, source=str(cfg.path))


# ---------------------------------------------------------------- progress


@contextmanager
def progress_bar(show: bool, label: str) -> Iterator[Progress]:
    """A rich progress bar with one line per phase the step reports (``embed``, ``ot``, ...), or nothing."""
    if not show:
        yield no_progress
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bar

    with Bar(TextColumn(f"{label} {{task.description}}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
             transient=False) as bar:
        tasks: dict[str, Any] = {}

        def report(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done, total=total)

        yield report


# ---------------------------------------------------------------- running a step


def run_step(step: str, source: Any, *, method: str | None = None, out: str | os.PathLike | None = None,
             seed: int = 0, overwrite: bool = False, cache: bool = False, progress: bool = False,
             context: Mapping[str, Any] | None = None, **options: Any) -> StepResult:
    """Run one data step on ``source`` (``read_pool``) with ``options``; write it to ``out`` when given; with
    ``cache``, reuse (or store) the result under its manifest key. ``context``: keywords the method's ``run`` takes
    beyond the pool (e.g. a training run's model for DEALRec's effort)."""
    method = method or next(iter(STEPS.get(step, {"": ""})))
    module = method_module(step, method)
    where = f"data {step} --method {method}"
    opts = options_from(module.Options, options, where)
    pool = read_pool(source)
    if not pool.rows:
        raise DeltatuneError(f"{where}: the pool {pool.source} is empty; give it a data source with rows")
    recorded = dataclasses.asdict(opts)
    inputs = {"pool": _manifest.rows_sha256(pool.rows)}
    extra: dict[str, Any] = dict(context or {})
    for name in SOURCE_OPTIONS:
        value = getattr(opts, name, None)
        if value is not None:
            target = read_pool(value, text_field=pool.text_field, label_field=pool.label_field)
            if not target.rows:
                raise DeltatuneError(f"{where}: the {name} {target.source} is empty; give it rows")
            inputs[name] = _manifest.rows_sha256(target.rows)
            extra[name] = target
            recorded[name] = str(value) if not isinstance(value, list | Mapping) else "(rows)"
    key = _manifest.step_key(step, method, recorded, seed, inputs)
    hit = _manifest.cached(key) if cache else None
    if hit is not None:
        rows, manifest = hit
    else:
        start = time.perf_counter()
        with progress_bar(progress, f"{step} {method}") as report:
            outcome = module.run(pool, opts, seed=seed, progress=report, **extra)
        manifest = _manifest.manifest_for(step, method, recorded, seed, inputs, len(pool.rows), outcome,
                                          time.perf_counter() - start)
        manifest["source"] = pool.source
        rows = outcome.rows
        if cache:
            _manifest.write(_manifest.cache_root() / key, rows, manifest, overwrite=True)
    folder = None
    if out is not None:  # the files the step read must not lie in the folder it replaces
        read = [source, *(getattr(opts, name, None) for name in SOURCE_OPTIONS)]
        folder = _manifest.write(Path(out), rows, manifest, overwrite=overwrite, inputs=tuple(read))
    return StepResult(rows, manifest, folder)


def select(source: Any, *, method: str = "gotd", out: str | os.PathLike | None = None, seed: int = 0,
           overwrite: bool = False, progress: bool = False, **options: Any) -> StepResult:
    """``deltatune data select``: a subset of ``source`` chosen for a target (GOT-D: ``budget``, ``target``, ...)."""
    return run_step("select", source, method=method, out=out, seed=seed, overwrite=overwrite, progress=progress,
                    **options)


def prune(source: Any, *, method: str = "dealrec", out: str | os.PathLike | None = None, seed: int = 0,
          overwrite: bool = False, progress: bool = False, **options: Any) -> StepResult:
    """``deltatune data prune``: a small subset of ``source`` that keeps what training needs (DEALRec)."""
    return run_step("prune", source, method=method, out=out, seed=seed, overwrite=overwrite, progress=progress,
                    **options)


def curate(source: Any, *, method: str = "dart", out: str | os.PathLike | None = None, seed: int = 0,
           overwrite: bool = False, progress: bool = False, **options: Any) -> StepResult:
    """``deltatune data curate``: an SFT set made from ``source``'s queries by a generator and a verifier (DART)."""
    return run_step("curate", source, method=method, out=out, seed=seed, overwrite=overwrite, progress=progress,
                    **options)


def augment(source: Any, *, method: str = "eda", out: str | os.PathLike | None = None, seed: int = 0,
            overwrite: bool = False, progress: bool = False, **options: Any) -> StepResult:
    """``deltatune data augment``: ``source``'s rows and label-keeping variants of them (EDA, back-translation)."""
    return run_step("augment", source, method=method, out=out, seed=seed, overwrite=overwrite, progress=progress,
                    **options)


# ---------------------------------------------------------------- inline in a data section


def inline_steps(cfg: DataConfig) -> list[tuple[str, dict[str, Any]]]:
    """The steps a data section names, in ``ORDER``."""
    return [(step, dict(getattr(cfg, step))) for step in ORDER if getattr(cfg, step, None) is not None]


def check_inline(step: str, value: Any) -> None:
    """A data section's ``data.<step>`` value: a mapping whose ``method`` this step has (options are checked
    when the step runs, against the method's ``Options``)."""
    if not isinstance(value, Mapping):
        raise DeltatuneError(f"data.{step} must be a mapping like {{method: {next(iter(STEPS[step]))}, ...}}, "
                             f"got {value!r}")
    method, _ = method_options(step, value)
    if method not in STEPS[step]:
        raise DeltatuneError(f"data.{step}.method={method!r} is unknown; {step} has: {', '.join(STEPS[step])}")


def apply_inline(cfg: DataConfig, pool: Pool, *, model: str | None = None) -> list[dict[str, Any]]:
    """The training rows after the data section's steps (each cached by its manifest key). ``model``: the run's
    model, the default of a step that reads one (DEALRec's effort)."""
    rows = pool.rows
    for step, given in inline_steps(cfg):
        method, options = method_options(step, given)
        seed = int(options.pop("seed", cfg.seed))
        module = method_module(step, method)
        if model is not None and "model" in {f.name for f in dataclasses.fields(module.Options)} \
                and "model" not in options and _is_causal_lm(model):
            options["model"] = model  # an encoder run (MiniLM) keeps the step's own default causal LM
        result = run_step(step, dataclasses.replace(pool, rows=rows), method=method, seed=seed, cache=True,
                          **options)
        rows = result.rows
    return rows


def _is_causal_lm(model: str) -> bool:
    from deltatune.data import models

    try:
        return models.natural_task(model) == "causal_lm"
    except DeltatuneError:
        return False


def apply_labelled(cfg: DataConfig, ds: TextDataset, *, model: str | None = None) -> TextDataset:
    """A classification training part after the data section's steps (unchanged when it names none)."""
    from deltatune.data.sets import TextDataset

    if not inline_steps(cfg):
        return ds
    out = apply_inline(cfg, Pool(_labelled_rows(ds), "text", "label", task="classification", source=ds.name),
                       model=model)
    index = {n: i for i, n in enumerate(ds.label_names)}
    unknown = sorted({str(r.get("label")) for r in out} - set(index))
    if unknown:
        raise DeltatuneError(f"the data steps made rows with labels {unknown} that the data does not have")
    return TextDataset(ds.name, [str(r["text"]) for r in out], [index[str(r["label"])] for r in out],
                       list(ds.label_names))
