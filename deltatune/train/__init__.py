"""Training: the run config, the native loop with policies and exact resume."""

from deltatune.train.config import RunConfig, TrainSettings, load_config
from deltatune.train.loop import train

__all__ = ["RunConfig", "TrainSettings", "load_config", "train"]
