"""Gradient similarity: Grad-Dot and Grad-Cos (Charpiat, Girard, Felardos, Tarabalka 2019)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from ..data import Batch
from ..measurements import LOSS
from ..model import InfluenceModel
from ..projection import GradientProjector, projected_features, resolve_projector
from .base import Array, InfluenceCalculator

__all__ = ["GradientSimilarity"]

Kind = Literal["dot", "cosine"]


class GradientSimilarity(InfluenceCalculator):
    """Influence as the alignment of gradients at the model's weights, with no curvature.

    ::

        dot:     score(z_train, z_test) = g(z_test) · g(z_train)
        cosine:  score(z_train, z_test) = g(z_test) · g(z_train) / (‖g(z_test)‖ ‖g(z_train)‖)

    (Charpiat, Girard, Felardos, Tarabalka, "Input Similarity from the Neural
    Network Perspective", NeurIPS 2019). A gradient step on z_train with rate
    η lowers the test loss by about η g(z_test)·g(z_train), so **positive
    means proponent**, the library's convention: Grad-Dot is TracIn with one
    checkpoint and η = 1, and first-order influence with H replaced by I.
    Cosine removes the gradient norms, which stops high-loss points from
    topping every ranking (as RelatIF does for influence functions); a zero
    gradient scores 0. Self-influence is ‖g(z)‖² (dot) or 1 (cosine; 0 for a
    zero gradient). The cheap baseline every evaluation compares against.

    Restrict it to layers with ``model.with_parameters(...)``. The test
    gradients (n_test × d) are taken once; training batches stream against them.

    **Projected** (``projection_dim=m`` or ``projector=``): g is replaced by
    Pᵀg (:mod:`influence_core.projection`), so the test side is n_test × m
    and each dot product is unbiased with standard deviation at most
    √(2/m)‖a‖‖b‖; cosine normalises the projected vectors.

    Args:
        model: the :class:`~influence_core.InfluenceModel` (θ selects the layers).
        kind: ``"dot"`` or ``"cosine"``.
        projection_dim: m for a dense seeded random projection; ``None`` for exact.
        seed: seed of that projection.
        projector: any :class:`~influence_core.projection.GradientProjector` instead.
        measurement: what a test point's score explains (default its loss).
        batch_size: batch size for ``(X, y)`` arrays.
    """

    def __init__(
        self,
        model: InfluenceModel,
        kind: Kind = "dot",
        *,
        projection_dim: int | None = None,
        seed: int = 0,
        projector: GradientProjector | None = None,
        measurement: Any = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, measurement=measurement, batch_size=batch_size)
        if kind not in ("dot", "cosine"):
            raise ValueError(f"kind must be 'dot' or 'cosine', got {kind!r}")
        self.kind = kind
        #: The projector of the gradients, or ``None`` without projection.
        self.projector = resolve_projector(projection_dim, seed, projector)

    #: Nothing is fitted: a model at the same weights scores the same anywhere.
    exports_fitted_state = True

    def get_params(self) -> dict[str, Any]:
        return {
            **super().get_params(),
            "kind": self.kind,
            "projector": None if self.projector is None else self.projector.get_params(),
        }

    def _train_features(self, data: Any) -> Iterator[tuple[Batch, Array]]:
        return projected_features(self.model, data, self.projector, LOSS, self.batch_size)

    def _fit(self, train_data: Any) -> None:
        return None

    def _unit(self, grads: Array) -> Array:
        """Rows of ``grads`` divided by their norms (a zero row stays zero) for cosine; else as is."""
        if self.kind == "dot":
            return grads
        xp = self.xp
        norms = xp.linalg.vector_norm(grads, axis=1)
        safe = xp.where(norms > 0, norms, xp.ones_like(norms))
        return grads / xp.reshape(safe, (-1, 1))

    def prepare_test(self, test_data: Any) -> Array:
        """The (projected) test gradients as columns, unit length for cosine: (d or m, n_test)."""
        self._check_fitted()
        xp = self.xp
        return xp.matrix_transpose(
            self._stack(
                self._unit(g)
                for _, g in projected_features(
                    self.model, test_data, self.projector, self.measurement, self.batch_size
                )
            )
        )

    def _scores_from_prepared(self, prepared: Any, train_data: Any) -> Iterator[tuple[int, Array]]:
        xp = self.xp
        for batch, g in self._train_features(self.training_data(train_data)):
            yield batch.start, xp.matrix_transpose(xp.matmul(self._unit(g), prepared))

    def self_influence(self, train_data: Any = None) -> Array:
        """‖g(z)‖² (dot), or 1 (cosine; 0 where the gradient is zero): shape (n_train,)."""
        xp = self.xp
        parts = []
        for _, g in self._train_features(self.training_data(train_data)):
            squares = xp.sum(g * g, axis=1)
            if self.kind == "cosine":
                squares = xp.where(squares > 0, xp.ones_like(squares), xp.zeros_like(squares))
            parts.append(squares)
        return self._stack(parts)
