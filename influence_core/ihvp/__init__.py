"""Inverse-Hessian-vector-product solvers, written once for every backend.

All solve (H + λI) X = V for a block V, H the Hessian of the mean training
loss: :class:`ExactIHVP` (one Cholesky factorisation, small d),
:class:`ConjugateGradientIHVP` (block CG, any d), :class:`LissaIHVP`
(stochastic, any d), :class:`ArnoldiIHVP` (top-k eigenpairs, any d) and
:class:`KFACIHVP` / :class:`EKFACIHVP` (Kronecker-factored curvature per
layer, from layer-wise statistics: any d, no HVPs).
Class names follow the Influenciae paper's table.
"""

from .arnoldi import ArnoldiIHVP
from .base import DEFAULT_DAMPING, ITERATIVE_CURVATURE, InverseHessianVectorProduct
from .conjugate_gradient import ConjugateGradientIHVP
from .exact import MAX_EXACT_PARAMETERS, ExactIHVP
from .kfac import EKFACIHVP, FACTORED_DAMPING, KFACIHVP
from .lissa import LISSA_DAMPING, LISSA_MIN_SCALE, LissaIHVP, largest_eigenvalue

__all__ = [
    "DEFAULT_DAMPING",
    "EKFACIHVP",
    "FACTORED_DAMPING",
    "ITERATIVE_CURVATURE",
    "KFACIHVP",
    "LISSA_DAMPING",
    "LISSA_MIN_SCALE",
    "MAX_EXACT_PARAMETERS",
    "ArnoldiIHVP",
    "ConjugateGradientIHVP",
    "ExactIHVP",
    "InverseHessianVectorProduct",
    "LissaIHVP",
    "largest_eigenvalue",
]
