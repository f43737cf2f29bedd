"""Attribution through training: exact metagradients of a replayed run (MAGIC's setting).

``ReplayedTraining`` (:mod:`.replay`) fixes a run (θ₀, a seeded batch order,
an optimizer from :mod:`.optimizers`) and differentiates its final test loss
with respect to each training sample's weight, in any framework.
"""

from .optimizers import SGD, Adam, Optimizer
from .replay import ReplayedTraining

__all__ = ["SGD", "Adam", "Optimizer", "ReplayedTraining"]
