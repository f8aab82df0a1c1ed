"""The command line (``deltatune VERB``), the demo, the benchmark and their reports: the top layer, imported by nothing."""

from deltatune.cli.main import app, main

__all__ = ["app", "main"]
