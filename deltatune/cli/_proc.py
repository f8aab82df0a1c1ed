"""Worker subprocesses (demo and bench runs) that end when their parent does."""

from __future__ import annotations

import signal
import sys


def die_with_parent() -> None:
    """``preexec_fn`` for a worker: on Linux the kernel sends it SIGTERM when the parent dies, so a
    killed ``deltatune demo`` / ``bench`` leaves no training process behind. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
