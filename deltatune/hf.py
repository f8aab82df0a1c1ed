"""``from deltatune.hf import DeltaTuneTrainer``: the public name of the ``transformers.Trainer`` bridge.

The bridge lives in the train layer (``deltatune/train/hf.py``); this module only keeps the public import path.
"""

from deltatune.train.hf import (
    DeltaTuneCallback,
    DeltaTuneTrainer,
    load_policy_state,
    save_policy_state,
    trainer_kwargs,
)

__all__ = ["DeltaTuneCallback", "DeltaTuneTrainer", "load_policy_state", "save_policy_state", "trainer_kwargs"]
