"""Influence estimators, written once on the protocol and the array namespace."""

from .arnoldi_influence import ArnoldiInfluenceCalculator
from .first_order import FirstOrderInfluenceCalculator
from .running_top_k import RunningTopK, TopK
from .second_order import SecondOrderInfluenceCalculator
from .tracin import TracIn

__all__ = [
    "ArnoldiInfluenceCalculator",
    "FirstOrderInfluenceCalculator",
    "RunningTopK",
    "SecondOrderInfluenceCalculator",
    "TopK",
    "TracIn",
]
