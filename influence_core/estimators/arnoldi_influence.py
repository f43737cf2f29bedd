"""Influence from a low-rank eigendecomposition of the Hessian (Schioppa et al. 2022)."""

from __future__ import annotations

from typing import Any

from ..ihvp import ArnoldiIHVP
from ..model import InfluenceModel
from .first_order import Array, FirstOrderInfluenceCalculator

__all__ = ["ArnoldiInfluenceCalculator"]


class ArnoldiInfluenceCalculator(FirstOrderInfluenceCalculator):
    """First-order influence over an :class:`~influence_core.ArnoldiIHVP`: scores in its eigenspace.

    With the k largest eigenpairs (λ_j, u_j) of the Hessian of the mean
    training loss, every gradient is projected to p(z) = D^{-1/2} Uᵀ g(z) ∈ ℝᵏ
    with D = diag(λ_j + λ) (:meth:`ArnoldiIHVP.project`), and::

        score(z_train, z_test) = p(z_test)ᵀ p(z_train)
                               ≈ g(z_test)ᵀ (H + λI)⁻¹ g(z_train)

    (Schioppa, Zablotskaia, Vilar, Sokolov, "Scaling Up Influence Functions",
    AAAI 2022). This *is* :class:`FirstOrderInfluenceCalculator`: the solver's
    projection is its test and training side, so training batches cost one
    (b × d)(d × k) product and one (b × k)(k × n_test) product, and
    self-influence is ‖p(z)‖². Same sign convention: positive means proponent.

    The approximation drops H outside its top-k eigenspace: at k = d it equals
    exact influence (accuracy against rank: ``tests/test_arnoldi_rank.py``).
    The fitted eigenpairs save and load with the solver
    (``calc.ihvp.save(dir)``, ``ArnoldiIHVP.load(dir, model, train_data)``).

    Args:
        model: the :class:`~influence_core.InfluenceModel`.
        ihvp: an :class:`~influence_core.ArnoldiIHVP` (default ``ArnoldiIHVP()``,
            rank 50); fitted by :meth:`fit` unless it already is.
        normalize, measurement, batch_size: as for :class:`FirstOrderInfluenceCalculator`.
    """

    def __init__(
        self,
        model: InfluenceModel,
        ihvp: ArnoldiIHVP | None = None,
        *,
        normalize: bool = False,
        measurement: Any = None,
        batch_size: int | None = None,
    ) -> None:
        ihvp = ihvp if ihvp is not None else ArnoldiIHVP()
        if not isinstance(ihvp, ArnoldiIHVP):
            raise TypeError(
                f"ArnoldiInfluenceCalculator needs an ArnoldiIHVP, got {type(ihvp).__name__}; "
                "use FirstOrderInfluenceCalculator for other solvers"
            )
        super().__init__(
            model, ihvp, normalize=normalize, measurement=measurement, batch_size=batch_size
        )

    @property
    def rank(self) -> int:
        return int(self.ihvp.eigenvalues_.shape[0])

    def project(self, data: Any) -> Array:
        """p(z) = D^{-1/2} Uᵀ g(z) of the training loss for every sample: shape (n, k)."""
        self._check_fitted()
        return self._stack(self.ihvp.project(g) for _, g in self._gradients(data))
