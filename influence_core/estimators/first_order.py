"""First-order influence functions (Koh & Liang 2017), RelatIF and first-order group influence."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..data import Batch
from ..ihvp import ExactIHVP, InverseHessianVectorProduct
from ..model import InfluenceModel
from ..progress import progress
from .base import InfluenceCalculator

__all__ = ["FirstOrderInfluenceCalculator"]

Array = Any


class FirstOrderInfluenceCalculator(InfluenceCalculator):
    """Influence of training points on test losses through the inverse Hessian.

    **Score** (one convention for the whole library)::

        score(z_train, z_test) = g(z_test)ᵀ (H + λI)⁻¹ g(z_train)

    with g(z) = ∇_θ ℓ(z, θ̂) and H the Hessian of the mean training loss (the
    ``ihvp`` solver's). **Positive means proponent**: removing z_train *raises*
    the test loss, by about ``score / n``. This is −I_up,loss of Koh & Liang
    (2017). With ``normalize=True`` every score is divided by
    ‖(H + λI)⁻¹ g(z_train)‖ (RelatIF, Barshan et al. 2020), which stops
    high-loss outliers from dominating every ranking.

    Computation streams: the test gradients are solved as blocks,
    S = (H + λI)⁻¹ G_testᵀ (d × n_test), then training batches of per-sample
    gradients meet S in one matrix product. No n_train × d array is formed;
    :meth:`influence` returns the (n_test, n_train) matrix the user asked for,
    :meth:`top_k` keeps only (n_test, k).

    Args:
        model: the :class:`~influence_core.InfluenceModel` (θ selects the layers).
        train_data: the training data, used when a method is given none.
        ihvp: an IHVP solver fitted on the training data; by default
            :class:`~influence_core.ExactIHVP` with its default damping.
        normalize: RelatIF scores.
        batch_size: batch size for ``(X, y)`` arrays.
    """

    def __init__(
        self,
        model: InfluenceModel,
        train_data: Any,
        ihvp: InverseHessianVectorProduct | None = None,
        *,
        normalize: bool = False,
        batch_size: int | None = None,
    ) -> None:
        self.model = model
        self.train_data = train_data
        self.ihvp = (
            ihvp if ihvp is not None else ExactIHVP(model, train_data, batch_size=batch_size)
        )
        self.normalize = normalize
        self.batch_size = batch_size

    # -- building blocks ----------------------------------------------------------
    def _gradients(self, data: Any) -> Iterator[tuple[Batch, Array]]:
        return self.model.iter_per_sample_grads(data, batch_size=self.batch_size)

    def solve_test_gradients(self, test_data: Any) -> Array:
        """S = (H + λI)⁻¹ G_testᵀ, shape (d, n_test): one block solve per test batch.

        The expensive half of :meth:`influence` for iterative solvers. Keep S to
        score many training sets (or shards) with :meth:`influence_from_prepared`.
        """
        xp = self.xp
        blocks = [self.ihvp.solve(xp.matrix_transpose(g)) for _, g in self._gradients(test_data)]
        return blocks[0] if len(blocks) == 1 else xp.concat(blocks, axis=1)

    def _train_side(self, grads: Array) -> Array:
        """What training gradients meet the solved test block with: here G itself (b, d)."""
        return grads

    def _relatif_norms(self, grads: Array) -> Array:
        """‖(H + λI)⁻¹ gᵢ‖ per row of ``grads`` (b, d)."""
        xp = self.xp
        return xp.linalg.vector_norm(self.ihvp.solve(xp.matrix_transpose(grads)), axis=0)

    def _norms(self, grads: Array) -> Array | None:
        """The RelatIF norms of a batch when ``normalize``, else ``None``."""
        return self._relatif_norms(grads) if self.normalize else None

    def _scores_of(self, solved: Array, grads: Array, norms: Array | None) -> Array:
        """Scores of one training batch against the solved test block: shape (n_test, b)."""
        xp = self.xp
        scores = xp.matrix_transpose(xp.matmul(self._train_side(grads), solved))
        return scores if norms is None else scores / xp.reshape(norms, (1, -1))

    def _self_of(self, grads: Array, norms: Array | None) -> Array:
        """score(z, z) for each row of one training batch: shape (b,)."""
        values = self.ihvp.quadratic_forms(grads)
        return values if norms is None else values / norms

    def _score_blocks(self, solved: Array, train_data: Any) -> Iterator[tuple[Batch, Array]]:
        """(training batch, scores of shape (n_test, b)) for each training batch."""
        for batch, g in self._gradients(self._train(train_data)):
            yield batch, self._scores_of(solved, g, self._norms(g))

    # -- results ------------------------------------------------------------------
    def prepare_test(self, test_data: Any) -> Array:
        """The solved test block S (:meth:`solve_test_gradients`)."""
        return self.solve_test_gradients(test_data)

    def _scores_from_prepared(self, prepared: Any, train_data: Any) -> Iterator[tuple[int, Array]]:
        for batch, scores in self._score_blocks(prepared, train_data):
            yield batch.start, scores

    def self_influence(self, train_data: Any = None) -> Array:
        """score(z, z) = g(z)ᵀ (H + λI)⁻¹ g(z) for every training point: shape (n_train,).

        Exact and Arnoldi solvers use their factorisation (one product per batch);
        CG and LiSSA solve each batch's gradients as one block (costlier: a solve
        per batch). High self-influence flags mislabelled or atypical points.
        """
        xp = self.xp
        parts = [
            self._self_of(g, self._norms(g))
            for _, g in progress(self._gradients(self._train(train_data)), desc="self-influence")
        ]
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)

    def influence_and_self_influence(
        self, test_data: Any, train_data: Any = None
    ) -> tuple[Array, Array]:
        """:meth:`influence` and :meth:`self_influence` from one pass over the training data.

        Each training batch's gradients (and, for RelatIF, their norms) serve
        both its block of scores and its self-influences.
        """
        xp = self.xp
        solved = self.prepare_test(test_data)
        blocks, parts = [], []
        stream = self._gradients(self._train(train_data))
        for _, g in progress(stream, desc="influence and self-influence"):
            norms = self._norms(g)
            blocks.append(self._scores_of(solved, g, norms))
            parts.append(self._self_of(g, norms))
        if len(blocks) == 1:
            return blocks[0], parts[0]
        return xp.concat(blocks, axis=1), xp.concat(parts, axis=0)

    def influence_vector(self, data: Any) -> Array:
        """I(z) = −(H + λI)⁻¹ g(z), the parameter change from up-weighting z: shape (n, d).

        This materialises n × d: ask for it only when you need the vectors.
        """
        xp = self.xp
        parts = [
            -xp.matrix_transpose(self.ihvp.solve(xp.matrix_transpose(g)))
            for _, g in self._gradients(data)
        ]
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)

    def group_influence(self, test_data: Any, group_data: Any) -> Array:
        """First-order group influence (Koh et al. 2019): Σ_{z ∈ U} score(z, z_test).

        = g(z_test)ᵀ (H + λI)⁻¹ Σ_{z∈U} g(z), computed with one solve of the
        summed group gradient; removing U changes the test loss by about
        this / n. Shape (n_test,). (RelatIF does not apply to groups.)
        """
        xp = self.xp
        n_group = self.model.count(group_data, self.batch_size)
        solved = self.ihvp.solve(
            self.model.loss_grad(group_data, batch_size=self.batch_size) * n_group
        )
        parts = [xp.matmul(g, solved) for _, g in self._gradients(test_data)]
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)
