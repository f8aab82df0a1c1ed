"""The one exception type users catch: every message names the problem and the fix."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn


class DeltatuneError(Exception):
    """A user-facing error: bad input, a missing package, an artifact that does not fit."""


def run_script(main: Callable[[], int | None]) -> NoReturn:
    """Run a study script's ``main`` as the CLI runs a verb: a DeltatuneError (a folder it may not write, a row
    that does not exist) or an OSError (a full disk, a path it may not read) ends it with the message on stderr
    and exit code 2, not with a traceback."""
    try:
        code = main()
    except (DeltatuneError, OSError) as e:  # OSError: a disk full, a path it may not read or write
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code)
