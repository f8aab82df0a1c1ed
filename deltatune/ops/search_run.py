"""A search trial in a process of its own: ``python -m deltatune.ops.search_run MODULE:FUNCTION SPEC RESULT``.

The search (``deltatune.ops.search``) never imports the training loop (``ops`` sits beside ``train``, not above
it): the caller names the function that trains one trial (``deltatune.api`` names its own ``search_trial``), and
``isolated`` runs it in a fresh interpreter. A fresh process per trial means the peak memory a trial reports is its
own, and a crash, an out-of-memory kill or a hang in one trial is that trial's failure, not the search's. The worker
dies with the search: on Linux the kernel sends it SIGTERM when its parent ends (``die_with_parent``), so a killed
search leaves no training process behind.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltatune.errors import DeltatuneError

# a trial: its run config and a folder of its own -> what it measured ({"metrics": {...}, "trainable": ...}) or
# {"error": why it failed}
Runner = Callable[[dict[str, Any], Path], dict[str, Any]]
TAIL = 2000  # characters of a failed worker's stderr kept as its reason


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

    def run(config: dict[str, Any], folder: Path) -> dict[str, Any]:
        folder.mkdir(parents=True, exist_ok=True)
        spec, result = folder / "spec.json", folder / "result.json"
        spec.write_text(json.dumps(config))
        result.unlink(missing_ok=True)
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "deltatune.ops.search_run", target, str(spec), str(result)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=timeout,
                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}, preexec_fn=die_with_parent,
            )
        except subprocess.TimeoutExpired:
            return {"error": f"the trial ran past its time limit of {timeout:g} s"}
        if proc.returncode != 0 or not result.is_file():
            # killed by a signal (out of memory: SIGKILL) or a crash the worker could not report itself
            how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
            tail = " ".join((proc.stderr or "").split())[-TAIL:]
            return {"error": f"the trial's process ended with {how}" + (f": {tail}" if tail else "")}
        return json.loads(result.read_text())

    return run


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
