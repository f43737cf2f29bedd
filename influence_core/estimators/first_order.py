"""First-order influence functions (Koh & Liang 2017), RelatIF and first-order group influence."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..data import Batch
from ..ihvp import ExactIHVP, InverseHessianVectorProduct
from ..ihvp.base import TrainingSide, known_size
from ..model import InfluenceModel
from ..progress import progress
from .base import Array, InfluenceCalculator

__all__ = ["FirstOrderInfluenceCalculator"]


class FirstOrderInfluenceCalculator(InfluenceCalculator):
    """Influence of training points on test losses through the inverse Hessian.

    **Score** (one convention for the whole library)::

        score(z_train, z_test) = g(z_test)ᵀ (H + λI)⁻¹ g(z_train)

    with g(z) = ∇_θ ℓ(z, θ̂) and H the Hessian of the mean training loss (the
    solver's, fitted on the calculator's training data). **Positive means
    proponent**: removing z_train *raises* the test loss, by about
    ``score / n``. This is −I_up,loss of Koh & Liang (2017). With another
    ``measurement`` f, g(z_test) is the gradient of its loss-like form
    (:mod:`influence_core.measurements`), so a positive score still means
    training on z_train moves f(z_test) the way a proponent does. With
    ``normalize=True`` every score is divided by ‖(H + λI)⁻¹ g(z_train)‖
    (RelatIF, Barshan et al. 2020), which stops high-loss outliers from
    dominating every ranking.

    Computation streams: the test gradients are solved as blocks, S = (H +
    λI)⁻¹ G_testᵀ (d × n_test), then training batches of per-sample gradients
    meet S in one matrix product. A solver with a factorised form (Arnoldi's
    projection p(g) = D^{-1/2}Uᵀg) puts both sides in its k-dimensional space
    instead: the solver decides (``test_side`` / ``train_side``), the
    calculator does not know which. No n_train × d array is formed;
    :meth:`influence` returns the (n_test, n_train) matrix the user asked
    for, :meth:`top_k` keeps only (n_test, k).

    Args:
        model: the :class:`~influence_core.InfluenceModel` (θ selects the layers).
        ihvp: an IHVP solver; unfitted, it is fitted on the training data by
            :meth:`fit`; already fitted, it is accepted only for the same θ and
            data. Default :class:`~influence_core.ExactIHVP` with its default damping.
        normalize: RelatIF scores.
        measurement: what a test point's score explains (default its loss).
        batch_size: batch size for ``(X, y)`` arrays.
    """

    def __init__(
        self,
        model: InfluenceModel,
        ihvp: InverseHessianVectorProduct | None = None,
        *,
        normalize: bool = False,
        measurement: Any = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, measurement=measurement, batch_size=batch_size)
        self.ihvp = ihvp if ihvp is not None else ExactIHVP()
        if not isinstance(self.ihvp, InverseHessianVectorProduct):
            raise TypeError(
                f"ihvp must be an InverseHessianVectorProduct solver, got {type(self.ihvp).__name__}"
            )
        self.normalize = bool(normalize)

    def get_params(self) -> dict[str, Any]:
        return {
            **super().get_params(),
            "normalize": self.normalize,
            "ihvp": {"class": type(self.ihvp).__name__, **self.ihvp.get_params()},
        }

    def _fit(self, train_data: Any) -> None:
        self.ihvp.fitted_for(self.model, train_data)

    exports_fitted_state = True

    def _fitted_state(self) -> dict[str, Any]:
        return {f"ihvp.{name}": value for name, value in self.ihvp.fitted_state().items()}

    def _restore_fitted(self, state: dict[str, Any]) -> None:
        arrays = {name[5:]: value for name, value in state.items() if name.startswith("ihvp.")}
        self.ihvp.restore_state(self.model, arrays)

    # -- building blocks ----------------------------------------------------------
    def solve_test_gradients(self, test_data: Any, *, joint: bool = False) -> Array:
        """The solver's test side of ``test_data``: S = (H + λI)⁻¹ G_testᵀ, shape (d, n_test).

        (For Arnoldi, the projections p(z_test) as columns, shape (k, n_test).)
        The expensive half of :meth:`influence` for iterative solvers. Keep it to
        score many training sets (or shards) with :meth:`influence_from_prepared`.
        ``joint=True``: the block for scores and self-influence from one pass
        (:meth:`~influence_core.ihvp.TrainingSide.scores_and_quadratic_forms`).
        """
        self._check_fitted()
        batches = self.model.batches(test_data, self.batch_size)
        n = known_size(self.model, test_data, self.batch_size)  # exact, or an upper bound
        out = None if n is None else self.ihvp.allocated_test_side(n)
        asked = {"joint": True} if joint else {}  # a solver without the keyword still serves
        if out is None:
            solved = (
                self.ihvp.solved_test_side(self.model, b, self.measurement, **asked)
                for b in batches
            )
            return self._stack(solved, 1)
        column = 0  # each batch written in place: the block exists once, never as pieces too
        for batch in batches:
            self.ihvp.solved_test_side_into(
                self.model, batch, self.measurement, out, column, **asked
            )
            column += batch.size
        return out if column == int(out.shape[1]) else out[:, :column]

    def _test_gradients(self, data: Any) -> Iterator[tuple[Batch, Array]]:
        """Test-side gradients as the solver takes them (layer-wise solvers: from statistics)."""
        for batch in self.model.batches(data, self.batch_size):
            yield batch, self.ihvp.test_gradients(self.model, batch, self.measurement)

    def _training_sides(self, data: Any) -> Iterator[tuple[Any, TrainingSide]]:
        """Each training batch as the solver scores it (per-sample gradients, or layer-wise)."""
        for batch in self.model.batches(data, self.batch_size):
            yield batch, self.ihvp.training_side(self.model, batch)

    def _norms(self, side: TrainingSide) -> Array | None:
        """The RelatIF norms ‖(H + λI)⁻¹ gᵢ‖ of a batch when ``normalize``, else ``None``."""
        return side.solved_norms() if self.normalize else None

    def _scores_of(self, solved: Array, side: TrainingSide, norms: Array | None) -> Array:
        """Scores of one training batch against the solved test block: shape (n_test, b)."""
        scores = side.scores(solved)
        return scores if norms is None else scores / self.xp.reshape(norms, (1, -1))

    def _self_of(self, side: TrainingSide, norms: Array | None) -> Array:
        """score(z, z) for each row of one training batch: shape (b,)."""
        values = side.quadratic_forms()
        return values if norms is None else values / norms

    def solves_per_point(self, what: str) -> bool:
        """Self-influence and RelatIF through an iterative solver (CG, LiSSA) solve per training batch."""
        per_point = what == "self-influence" or self.normalize
        return per_point and self.ihvp.samples_per_solve() is not None

    def check_cost(self, what: str, train_data: Any = None) -> None:
        """Self-influence and RelatIF solve per training point: refused when the solver's estimate is too high.

        See :meth:`~influence_core.ihvp.InverseHessianVectorProduct.check_per_point_solves`.
        """
        if what == "self-influence" or self.normalize:
            train = self.training_data(train_data)
            label = what if what == "self-influence" else f"RelatIF {what} (normalize=True)"
            self.ihvp.check_per_point_solves(known_size(self.model, train, self.batch_size), label)

    # -- results ------------------------------------------------------------------
    def prepare_test(self, test_data: Any) -> Array:
        """The solved test block (:meth:`solve_test_gradients`)."""
        return self.solve_test_gradients(test_data)

    def _scores_from_prepared(self, prepared: Any, train_data: Any) -> Iterator[tuple[int, Array]]:
        self.check_cost("influence", train_data)
        for batch, side in self._training_sides(train_data):
            yield batch.start, self._scores_of(prepared, side, self._norms(side))

    def self_influence(self, train_data: Any = None) -> Array:
        """score(z, z) = g(z)ᵀ (H + λI)⁻¹ g(z) for every training point: shape (n_train,).

        Always of the training loss (whatever the test-side measurement). Exact
        and Arnoldi solvers use their factorisation (one product per batch);
        CG and LiSSA solve each batch's gradients as one block (costlier: a solve
        per batch). High self-influence flags mislabelled or atypical points.
        """
        train = self.training_data(train_data)
        self.check_cost("self-influence", train)
        stream = progress(
            self._training_sides(train), desc="self-influence", total=self._batch_total(train)
        )
        return self._stack(self._self_of(side, self._norms(side)) for _, side in stream)

    def influence_and_self_influence(
        self, test_data: Any, train_data: Any = None
    ) -> tuple[Array, Array]:
        """:meth:`influence` and :meth:`self_influence` from one pass over the training data.

        Each training batch's gradients (and, for RelatIF, their norms) serve
        both its block of scores and its self-influences. Without RelatIF the
        solver may share more: K-FAC and EK-FAC score in each layer's eigenbasis,
        where the rotation of a sample's gradient that its self-influence needs
        also meets the test side, solved with ``joint=True``
        (:meth:`~influence_core.ihvp.TrainingSide.scores_and_quadratic_forms`).
        """
        train = self.training_data(train_data)
        self.check_cost("self-influence", train)
        if self.normalize:
            solved = self.prepare_test(test_data)
        else:
            self._check_fitted()
            solved = self.solve_test_gradients(test_data, joint=True)
        blocks, parts = [], []
        stream = progress(
            self._training_sides(train),
            desc="influence and self-influence",
            total=self._batch_total(train),
        )
        for _, side in stream:
            if self.normalize:
                norms = side.solved_norms()
                blocks.append(self._scores_of(solved, side, norms))
                parts.append(self._self_of(side, norms))
            else:
                scores, forms = side.scores_and_quadratic_forms(solved)
                blocks.append(scores)
                parts.append(forms)
        return self._stack(blocks, axis=1), self._stack(parts)

    def influence_vector(self, data: Any) -> Array:
        """I(z) = −(H + λI)⁻¹ g(z), the parameter change from up-weighting z: shape (n, d).

        This materialises n × d: ask for it only when you need the vectors.
        """
        self._check_fitted()
        xp = self.xp
        return self._stack(
            -xp.matrix_transpose(self.ihvp.solve(xp.matrix_transpose(g)))
            for _, g in self._gradients(data)
        )

    def group_influence(self, test_data: Any, group_data: Any) -> Array:
        """First-order group influence (Koh et al. 2019): Σ_{z ∈ U} score(z, z_test).

        = g(z_test)ᵀ (H + λI)⁻¹ Σ_{z∈U} g(z), computed with one solve of the
        summed group gradient; removing U changes the test loss by about
        this / n. Shape (n_test,). (RelatIF does not apply to groups.)
        """
        self._check_fitted()
        xp = self.xp
        n_group = self.model.count(group_data, self.batch_size)
        solved = self.ihvp.solve(
            self.model.loss_grad(group_data, batch_size=self.batch_size) * n_group
        )
        return self._stack(xp.matmul(g, solved) for _, g in self._test_gradients(test_data))
