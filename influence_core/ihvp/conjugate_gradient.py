"""Conjugate gradient on a block of right-hand sides (Martens 2010)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from ..errors import ConvergenceWarning, NotPositiveDefiniteError, format_above
from ..progress import progress_counter
from .base import (
    DEFAULT_DAMPING,
    ITERATIVE_CURVATURE,
    PER_POINT_LIMIT,
    Array,
    InverseHessianVectorProduct,
    known_size,
)

__all__ = ["ConjugateGradientIHVP"]


class ConjugateGradientIHVP(InverseHessianVectorProduct):
    """Solves (H + λI) X = V by conjugate gradient, all k columns at once.

    Fitting only binds the model and its data (CG needs no factorisation).
    Each iteration of a solve makes **one** batched HVP pass over the data for
    the whole block (the columns run independent CG recurrences that share
    the HVP), so k right-hand sides cost about what one does. Stops when every
    column's relative residual ‖(H + λI)x − v‖ / ‖v‖ is at most ``tol``;
    otherwise warns with :class:`~influence_core.errors.ConvergenceWarning`
    and the residual. ``residuals_`` (per column) and ``iterations_`` record
    the most recent solve.

    Only HVPs are needed, so any d works; cost is ``maxiter`` data passes.
    A non-positive curvature pᵀ(H + λI)p ≤ 0 proves H + λI is not positive
    definite and raises :class:`~influence_core.errors.NotPositiveDefiniteError`.

    Args:
        damping: λ.
        batch_size: batch size for ``(X, y)`` arrays.
        tol: the relative residual every column must reach.
        maxiter: the most iterations (data passes) per solve.
        curvature: ``"ggn"`` (the default, :data:`~influence_core.ihvp.ITERATIVE_CURVATURE`:
            the Gauss–Newton matrix) or ``"hessian"`` (see
            :class:`~influence_core.ihvp.InverseHessianVectorProduct`).
        per_point_limit: the most estimated multiply-adds (d × training points ×
            ``maxiter`` × fitted samples) that self-influence or RelatIF may take,
            one block solve per training batch; beyond it they are refused up
            front (:class:`~influence_core.errors.CostLimitError`). ``None``: no limit.
    """

    def __init__(
        self,
        *,
        damping: float = DEFAULT_DAMPING,
        batch_size: int | None = None,
        curvature: str = ITERATIVE_CURVATURE,
        tol: float = 1e-10,
        maxiter: int = 100,
        per_point_limit: float | None = PER_POINT_LIMIT,
    ) -> None:
        super().__init__(damping=damping, batch_size=batch_size, curvature=curvature)
        if int(maxiter) != maxiter or maxiter < 1:
            raise ValueError(
                f"maxiter must be an integer ≥ 1, got {maxiter}: CG with no iteration returns "
                "zeros. A few tens of iterations is typical; raise it if CG warns."
            )
        if not (math.isfinite(float(tol)) and tol >= 0):
            raise ValueError(f"tol must be a finite number ≥ 0, got {tol}")
        self.tol = float(tol)
        self.maxiter = int(maxiter)
        self.per_point_limit = None if per_point_limit is None else float(per_point_limit)

    def get_params(self) -> dict[str, Any]:
        params = {**super().get_params(), "tol": self.tol, "maxiter": self.maxiter}
        if self.per_point_limit != PER_POINT_LIMIT:
            params["per_point_limit"] = self.per_point_limit
        return params

    def samples_per_solve(self) -> int | None:
        """Up to ``maxiter`` HVP passes over the fitted samples (unknown size: no estimate)."""
        n_fit = known_size(self.model_, self.data_, self.batch_size)
        return None if n_fit is None else self.maxiter * n_fit

    def _solve_cost_reason(self) -> str:
        return f"up to maxiter={self.maxiter} passes over the fitted data"

    def _solve_block(self, vectors: Array) -> Array:
        xp = self.xp
        b_norm = xp.sqrt(xp.sum(vectors * vectors, axis=0))
        b_norm = xp.where(b_norm > 0, b_norm, xp.ones_like(b_norm))
        x = xp.zeros_like(vectors)
        r = vectors
        p = r
        rs = xp.sum(r * r, axis=0)
        residual = float(xp.max(xp.sqrt(rs) / b_norm))
        iterations = 0
        bar = progress_counter(desc="conjugate gradient", total=self.maxiter)
        while residual > self.tol and iterations < self.maxiter:
            bar.update(1)
            ap = self.damped_hvp(p)
            curvature = xp.sum(p * ap, axis=0)
            active = rs > 0
            if bool(xp.any(xp.logical_and(active, curvature <= 0))):
                rayleigh = curvature / xp.sum(p * p, axis=0)
                damped = float(xp.min(xp.where(active, rayleigh, xp.ones_like(rayleigh))))
                raise NotPositiveDefiniteError(
                    damped - self.damping,
                    self.damping,
                    how="Rayleigh quotient along a CG direction",
                )
            safe = xp.where(active, curvature, xp.ones_like(curvature))
            alpha = xp.where(active, rs / safe, xp.zeros_like(rs))
            x = x + alpha * p
            r = r - alpha * ap
            rs_new = xp.sum(r * r, axis=0)
            beta = xp.where(
                active, rs_new / xp.where(active, rs, xp.ones_like(rs)), xp.zeros_like(rs)
            )
            p = r + beta * p
            rs = rs_new
            iterations += 1
            residual = float(xp.max(xp.sqrt(rs) / b_norm))
            if not math.isfinite(residual):  # NaN compares false: it would end the loop silently
                raise NotPositiveDefiniteError(
                    math.nan, self.damping, how="curvature along a CG direction"
                )
        bar.close()
        #: Relative residual of each column after the last solve, and its iteration count.
        self.residuals_ = np.asarray(self.model_.to_numpy(xp.sqrt(rs) / b_norm), dtype=float)
        self.iterations_ = iterations
        if residual > self.tol:
            warnings.warn(
                f"conjugate gradient stopped after {iterations} iterations with relative residual "
                f"{format_above(residual, self.tol)} > tol={self.tol!r}; raise maxiter, or the damping to improve "
                "the conditioning",
                ConvergenceWarning,
                stacklevel=3,
            )
        return x
