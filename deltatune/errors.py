"""The one exception type users catch: every message names the problem and the fix."""


class DeltatuneError(Exception):
    """A user-facing error: bad input, a missing package, an artifact that does not fit."""
