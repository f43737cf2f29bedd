"""Attribution through training: exact metagradients of a replayed run (MAGIC's setting).

``ReplayedTraining`` (:mod:`.replay`) fixes a run (θ₀, a seeded batch order,
an optimizer from :mod:`.optimizers`) and differentiates its final test loss
with respect to each training sample's weight, in any framework.
``ApproximateUnrolling`` (:mod:`.segments`, SOURCE) approximates it over a few
segments of training, one EK-FAC curvature each, at a few first-order passes' cost.
"""

from .optimizers import SGD, Adam, AdamW, Optimizer
from .replay import ReplayedTraining
from .segments import ApproximateUnrolling

__all__ = ["SGD", "Adam", "AdamW", "ApproximateUnrolling", "Optimizer", "ReplayedTraining"]
