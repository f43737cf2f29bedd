"""Influence estimators, written once on the protocol and the array namespace."""

from .arnoldi_influence import ArnoldiInfluenceCalculator
from .base import InfluenceCalculator
from .first_order import FirstOrderInfluenceCalculator
from .gradient_similarity import GradientSimilarity
from .representer_l2 import RepresenterPointL2
from .representer_lje import RepresenterPointLJE
from .second_order import SecondOrderInfluenceCalculator
from .top_k import RunningTopK, TopK
from .tracin import TracIn
from .trak import TRAK

__all__ = [
    "TRAK",
    "ArnoldiInfluenceCalculator",
    "FirstOrderInfluenceCalculator",
    "GradientSimilarity",
    "InfluenceCalculator",
    "RepresenterPointL2",
    "RepresenterPointLJE",
    "RunningTopK",
    "SecondOrderInfluenceCalculator",
    "TopK",
    "TracIn",
]
