"""A search trial in a process of its own: ``python -m deltatune.ops.search_run MODULE:FUNCTION SPEC RESULT``.

The search (``deltatune.ops.search``) never imports the training loop (``ops`` sits beside ``train``, not above
it): the caller names the function that trains one trial (``deltatune.api`` names its own ``search_trial``), and
``isolated`` runs it in a fresh interpreter. A fresh process per trial means the peak memory a trial reports is its
own, and a crash, an out-of-memory kill or a hang in one trial is that trial's failure, not the search's. The worker
dies with the search: on Linux the kernel sends it SIGTERM when its parent ends (``die_with_parent``), so a killed
search leaves no training process behind.

Intermediate evaluations come back while the trial runs: the worker appends one JSON line per evaluation
(``report_intermediate``, which the trial function calls from its eval callback) to ``progress.jsonl`` in the trial's
folder, and the parent polls that file and hands each line to the search's ``report(step, metrics) -> prune?``; when
the pruner says prune, the parent terminates the worker and the trial's result is ``{"pruned": step}``. A file, not
the worker's stdout: training libraries print there, and a file survives the worker being killed mid-line (a line
without its newline is not read).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltatune.errors import DeltatuneError

# a trial: its run config and a folder of its own -> what it measured ({"metrics": {...}, "trainable": ...}),
# {"error": why it failed} or {"pruned": step}. A runner that takes a keyword ``report`` gets the search's
# ``Report``: it calls it with each intermediate evaluation and stops the trial when it answers True
Runner = Callable[..., dict[str, Any]]
Report = Callable[[int, dict[str, Any]], bool]
TAIL = 2000  # characters of a failed worker's stderr kept as its reason
PROGRESS_ENV = "DELTATUNE_TRIAL_PROGRESS"  # the worker's progress file (set by ``isolated`` for its worker)
PROGRESS = "progress.jsonl"
POLL_S = 0.25  # how often the parent reads the progress file: evaluations are seconds apart at least


def takes_report(runner: Runner) -> bool:
    """Whether ``runner`` accepts the keyword ``report`` (a runner that does not is never pruned)."""
    try:
        return "report" in inspect.signature(runner).parameters
    except (TypeError, ValueError):
        return False


def report_intermediate(step: int, metrics: dict[str, Any]) -> None:
    """In a trial worker: append an intermediate evaluation to the progress file its parent polls (a no-op outside
    a worker). One write of one whole line, flushed: the parent reads only lines that end."""
    path = os.environ.get(PROGRESS_ENV)
    if not path:
        return
    line = json.dumps({"step": int(step), "metrics": metrics}, default=float) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()


class _Progress:
    """The parent's reader of a worker's progress file: whole new lines since the last read."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.seen = path, 0, []

    def new(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        out = []
        for raw in chunk[:end].splitlines():
            try:
                out.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
        self.seen += out
        return out


def die_with_parent() -> None:
    """``preexec_fn`` of a trial worker (as ``deltatune.cli._proc``'s, which ``ops`` may not import): SIGTERM when
    the parent dies, on Linux; elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def isolated(target: str, timeout: float | None = None) -> Runner:
    """A runner that calls ``target`` (``"package.module:function"``, taking a run config mapping and returning a
    JSON-able dict) in a fresh ``python -m deltatune.ops.search_run`` process per trial."""
    module, _, function = target.partition(":")
    if not module or not function:
        raise DeltatuneError(f"a trial function is named 'module:function', got {target!r}")

    def run(config: dict[str, Any], folder: Path, report: Report | None = None) -> dict[str, Any]:
        folder.mkdir(parents=True, exist_ok=True)
        spec, result, progress = folder / "spec.json", folder / "result.json", folder / PROGRESS
        spec.write_text(json.dumps(config))
        for old in (result, progress):
            old.unlink(missing_ok=True)
        # stderr to a file, not a pipe: a chatty worker would fill a pipe nobody reads while the parent polls
        with open(folder / "stderr.txt", "w+") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "deltatune.ops.search_run", target, str(spec), str(result)],
                stdout=subprocess.DEVNULL, stderr=err, text=True,
                env={**os.environ, "TOKENIZERS_PARALLELISM": "false", PROGRESS_ENV: str(progress.resolve())},
                preexec_fn=die_with_parent,
            )
            outcome = _watch(proc, _Progress(progress), report, timeout)
            err.seek(0)
            stderr = err.read()
        if outcome is not None:
            return outcome
        if proc.returncode != 0 or not result.is_file():
            # killed by a signal (out of memory: SIGKILL) or a crash the worker could not report itself
            how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
            tail = " ".join(stderr.split())[-TAIL:]
            return {"error": f"the trial's process ended with {how}" + (f": {tail}" if tail else "")}
        return json.loads(result.read_text())

    return run


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _watch(proc: subprocess.Popen, progress: _Progress, report: Report | None, timeout: float | None
           ) -> dict[str, Any] | None:
    """Wait for the worker, handing its intermediate evaluations to ``report``; a result when the trial ends early
    (pruned, or past its time limit), None when the worker ended by itself."""
    start = time.monotonic()
    while True:
        done = proc.poll() is not None
        if report is not None:
            for line in progress.new():
                if report(int(line["step"]), dict(line.get("metrics") or {})):
                    if not done:
                        _stop(proc)
                    return {"pruned": int(line["step"]), "intermediate": progress.seen}
        if done:
            return None
        if timeout is not None and time.monotonic() - start > timeout:
            _stop(proc)
            return {"error": f"the trial ran past its time limit of {timeout:g} s"}
        time.sleep(POLL_S)


def _worker(target: str, spec: str, result: str) -> None:
    module, _, function = target.partition(":")
    fn = getattr(importlib.import_module(module), function)
    try:
        out = fn(json.loads(Path(spec).read_text()))
    except DeltatuneError as e:  # a bad combination, a loss that became NaN: the trial's reason
        out = {"error": " ".join(str(e).split())}
    except Exception as e:  # noqa: BLE001 (a trial's failure is recorded, the search goes on)
        last = traceback.extract_tb(e.__traceback__)[-1:]
        where = f" ({last[0].filename}:{last[0].lineno})" if last else ""
        out = {"error": f"{type(e).__name__}: {' '.join(str(e).split())}{where}"}
    Path(result).write_text(json.dumps(out))


if __name__ == "__main__":
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    _worker(*sys.argv[1:4])
