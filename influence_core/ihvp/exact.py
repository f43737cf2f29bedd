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
    factorised as H + λI = L Lᵀ (Cholesky). The solver keeps only
    ``inverse`` = (H + λI)⁻¹ = L⁻ᵀ L⁻¹ (d × d; the Hessian itself is dropped), so
    a block of k right-hand sides costs one (d × d)(d × k) product and the
    self-influences gᵢᵀ(H + λI)⁻¹gᵢ of a batch one (b × d)(d × d) product.
    (Keeping L⁻¹ instead cost two products per solve: 2x slower in the
    benchmark, ``docs/benchmarks.md``.)

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
        del hessian, damped
        lower_inverse = xp.linalg.solve(lower, eye)
        del lower, eye
        inverse = xp.matmul(xp.matrix_transpose(lower_inverse), lower_inverse)
        #: (H + λI)⁻¹, symmetric positive definite, d × d.
        self.inverse = 0.5 * (inverse + xp.matrix_transpose(inverse))

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
        return self.xp.matmul(self.inverse, vectors)

    def quadratic_forms(self, grads: Array) -> Array:
        """gᵢᵀ (H + λI)⁻¹ gᵢ for each row: one (b × d)(d × d) product for the batch."""
        xp = self.xp
        return xp.sum(xp.matmul(grads, self.inverse) * grads, axis=1)
