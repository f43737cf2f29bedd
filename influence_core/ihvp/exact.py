"""Exact inverse-Hessian-vector products from one Cholesky factorisation."""

from __future__ import annotations

from typing import Any

from ..errors import NotPositiveDefiniteError
from ..model import InfluenceModel
from .base import DEFAULT_DAMPING, Array, InverseHessianVectorProduct

__all__ = ["MAX_EXACT_PARAMETERS", "ExactIHVP"]

#: Largest d the exact solver accepts by default: the Hessian takes d² floats
#: (200 MB in float64 at d = 5000) and the factorisation O(d³) time.
MAX_EXACT_PARAMETERS = 5000


class ExactIHVP(InverseHessianVectorProduct):
    """(H + λI)⁻¹ from the full Hessian: built once, factorised once, reused.

    H is assembled from blocks of HVPs over ``data``, symmetrised, damped and
    factorised as H + λI = L Lᵀ (Cholesky). The solver keeps L⁻¹, so a block of
    k right-hand sides costs two (d × d)(d × k) products,
    (H + λI)⁻¹ V = L⁻ᵀ (L⁻¹ V), and a self-influence gᵀ(H + λI)⁻¹g = ‖L⁻¹ g‖²
    one product for a whole batch.

    Raises :class:`~influence_core.errors.NotPositiveDefiniteError` (with the
    smallest eigenvalue and a damping that would work) when H + λI is not
    positive definite, and refuses d above ``max_parameters``.
    """

    def __init__(
        self,
        model: InfluenceModel,
        data: Any,
        *,
        damping: float = DEFAULT_DAMPING,
        batch_size: int | None = None,
        max_parameters: int = MAX_EXACT_PARAMETERS,
    ) -> None:
        super().__init__(model, data, damping=damping, batch_size=batch_size)
        d = model.num_parameters
        if d > max_parameters:
            raise ValueError(
                f"ExactIHVP needs the full {d} x {d} Hessian (above max_parameters="
                f"{max_parameters}). Select fewer parameters (e.g. the last layer), or use "
                "ConjugateGradientIHVP, LissaIHVP or ArnoldiIHVP, which only need HVPs."
            )
        xp = self.xp
        hessian = model.hessian(data, batch_size=batch_size, max_parameters=max_parameters)
        hessian = 0.5 * (hessian + xp.matrix_transpose(hessian))
        eye = model.kernels.as_native(xp.eye(d, dtype=model.dtype), floating=True)
        damped = hessian + self.damping * eye
        lower = self._cholesky(damped)
        #: L⁻¹, lower triangular: (H + λI)⁻¹ = L⁻ᵀ L⁻¹.
        self.cholesky_inverse = xp.linalg.solve(lower, eye)
        self.hessian = hessian

    def _cholesky(self, damped: Array) -> Array:
        xp = self.xp
        try:
            lower = xp.linalg.cholesky(damped)
            ok = bool(xp.all(xp.isfinite(lower)))
        except Exception:  # each framework signals failure its own way
            ok = False
        if not ok:
            smallest = float(xp.min(xp.linalg.eigh(damped).eigenvalues))
            raise NotPositiveDefiniteError(smallest, self.damping)
        return lower

    def _solve_block(self, vectors: Array) -> Array:
        xp = self.xp
        inv = self.cholesky_inverse
        return xp.matmul(xp.matrix_transpose(inv), xp.matmul(inv, vectors))

    def quadratic_forms(self, grads: Array) -> Array:
        """‖L⁻¹ gᵢ‖² for each row: one (d × d)(d × b) product for the batch."""
        xp = self.xp
        projected = xp.matmul(self.cholesky_inverse, xp.matrix_transpose(grads))
        return xp.sum(projected * projected, axis=0)
