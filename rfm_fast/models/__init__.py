"""Estimators built on the ops: the Recursive Feature Machine and Deep RFM."""

from .deep_rfm import DeepRFM
from .rfm import RFM

__all__ = ["RFM", "DeepRFM"]
