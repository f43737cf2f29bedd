"""The interface every inverse-Hessian-vector-product solver implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from ..model import InfluenceModel
from ..namespace import ArrayNamespace

__all__ = ["DEFAULT_DAMPING", "InverseHessianVectorProduct"]

#: Default damping λ added to the Hessian: H + λI. It regularises the solve;
#: for a model trained with an L2 penalty (μ/2)‖θ‖² on the mean loss, pass
#: ``damping=μ`` to recover the exact Hessian of the training objective.
DEFAULT_DAMPING = 1e-3

Array = Any


class InverseHessianVectorProduct(ABC):
    """Solves (H + λI) X = V for a block of right-hand sides.

    H = ∇²_θ L(θ) is the Hessian of the *mean* loss L(θ) = (1/n) Σ_i ℓ(z_i, θ)
    over ``data`` (the training set), at the model's current parameters, and
    λ = ``damping``. Every solver works only through the autodiff protocol
    (:class:`~influence_core.InfluenceModel`) and the array namespace, so it
    runs unchanged on every backend.
    """

    def __init__(
        self,
        model: InfluenceModel,
        data: Any,
        *,
        damping: float = DEFAULT_DAMPING,
        batch_size: int | None = None,
    ) -> None:
        if damping < 0:
            raise ValueError(f"damping must be ≥ 0, got {damping}")
        self.model = model
        self.data = data
        self.damping = float(damping)
        self.batch_size = batch_size

    @property
    def xp(self) -> ArrayNamespace:
        return self.model.xp

    def damped_hvp(self, vectors: Array) -> Array:
        """(H + λI) V over the whole of ``data``, shape (d, k)."""
        return (
            self.model.hvp(self.data, vectors, batch_size=self.batch_size) + self.damping * vectors
        )

    def solve(self, vectors: Any) -> Array:
        """(H + λI)⁻¹ V: shape ``(d,)`` for one vector, ``(d, k)`` for a block (solved together)."""
        xp = self.xp
        v = self.model.kernels.as_native(vectors, floating=True)
        d = self.model.num_parameters
        if tuple(v.shape) == (d,):
            return xp.reshape(self._solve_block(xp.reshape(v, (d, 1))), (d,))
        if len(v.shape) != 2 or int(v.shape[0]) != d:
            raise ValueError(f"vectors must have shape ({d},) or ({d}, k), got {tuple(v.shape)}")
        return self._solve_block(v)

    def quadratic_forms(self, grads: Array) -> Array:
        """gᵢᵀ (H + λI)⁻¹ gᵢ for each row gᵢ of ``grads`` (shape (b, d)): shape (b,).

        The default solves the b right-hand sides as one block; solvers with a
        factorisation override it with something cheaper.
        """
        xp = self.xp
        solved = self._solve_block(xp.matrix_transpose(grads))  # (d, b)
        return xp.sum(grads * xp.matrix_transpose(solved), axis=1)

    @abstractmethod
    def _solve_block(self, vectors: Array) -> Array:
        """(H + λI)⁻¹ V for a native block V of shape (d, k)."""
