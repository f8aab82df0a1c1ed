"""deltatune: parameter-efficient fine-tuning where every fine-tune is a delta.

    import deltatune as dt
    model = dt.models.load("smollm2-135m")
    tuned = dt.attach(model, "lora", r=8, alpha=16, targets=["q_proj", "v_proj"])
    tuned.save("runs/lora"); plain = tuned.merge()
"""

import deltatune.methods  # noqa: F401  (importing the package registers every method)
from deltatune import data
from deltatune.api import (
    compress,
    eval,
    export,
    export_peft,
    fuse,
    generate,
    import_,
    import_peft,
    inspect,
    merge,
    methods,
    search,
)
from deltatune.core.tuned import Tuned, attach, load
from deltatune.data import models
from deltatune.errors import DeltatuneError
from deltatune.ops.compose import compose, revert
from deltatune.ops.merging import merge_deltas
from deltatune.train import train
from deltatune.version import __version__

__all__ = [
    "DeltatuneError",
    "Tuned",
    "__version__",
    "attach",
    "compose",
    "compress",
    "data",
    "eval",
    "export",
    "export_peft",
    "fuse",
    "generate",
    "import_",
    "import_peft",
    "inspect",
    "load",
    "merge",
    "merge_deltas",
    "methods",
    "models",
    "revert",
    "search",
    "train",
]


def __getattr__(name: str):
    """``dt.hf`` (the transformers.Trainer bridge) loads on first use: importing Trainer is slow."""
    if name == "hf":
        import importlib

        return importlib.import_module("deltatune.hf")
    raise AttributeError(f"module 'deltatune' has no attribute {name!r}")
