"""``deltatune search``: a multi-objective configuration search (AutoPEFT's question) on optuna.

A search config is a run config plus a ``search:`` section (``deltatune.ops.search_space``): which keys vary,
how many trials, which objectives go which way. Every trial is a short training run of the base config with
the trial's values, scored on a dev split carved from the training data (``search_data``), never the reported
eval split. Trials run through a ``Runner`` the caller gives (``dt.search`` gives one that trains each trial with
``dt.train`` in a process of its own, ``search_run.isolated``); tests give a cheap Python function.

The study lives in a real database: an SQLite file ``OUT/study.db`` by default, or any optuna RDB URL
(``storage``) that several workers on several machines join. The loop takes one trial at a time until the study
holds ``trials`` of them, counted across every worker; so a second worker, or a resumed search, runs only what
is missing. Each trial's sampler is seeded with the search's seed and the number of trials before it, so a
search killed and resumed takes exactly the decisions of an uninterrupted one (one worker; the TPE and random
samplers decide from the finished trials and that seed alone). A trial that was running when its worker died is
marked failed as "interrupted" and does not count: on this machine as soon as a worker sees that the PID is gone,
elsewhere when optuna's heartbeat goes stale.

A trial that fails (a bad combination, a loss that became NaN, an out-of-memory kill) is recorded as failed, its
reason in the trial's user attribute ``error``, and the search goes on. Outputs in ``OUT``: ``study.db``,
``trials.csv`` (after every trial), ``pareto.png`` (every trial, the front highlighted; the hypervolume over
the trials beside it) and ``pareto/<trial>.yaml``, one run config per configuration on the front, which
``deltatune train`` runs on the full data.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import socket
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from deltatune.core.artifact import replace_bytes
from deltatune.errors import DeltatuneError
from deltatune.ops import search_pareto as pareto
from deltatune.ops.search_data import dev_data, write_text
from deltatune.ops.search_run import Runner, takes_report
from deltatune.ops.search_space import Search, Validator, parse_search, trial_config

DB = "study.db"
HEARTBEAT_S = 60  # a worker's running trial records a heartbeat this often ...
GRACE_S = 300  # ... and one silent for this long is failed as stale by the next worker that asks for a trial
# train settings every trial takes: no bar (the search draws its own), a checkpoint only at the end, no reporters
TRIAL_TRAIN = {"progress": False, "save_every": 0, "report_to": []}


class TrialFailed(Exception):
    """Raised inside the objective for a trial that failed; its reason is already in the trial's user attrs."""


def prepare(config: dict[str, Any], validate: Validator, trials: int | None = None) -> Search:
    """The search section of ``config``, checked (every problem in one error); ``trials`` overrides its count."""
    raw = config.get("search")
    if isinstance(raw, dict) and trials is not None:
        raw = {**raw, "trials": trials}
    return parse_search(raw, config, validate)


def run(config: dict[str, Any], out: str | os.PathLike, *, validate: Validator, runner: Runner,
        resume: bool = False, storage: str | None = None, trials: int | None = None, dev_split: bool = True,
        on_trial: Callable[[Any, int, int], None] | None = None, refit: int = 0,
        refit_runner: Runner | None = None) -> Any:
    """Run (or continue, or join) the search of ``config`` into the study folder ``out``; returns the optuna Study.

    ``validate`` gives a run config's problems (``deltatune.api`` passes the run config parser's); ``runner``
    trains one trial (``search_run.Runner``); ``dev_split=False`` lets the trials use the data as given (a runner
    that reads no data). ``on_trial(trial, done, total)`` is called after each of this worker's trials. ``refit`` K > 0
    trains the front's first K configurations again with ``search.refit_seeds`` seeds on the config's own data and
    writes ``OUT/refit.json`` (``search_refit``; ``refit_runner``, default ``runner``, trains them)."""
    search = prepare(config, validate, trials)  # a bad space fails before anything is written
    out = Path(out)
    _check_out(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    data = config.get("data")
    if dev_split:
        data, sizes = dev_data(config.get("data"), out, search.dev_size)
    url = storage or f"sqlite:///{(out / DB).resolve()}"
    with _quiet_optuna():
        study = _open_study(url, search, config, resume=resume, given=storage is not None)
        if dev_split:
            study.set_user_attr("dev", sizes)
        base = {**config, "data": data}
        shadow = _pruning_study(url, search, config, storage=study._storage) if search.pruner != "none" else None
        objective = _objective(study, search, base, out, runner, shadow)
        while True:
            done = [t for t in study.get_trials(deepcopy=False) if counts(t)]
            _fail_dead_workers(study, done)
            done = [t for t in study.get_trials(deepcopy=False) if counts(t)]
            if len(done) >= search.trials:
                break
            study.sampler = make_sampler(search, len(done))
            study.optimize(objective, n_trials=1, catch=(TrialFailed,), gc_after_trial=False)
            last = study.get_trials(deepcopy=False)[-1]
            write_csv(study, search, out)
            if on_trial is not None:
                finished = sum(1 for t in study.get_trials(deepcopy=False) if counts(t) and t.state.is_finished())
                on_trial(last, finished, search.trials)
        write_outputs(study, search, config, out)
    if refit > 0:
        from deltatune.ops.search_refit import refit as refit_front

        refit_front(front_rows(study, search), search, config, out, refit_runner or runner, refit, TRIAL_TRAIN)
    with contextlib.suppress(OSError):  # empty unless another worker is running a trial in this folder
        (out / "trials").rmdir()
    return study


def _check_out(out: Path, resume: bool) -> None:
    if resume or not out.exists():
        return
    if not out.is_dir():
        raise DeltatuneError(f"{out} is a file: name a folder for the study")
    if any(out.iterdir()):
        raise DeltatuneError(f"{out} is not empty: add --resume (resume=True) to continue the search it holds (or "
                             "join it as another worker), or choose a new folder")


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """No optuna log line per trial (the caller shows progress) and no experimental-feature warnings."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # the pruner's twin trials are asked, not optimized: their storage's heartbeat is the main study's
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
            yield
    finally:
        optuna.logging.set_verbosity(level)


def _open_study(url: str, search: Search, config: dict[str, Any], *, resume: bool, given: bool) -> Any:
    import optuna

    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):  # several workers wait for SQLite's lock instead of failing at once
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    storage = _storage(url, kwargs)
    directions = list(search.objectives.values())
    try:
        study = optuna.create_study(storage=storage, study_name=search.study, directions=directions,
                                    load_if_exists=resume)
    except optuna.exceptions.DuplicatedStudyError:
        where = "the storage" if given else "the folder's database"
        raise DeltatuneError(f"{where} already holds the study {search.study!r}: add --resume (resume=True) to "
                             "continue or join it, or name another study (search.study)") from None
    record = {"config": {k: v for k, v in config.items() if k not in ("search", "output")},
              "search": search.record()}
    record = json.loads(json.dumps(record, default=str))
    saved = study.user_attrs.get("search")
    if saved is None:
        study.set_user_attr("search", record)
    elif saved != record:
        changed = _differences(saved, record)
        raise DeltatuneError(f"the study {search.study!r} was made by another search config (differs in "
                             f"{', '.join(changed[:6])}): resume with the same config (only search.trials may "
                             "change), or start a new study in a new folder")
    if [d.name.lower() for d in study.directions] != directions:
        raise DeltatuneError(f"the study {search.study!r} has other objectives: start a new study")
    return study


def _storage(url: str, kwargs: dict[str, Any]) -> Any:
    """optuna's RDB storage of ``url``. Workers that start together race to create the database's tables (the
    loser gets an integrity error from the schema's version row): the loser tries again and finds them made."""
    import time

    import optuna
    import sqlalchemy.exc

    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S, **kwargs)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def counts(trial: Any) -> bool:
    """Whether a trial counts toward the study's number of trials: done, running or queued; a failure of its own
    (its ``error``), but not a trial interrupted with its worker, nor one taken past the count."""
    from optuna.trial import TrialState

    attrs = trial.user_attrs
    if attrs.get("extra") or attrs.get("interrupted"):
        return False
    if trial.state == TrialState.FAIL:
        return "error" in attrs
    return True


def _fail_dead_workers(study: Any, trials: list[Any]) -> None:
    """Mark failed, as interrupted, the running trials of workers on this machine whose process is gone (a killed
    search): they stop counting, and the search takes their place again."""
    from optuna.trial import TrialState

    host = socket.gethostname()
    storage = study._storage  # optuna has no public way to fail another process's trial
    for t in trials:
        worker = t.user_attrs.get("worker") or {}
        if t.state != TrialState.RUNNING or worker.get("host") != host or _alive(worker.get("pid")):
            continue
        storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        storage.set_trial_user_attr(t._trial_id, "error", f"interrupted: its worker (PID {worker.get('pid')}) ended")
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return True  # unknown: leave it to the heartbeat
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_sampler(search: Search, index: int) -> Any:
    """The sampler of the trial that follows ``index`` counted trials, seeded from the search's seed and ``index``:
    a resumed search samples what the uninterrupted one would have."""
    import optuna

    seed = (search.seed * 1_000_003 + index) % 2**32
    if search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if search.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(2, search.n_startup))
    if search.sampler == "botorch":
        return botorch_sampler(search, seed)
    # multivariate + group: the space is conditional (a method's options exist only for that method);
    # constant_liar: several workers do not all sample next to the same running trial
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=search.n_startup, multivariate=True, group=True,
                                      constant_liar=True)


def botorch_sampler(search: Search, seed: int) -> Any:
    """AutoPEFT's acquisition: a Gaussian-process model of each objective and qNEHVI (noisy expected hypervolume
    improvement; optuna-integration's default for 2-3 objectives is qEHVI, which assumes noise-free metrics, and a
    short run's dev accuracy is noisy). Options outside the space all trials share so far (a conditional space:
    each method's own options) are drawn by the seeded random sampler, as optuna's relative samplers do."""
    import optuna
    from optuna_integration import BoTorchSampler
    from optuna_integration.botorch import qnehvi_candidates_func

    _skip_botorch_runtime_compile()
    candidates = qnehvi_candidates_func if len(search.objectives) > 1 else None  # one objective: its default (logEI)
    return BoTorchSampler(candidates_func=candidates, n_startup_trials=search.n_startup, seed=seed,
                          independent_sampler=optuna.samplers.RandomSampler(seed=seed))


def _skip_botorch_runtime_compile() -> None:
    """botorch >= 0.18 compiles a C++ kernel for qLogNEHVI at first use (``-march=native``, into
    ``~/.cache/torch_extensions``) under a lock file. A compile that is interrupted (Ctrl-C, a killed worker) leaves
    the lock behind and every later search waits on it forever (seen here: a search hung with zero CPU). The kernel
    only speeds the acquisition ~3x, which is small beside a trial's training, so deltatune takes botorch's own
    pure-PyTorch fallback: the same values. The flag is botorch's "load already attempted" sentinel."""
    try:
        from botorch.acquisition.multi_objective import logei
    except ImportError:  # an older botorch without the kernel: nothing to skip
        return
    if hasattr(logei, "_load_attempted"):
        logei._load_attempted = True


PRUNING = ".pruning"  # the pruner's single-objective companion study: "<study>.pruning"


def make_pruner(search: Search, config: dict[str, Any]) -> Any:
    """optuna's median or Hyperband pruner. Median: a trial stops when its dev metric at an evaluation is worse than
    the median of the finished trials' at the same step (after ``search.startup`` finished trials). Hyperband: its
    resource is the training step, from the first evaluation to the run's steps."""
    import optuna

    if search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=search.n_startup, n_warmup_steps=0)
    train = config.get("train") or {}
    steps = train.get("steps")
    return optuna.pruners.HyperbandPruner(min_resource=int(train.get("eval_every") or 1),
                                          max_resource=int(steps) if isinstance(steps, int) else "auto",
                                          reduction_factor=3)


def _pruning_study(url: str, search: Search, config: dict[str, Any], storage: Any) -> Any:
    """The companion study the pruner judges in. optuna's pruners (and ``Trial.report``) are single-objective, so
    each trial of the multi-objective study has a twin here that holds its intermediate values of the first
    objective (in the same database: workers and a resumed search share it) and ends as the trial ends."""
    import optuna

    first = next(iter(search.objectives))
    return optuna.create_study(storage=storage, study_name=search.study + PRUNING, load_if_exists=True,
                               direction=search.objectives[first], pruner=make_pruner(search, config))


def _objective(study: Any, search: Search, base: dict[str, Any], out: Path, runner: Runner,
               shadow: Any = None) -> Callable[[Any], Any]:
    from deltatune.ops.search_space import suggest

    def objective(trial: Any) -> list[float]:
        trial.set_user_attr("worker", {"host": socket.gethostname(), "pid": os.getpid()})
        others = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number and counts(t)]
        if len(others) >= search.trials:  # another worker took the last trial between our count and this one
            trial.set_user_attr("extra", True)
            raise TrialFailed
        values = suggest(trial, search.space, base)
        trial.set_user_attr("values", json.loads(json.dumps(values)))
        config = trial_config(base, search.space, values)
        folder = out / "trials" / str(trial.number)
        config["output"] = str((folder / "run").resolve())
        config["train"] = {**(config.get("train") or {}), **TRIAL_TRAIN}
        twin = shadow.ask() if shadow is not None else None
        kwargs = {"report": _reporter(twin, search)} if twin is not None and takes_report(runner) else {}
        try:
            result = runner(config, folder, **kwargs)
        except TrialFailed:
            raise
        except Exception as e:  # noqa: BLE001 (an in-process runner's failure is the trial's, as a worker's is)
            result = {"error": f"{type(e).__name__}: {' '.join(str(e).split())}"}
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # the trial's delta: the front's configs are rerun in full
        result = json.loads(json.dumps(result, default=str))
        if twin is not None:
            trial.set_user_attr("intermediate", [[s, v] for s, v in sorted(twin.storage.get_trial(
                twin._trial_id).intermediate_values.items())])
        if result.get("pruned") is not None and "error" not in result:
            import optuna

            trial.set_user_attr("pruned_at", result["pruned"])
            shadow.tell(twin, state=optuna.trial.TrialState.PRUNED)
            raise optuna.TrialPruned(f"pruned at step {result['pruned']}")
        scores, error = _scores(result, search)
        trial.set_user_attr("result", {k: v for k, v in result.items() if k != "error"})
        if error is not None:
            trial.set_user_attr("error", error)
            if twin is not None:
                import optuna

                shadow.tell(twin, state=optuna.trial.TrialState.FAIL)
            raise TrialFailed
        if twin is not None:
            shadow.tell(twin, scores[0])
        return scores

    return objective


def _reporter(twin: Any, search: Search) -> Callable[[int, dict[str, Any]], bool]:
    """The ``report(step, metrics) -> prune?`` a runner calls with each intermediate evaluation: the first
    objective's value goes to the twin trial, and its pruner answers."""
    first = next(iter(search.objectives))

    def report(step: int, metrics: dict[str, Any]) -> bool:
        value = metrics.get(first, metrics.get(f"eval_{first}"))
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return False  # nothing to judge by at this evaluation
        if step in twin.storage.get_trial(twin._trial_id).intermediate_values:
            return False  # optuna keeps the first value of a step
        twin.report(float(value), step)
        return bool(twin.should_prune())

    return report


def _scores(result: dict[str, Any], search: Search) -> tuple[list[float], str | None]:
    """The objectives' values from a trial's result, or why there are none."""
    if "error" in result:
        return [], str(result["error"])
    scores = []
    for name in search.objectives:
        value = result.get(name, (result.get("metrics") or {}).get(name))
        if value is None:
            return [], f"the trial reported no {name}"
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return [], f"the trial's {name} is {value!r}, not a finite number (a diverged run?)"
        scores.append(float(value))
    return scores, None


# -- outputs -----------------------------------------------------------------------------------------------------
def finished(study: Any) -> list[Any]:
    """The completed trials, in trial order."""
    from optuna.trial import TrialState

    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


def front(study: Any, search: Search) -> tuple[list[Any], np.ndarray]:
    """The completed trials and which of them are on the Pareto front."""
    done = finished(study)
    if not done:
        return [], np.zeros(0, dtype=bool)
    points = pareto.minimized([t.values for t in done], list(search.objectives.values()))
    return done, pareto.pareto_mask(points)


def hypervolumes(study: Any, search: Search) -> tuple[list[float], np.ndarray | None]:
    """The hypervolume after each completed trial, and the reference point (minimised values)."""
    done = finished(study)
    if not done:
        return [], None
    points = pareto.minimized([t.values for t in done], list(search.objectives.values()))
    signs = [-1.0 if d == "maximize" else 1.0 for d in search.objectives.values()]
    given = [search.reference[n] * s if n in search.reference else None for n, s in zip(search.objectives, signs,
                                                                                       strict=True)]
    ref = pareto.reference_point(points, given)
    return pareto.hypervolume_history(points, ref), ref


def _state(trial: Any) -> str:
    if trial.user_attrs.get("interrupted"):
        return "interrupted"
    return {"COMPLETE": "complete", "FAIL": "failed", "PRUNED": "pruned"}.get(trial.state.name,
                                                                              trial.state.name.lower())


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value)


def write_csv(study: Any, search: Search, out: Path) -> None:
    """``trials.csv``: one row per trial (not those taken past the count): state, the values, the objectives,
    whether it is on the front, its duration and, for a failure, why."""
    done, mask = front(study, search)
    on_front = {t.number for t, m in zip(done, mask, strict=True) if m}
    keys = [d.key for d in search.space]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["trial", "state", *keys, *search.objectives, "pareto", "seconds", "error"])
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("extra"):
            continue
        values = t.user_attrs.get("values") or {}
        scores = list(t.values) if t.values else [None] * len(search.objectives)
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and \
            t.datetime_start else None
        writer.writerow([t.number, _state(t), *[_cell(values.get(k)) for k in keys], *[_cell(s) for s in scores],
                         "yes" if t.number in on_front else "", f"{seconds:.1f}" if seconds is not None else "",
                         t.user_attrs.get("error", "")])
    write_text(out / "trials.csv", buf.getvalue())


def write_outputs(study: Any, search: Search, config: dict[str, Any], out: Path) -> None:
    """``trials.csv``, ``pareto.png`` and ``pareto/<trial>.yaml`` (one run config per front configuration)."""
    write_csv(study, search, out)
    done, mask = front(study, search)
    _write_front_configs([t for t, m in zip(done, mask, strict=True) if m], search, config, out)
    if done:
        plot(study, search, out / "pareto.png")


def _write_front_configs(trials: list[Any], search: Search, config: dict[str, Any], out: Path) -> None:
    import yaml

    folder = out / "pareto"
    folder.mkdir(parents=True, exist_ok=True)
    keep = {f"{t.number}.yaml" for t in trials}
    for old in folder.glob("*.yaml"):  # a configuration no longer on the front
        if old.name not in keep:
            old.unlink(missing_ok=True)
    for t in trials:
        values = t.user_attrs.get("values") or {}
        run_config = trial_config(config, search.space, values)
        run_config["output"] = str(Path(out) / "runs" / f"pareto-{t.number}")
        scores = ", ".join(f"{name} {_shown(name, v)}" for name, v in zip(search.objectives, t.values, strict=True))
        path = folder / f"{t.number}.yaml"
        header = (f"# trial {t.number} of the search in {out} (on the Pareto front; dev split): {scores}\n"
                  f"# deltatune train {path}   # trains it on the config's full training data\n")
        write_text(path, header + yaml.safe_dump(run_config, sort_keys=False))


def _shown(name: str, value: float) -> str:
    if name in ("trainable",):
        return f"{int(value):,}"
    if name == "peak_memory":
        return f"{value / 2**20:.0f} MiB"
    return f"{value:.4g}"


def front_rows(study: Any, search: Search) -> list[dict[str, Any]]:
    """The front as rows (trial number, its values, its objectives), ordered by the last objective (the cost)."""
    done, mask = front(study, search)
    rows = [{"trial": t.number, "values": t.user_attrs.get("values") or {},
             "objectives": dict(zip(search.objectives, t.values, strict=True))}
            for t, m in zip(done, mask, strict=True) if m]
    last = list(search.objectives)[-1]
    return sorted(rows, key=lambda r: (r["objectives"][last], r["trial"]))


def plot(study: Any, search: Search, path: Path) -> None:
    """``pareto.png``: every completed trial (by method where the method is searched), the front joined by a line;
    beside it the hypervolume after each trial."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done, mask = front(study, search)
    names = list(search.objectives)
    history, ref = hypervolumes(study, search)
    fig, (ax, hv) = plt.subplots(1, 2, figsize=(11, 4.2))
    y_name = names[0]
    x_name = names[1] if len(names) > 1 else None
    xs = [t.values[1] if x_name else t.number for t in done]
    ys = [t.values[0] for t in done]
    methods = [str((t.user_attrs.get("values") or {}).get("method.name", "")) for t in done]
    for method in dict.fromkeys(methods):
        pick = [i for i, m in enumerate(methods) if m == method]
        ax.scatter([xs[i] for i in pick], [ys[i] for i in pick], s=22, alpha=0.6, label=method or "trials")
    on = sorted((xs[i], ys[i], done[i].number) for i in range(len(done)) if mask[i])
    ax.plot([p[0] for p in on], [p[1] for p in on], "-o", color="black", mfc="none", ms=9, lw=1, label="Pareto front")
    for x, y, n in on:
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if x_name in ("trainable", "peak_memory") and min(xs) > 0:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels of a narrow range overlap
    ax.set_xlabel(f"{x_name} ({search.objectives[x_name]})" if x_name else "trial")
    ax.set_ylabel(f"dev {y_name} ({search.objectives[y_name]})")
    ax.set_title(f"{len(done)} completed trials; the front's numbers are trials")
    ax.legend(fontsize=7)
    hv.plot([t.number for t in done], history, "-", color="tab:green")
    hv.set_xlabel("trial")
    hv.set_ylabel("hypervolume")
    # each tick its own number: matplotlib's shared offset ("1e6") sits on the title
    hv.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.4g}"))
    ref_text = ", ".join(f"{n} {abs(r):.4g}" for n, r in zip(names, ref if ref is not None else [], strict=False))
    hv.set_title(f"hypervolume (reference: {ref_text})", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    replace_bytes(path, buf.getvalue())
