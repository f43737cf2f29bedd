"""Low-rank inverse-Hessian-vector products from Arnoldi iteration (Schioppa et al. 2022)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..model import InfluenceModel
from ..progress import progress
from .base import DEFAULT_DAMPING, Array, InverseHessianVectorProduct

__all__ = ["ArnoldiIHVP"]


class ArnoldiIHVP(InverseHessianVectorProduct):
    """(H + λI)⁻¹ ≈ Σ_{j ≤ k} u_j u_jᵀ / (λ_j + λ) from the top-k eigenpairs of H.

    Arnoldi iteration (with full re-orthogonalisation, one HVP pass over
    ``data`` per step) from a start vector seeded by ``seed`` builds an
    orthonormal Krylov basis Q of ``iterations`` vectors and the projection
    T = Qᵀ H Q; on breakdown (an invariant subspace, as a repeated or zero
    eigenvalue causes) it restarts from a fresh seeded direction, so at
    ``rank = iterations = d`` the result is exact. The eigenpairs of T with the **largest** eigenvalues give
    λ_j and u_j = Q w_j; the ``rank`` largest are kept. (Influenciae keeps the
    smallest; the directions that matter for influence are the large ones.)

    The approximation ignores H's complement of the top-k subspace: accuracy
    rises with ``rank``. On a convex model, rank ≥ d/3 typically reaches a
    Pearson correlation of 0.95 with exact influence; rank 20 about 0.5.
    ``eigenvalues`` (k,) and ``eigenvectors`` (d, k) are exposed, so scores can
    be computed from projections uᵀg.
    """

    def __init__(
        self,
        model: InfluenceModel,
        data: Any,
        *,
        damping: float = DEFAULT_DAMPING,
        batch_size: int | None = None,
        rank: int = 50,
        iterations: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(model, data, damping=damping, batch_size=batch_size)
        d = model.num_parameters
        iterations = min(d, iterations if iterations is not None else 2 * rank)
        if not 1 <= rank <= iterations:
            raise ValueError(
                f"need 1 ≤ rank ≤ iterations ≤ d={d}; got rank={rank}, iterations={iterations}"
            )
        self.rank = int(rank)
        self.iterations = int(iterations)
        self.seed = int(seed)
        self.eigenvalues, self.eigenvectors = self._arnoldi()

    @classmethod
    def from_eigenpairs(
        cls,
        model: InfluenceModel,
        eigenvalues: Any,
        eigenvectors: Any,
        *,
        damping: float = DEFAULT_DAMPING,
    ) -> ArnoldiIHVP:
        """A solver from eigenpairs computed before (e.g. loaded from disk): no HVPs."""
        kernels = model.kernels
        values = kernels.as_native(eigenvalues, floating=True)
        vectors = kernels.as_native(eigenvectors, floating=True)
        d = model.num_parameters
        if len(vectors.shape) != 2 or int(vectors.shape[0]) != d:
            raise ValueError(f"eigenvectors must have shape ({d}, k), got {tuple(vectors.shape)}")
        if tuple(values.shape) != (int(vectors.shape[1]),):
            raise ValueError("need one eigenvalue per eigenvector column")
        solver = cls.__new__(cls)
        InverseHessianVectorProduct.__init__(solver, model, None, damping=damping)
        solver.rank = solver.iterations = int(vectors.shape[1])
        solver.seed = -1
        solver.eigenvalues, solver.eigenvectors = values, vectors
        return solver

    def _arnoldi(self) -> tuple[Array, Array]:
        xp, kernels = self.xp, self.model.kernels
        d, m = self.model.num_parameters, self.iterations
        rng = np.random.default_rng(self.seed)

        def orthogonalise(w: Array, basis: list[Array]) -> tuple[Array, Any]:
            """w minus its projection on the basis (classical Gram-Schmidt, twice)."""
            Q = xp.concat(basis, axis=1)
            total = 0.0
            for _ in range(2):
                coefficients = xp.matmul(xp.matrix_transpose(Q), w)
                w = w - xp.matmul(Q, coefficients)
                total = total + kernels.to_numpy(coefficients)[:, 0]
            return w, total

        start = rng.normal(size=(d, 1))
        basis = [kernels.as_native(start / np.linalg.norm(start), floating=True)]
        projection = np.zeros((m, m))
        for j in progress(range(m), desc="Arnoldi"):
            w, coefficients = orthogonalise(
                self.model.hvp(self.data, basis[j], batch_size=self.batch_size), basis
            )
            projection[: j + 1, j] = coefficients
            if j + 1 == m:
                break
            norm = float(xp.linalg.vector_norm(w))
            if norm > 1e-10 * max(1.0, float(np.abs(projection[: j + 1, : j + 1]).max())):
                projection[j + 1, j] = norm
                basis.append(w / norm)
                continue
            # Breakdown: the Krylov space is invariant under H (a repeated or zero
            # eigenvalue). Restart from a fresh random direction orthogonal to it, so
            # a multi-dimensional eigenspace (e.g. softmax's null space) is spanned too.
            fresh, _ = orthogonalise(
                kernels.as_native(rng.normal(size=(d, 1)), floating=True), basis
            )
            basis.append(fresh / xp.linalg.vector_norm(fresh))
        T = 0.5 * (projection + projection.T)  # symmetric H: tridiagonal up to rounding
        values, vectors = np.linalg.eigh(T)
        keep = np.argsort(values)[::-1][: self.rank]  # the LARGEST eigenvalues
        Q = xp.concat(basis, axis=1)
        eigenvectors = xp.matmul(Q, kernels.as_native(vectors[:, keep], floating=True))
        return kernels.as_native(values[keep], floating=True), eigenvectors

    def _solve_block(self, vectors: Array) -> Array:
        xp = self.xp
        u = self.eigenvectors
        coefficients = xp.matmul(xp.matrix_transpose(u), vectors)  # (k, b)
        scaled = coefficients / xp.reshape(self.eigenvalues + self.damping, (-1, 1))
        return xp.matmul(u, scaled)

    def quadratic_forms(self, grads: Array) -> Array:
        """Σ_j (u_jᵀ g)² / (λ_j + λ) per row: one (b × d)(d × k) product."""
        xp = self.xp
        projected = xp.matmul(grads, self.eigenvectors)  # (b, k)
        return xp.sum(projected * projected / (self.eigenvalues + self.damping), axis=1)
