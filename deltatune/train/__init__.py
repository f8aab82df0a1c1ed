"""Training: the run config, the native loop with policies, callbacks and exact resume."""

from deltatune.train.callbacks import Callback
from deltatune.train.config import EarlyStopping, RunConfig, TrainSettings, load_config, preset_names
from deltatune.train.loop import train

__all__ = ["Callback", "EarlyStopping", "RunConfig", "TrainSettings", "load_config", "preset_names", "train"]
