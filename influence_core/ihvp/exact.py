"""Exact inverse-Hessian-vector products from one Cholesky factorisation."""

from __future__ import annotations

import math
from collections.abc import Callable
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

    :meth:`fit` assembles H from blocks of HVPs over the data, symmetrises and
    damps it, and factorises H + λI = L Lᵀ (Cholesky). The solver keeps only
    ``inverse_`` = (H + λI)⁻¹ = L⁻ᵀ L⁻¹ (d × d; the Hessian itself is
    dropped), so a block of k right-hand sides costs one (d × d)(d × k)
    product and the self-influences gᵢᵀ(H + λI)⁻¹gᵢ of a batch one
    (b × d)(d × d) product. (Keeping L⁻¹ instead costs two products per solve;
    ``make bench`` measures the solve, ``docs/benchmarks.md``.)

    :meth:`fit` raises :class:`~influence_core.errors.NotPositiveDefiniteError`
    (with the smallest eigenvalue and a damping that would work) when H + λI is
    not positive definite, and refuses d above ``max_parameters``.

    Args:
        damping: λ.
        batch_size: batch size for ``(X, y)`` arrays.
        max_parameters: the largest d accepted.
        curvature: ``"hessian"`` or ``"ggn"`` (the Gauss–Newton matrix; see
            :class:`~influence_core.ihvp.InverseHessianVectorProduct`).
    """

    def __init__(
        self,
        *,
        damping: float = DEFAULT_DAMPING,
        batch_size: int | None = None,
        curvature: str = "hessian",
        max_parameters: int = MAX_EXACT_PARAMETERS,
    ) -> None:
        super().__init__(damping=damping, batch_size=batch_size, curvature=curvature)
        if int(max_parameters) < 1:
            raise ValueError(f"max_parameters must be ≥ 1, got {max_parameters}")
        self.max_parameters = int(max_parameters)

    def get_params(self) -> dict[str, Any]:
        return {**super().get_params(), "max_parameters": self.max_parameters}

    def _fit(self, model: InfluenceModel, data: Any) -> None:
        d = model.num_parameters
        if d > self.max_parameters:
            raise ValueError(
                f"ExactIHVP needs the full {d} x {d} Hessian (above max_parameters="
                f"{self.max_parameters}). Select fewer parameters (e.g. the last layer), or use "
                "ConjugateGradientIHVP, LissaIHVP or ArnoldiIHVP, which only need HVPs."
            )
        xp = model.xp
        hessian = model.hessian(
            data,
            batch_size=self.batch_size,
            max_parameters=self.max_parameters,
            curvature=self.curvature,
        )
        hessian = 0.5 * (hessian + xp.matrix_transpose(hessian))
        eye = model.kernels.as_native(xp.eye(d, dtype=model.dtype), floating=True)
        damped = hessian + self.damping * eye
        lower = self._cholesky(xp, damped)
        del hessian, damped
        lower_inverse = xp.linalg.solve(lower, eye)
        del lower, eye
        inverse = xp.matmul(xp.matrix_transpose(lower_inverse), lower_inverse)
        #: (H + λI)⁻¹, symmetric positive definite, d × d.
        self.inverse_ = 0.5 * (inverse + xp.matrix_transpose(inverse))

    def _cholesky(self, xp: Any, damped: Array) -> Array:
        try:
            lower = xp.linalg.cholesky(damped)
            ok = bool(xp.all(xp.isfinite(lower)))
        except Exception:  # each framework signals failure its own way
            ok = False
        if not ok and not bool(xp.all(xp.isfinite(damped))):  # NaN curvature: no eigenvalues
            raise NotPositiveDefiniteError(math.nan, self.damping)
        if not ok:
            smallest = float(xp.min(xp.linalg.eigh(damped).eigenvalues)) - self.damping
            raise NotPositiveDefiniteError(smallest, self.damping)
        return lower

    # -- matrix functions of the fitted curvature (approximate unrolling) ----------------
    def layer_matrices(self, grads: Array) -> list[Array]:
        """Gradients (k, d) as the one block the matrix functions act on (k leading, as K-FAC's)."""
        self._check_fitted()
        return [grads]

    def spectral(self, matrices: list[Array], function: Callable[[Array], Array]) -> list[Array]:
        """V ↦ Q φ(s) Qᵀ V for the eigenpairs (s, Q) of H + λI (``eigh`` of the fitted inverse),
        for each (k, d) block V (rows are vectors)."""
        self._check_fitted()
        xp = self.xp
        if getattr(self, "_eigenpairs", None) is None or self._eigenpairs[0] is not self.inverse_:
            pairs = xp.linalg.eigh(self.inverse_)
            self._eigenpairs = (self.inverse_, 1.0 / pairs.eigenvalues, pairs.eigenvectors)
        _, values, vectors = self._eigenpairs
        transposed = xp.matrix_transpose(vectors)
        return [xp.matmul(xp.matmul(m, vectors) * function(values), transposed) for m in matrices]

    def flattened(self, matrices: list[Array]) -> Array:
        """The (d, k) block: what :meth:`training_side` scores meet."""
        (block,) = matrices
        return self.xp.matrix_transpose(block)

    def _fitted_arrays(self) -> dict[str, Array]:
        return {"inverse_": self.inverse_}

    def _restore(self, arrays: dict[str, Array]) -> None:
        self.inverse_ = arrays["inverse_"]

    def _solve_block(self, vectors: Array) -> Array:
        return self.xp.matmul(self.inverse_, vectors)

    def quadratic_forms(self, grads: Array) -> Array:
        """gᵢᵀ (H + λI)⁻¹ gᵢ for each row: one (b × d)(d × d) product for the batch."""
        xp = self.xp
        return xp.sum(xp.matmul(grads, self.inverse_) * grads, axis=1)
