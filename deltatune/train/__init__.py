"""Training: the run config, the native loop with policies, callbacks and exact resume."""

from deltatune.train.callbacks import Callback
from deltatune.train.config import RunConfig, TrainSettings, load_config, preset_names
from deltatune.train.loop import train

__all__ = ["Callback", "RunConfig", "TrainSettings", "load_config", "preset_names", "train"]
