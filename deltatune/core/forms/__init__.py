"""Forms: what a delta looks like and where it lives (see docs/architecture.md)."""

from deltatune.core.forms.base import Form, WeightDelta
from deltatune.core.forms.dense import Dense
from deltatune.core.forms.inplace import InPlace
from deltatune.core.forms.lowrank import LowRank

__all__ = ["Form", "WeightDelta", "Dense", "InPlace", "LowRank"]
