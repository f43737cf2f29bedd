"""Influence estimators, written once on the protocol and the array namespace."""

from .first_order import FirstOrderInfluenceCalculator
from .running_top_k import RunningTopK, TopK

__all__ = ["FirstOrderInfluenceCalculator", "RunningTopK", "TopK"]
