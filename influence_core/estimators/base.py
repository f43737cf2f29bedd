"""What every influence calculator shares: configure, fit on training data, score streams.

A calculator is built with the model and its settings (a solver, a
measurement, …), fitted on the training data with :meth:`InfluenceCalculator.fit`
(which returns it), and then answers :meth:`~InfluenceCalculator.influence`,
:meth:`~InfluenceCalculator.self_influence` and
:meth:`~InfluenceCalculator.top_k`. A new calculator subclasses
:class:`InfluenceCalculator`, implements ``_scores_from_prepared`` and
``self_influence`` (and ``_fit`` / ``prepare_test`` if it has a fitted state or
a test side), and is exported from :mod:`influence_core.estimators`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, TypeVar

from ..arrays import join
from ..data import Batch
from ..errors import NotFittedError
from ..measurements import Measurement, resolve_measurement
from ..model import InfluenceModel
from ..plugin.namespace import ArrayNamespace
from ..progress import progress
from .top_k import RunningTopK, TopK

__all__ = ["InfluenceCalculator"]

Array = Any
Calculator = TypeVar("Calculator", bound="InfluenceCalculator")


class InfluenceCalculator(ABC):
    """Scores of training points for test points, one sign convention for all methods.

    **score(z_train, z_test) > 0 means z_train is a proponent of z_test**: it
    lowers the test loss (or raises the test point's measured output, see
    :mod:`influence_core.measurements`); negative means opponent. A subclass
    yields blocks of scores, shape (n_test, b), one per training batch, from
    ``_scores_from_prepared``; :meth:`influence` and :meth:`top_k` are built on
    that stream, so no method holds an n_train × d array and :meth:`top_k`
    keeps O(n_test · k) memory.

    Args:
        model: the :class:`~influence_core.InfluenceModel` (θ selects the layers).
        measurement: what a test point's score explains: ``"loss"`` (default),
            ``"logit"``, ``"probability"``, ``"margin"``, a
            :class:`~influence_core.Measurement` or a native ``f(outputs, targets)``.
        batch_size: batch size for ``(X, y)`` arrays (default: the model's).
    """

    def __init__(
        self,
        model: InfluenceModel,
        *,
        measurement: Any = None,
        batch_size: int | None = None,
    ) -> None:
        if not isinstance(model, InfluenceModel):
            raise TypeError(
                f"{type(self).__name__} takes an InfluenceModel first, got {type(model).__name__}; "
                "wrap your model: InfluenceModel(model, loss_fn)"
            )
        self.model = model
        self.measurement: Measurement = resolve_measurement(measurement)
        self.batch_size = batch_size

    # -- settings and fitting ----------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """The settings (JSON values) that determine this calculator's numbers."""
        return {"measurement": self.measurement.name, "batch_size": self.batch_size}

    def fit(self: Calculator, train_data: Any) -> Calculator:
        """Fit on the training data (it defines H, and is scored when a method is given none)."""
        self._fit(train_data)
        self.train_data_ = train_data
        return self

    def _fit(self, train_data: Any) -> None:
        """The calculator's own fitting work (fit its solver, refit a layer …)."""
        return None

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "train_data_")

    # -- the fitted state, as NumPy (to fit in one process and score in others) --------
    #: Whether :meth:`fitted_state` can export this calculator's fit (its fit is a
    #: solver's state, or nothing). Calculators that refit a model or keep
    #: per-training-point features (representer points, TRAK) do not, yet.
    exports_fitted_state = False

    def fitted_state(self) -> dict[str, Any]:
        """What :meth:`fit` computed, as NumPy arrays by name: enough to score in another process.

        :meth:`restore_fitted` on a calculator built the same way (the same
        settings, a model at the same weights) makes it score as this one
        does, without refitting. Raises ``TypeError`` for a calculator whose
        fit cannot be exported (``exports_fitted_state`` is false).
        """
        self._check_fitted()
        if not self.exports_fitted_state:
            raise TypeError(
                f"{type(self).__name__} cannot export its fitted state to score in another "
                "process; FirstOrderInfluenceCalculator, ArnoldiInfluenceCalculator, TracIn and "
                "GradientSimilarity can"
            )
        return self._fitted_state()

    def _fitted_state(self) -> dict[str, Any]:
        return {}

    def restore_fitted(self: Calculator, state: dict[str, Any], train_data: Any) -> Calculator:
        """This (unfitted) calculator, fitted elsewhere: ``state`` from :meth:`fitted_state`.

        ``train_data`` is what it scores when a method is given none (for a
        worker, its shard); the fit itself (H, the solver's factors) is the
        one ``state`` records, made on the whole training set. Returns the calculator.
        """
        if not self.exports_fitted_state:
            raise TypeError(f"{type(self).__name__} cannot restore a fitted state")
        self._restore_fitted(state)
        self.train_data_ = train_data
        return self

    def _restore_fitted(self, state: dict[str, Any]) -> None:
        return None

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(self, "it needs its training data")

    def training_data(self, train_data: Any = None) -> Any:
        """The data to score: ``train_data`` if given, else the data the calculator was fitted on."""
        self._check_fitted()
        return self.train_data_ if train_data is None else train_data

    @property
    def xp(self) -> ArrayNamespace:
        return self.model.xp

    # -- gradients -------------------------------------------------------------------------
    def _gradients(self, data: Any) -> Iterator[tuple[Batch, Array]]:
        """Per-sample training-loss gradients, streamed: ``(batch, (b, d))``."""
        return self.model.iter_per_sample_grads(data, batch_size=self.batch_size)

    def _test_gradients(self, data: Any) -> Iterator[tuple[Batch, Array]]:
        """Per-sample gradients of the test-side measurement, streamed: ``(batch, (b, d))``."""
        return self.model.iter_measurement_grads(data, self.measurement, batch_size=self.batch_size)

    def _stack(self, pieces: Any, axis: int = 0) -> Array:
        return join(self.xp, list(pieces), axis=axis)

    # -- scores ------------------------------------------------------------------------
    def prepare_test(self, test_data: Any) -> Any:
        """The test side of the scores, computed once (e.g. solved test gradients).

        Keep it to score several training sets or chunks with
        :meth:`influence_from_prepared` without recomputing it.
        """
        self._check_fitted()
        return test_data

    @abstractmethod
    def _scores_from_prepared(self, prepared: Any, train_data: Any) -> Iterator[tuple[int, Array]]:
        """(start index of the training batch, scores of shape (n_test, b)) per batch."""

    @abstractmethod
    def self_influence(self, train_data: Any = None) -> Array:
        """score(z, z) for every training point: shape (n_train,)."""

    def influence(self, test_data: Any, train_data: Any = None) -> Array:
        """Scores of every training point for every test point: shape (n_test, n_train)."""
        return self._collect(self.prepare_test(test_data), train_data, "influence")

    def influence_from_prepared(self, prepared: Any, train_data: Any = None) -> Array:
        """:meth:`influence` from :meth:`prepare_test` output: one pass over the training data."""
        return self._collect(prepared, train_data, None)

    def solves_per_point(self, what: str) -> bool:
        """Whether ``what`` (``"influence"``, ``"self-influence"``) runs an iterative solve per training batch.

        True for self-influence or RelatIF through CG or LiSSA: each training
        batch is solved over the whole fitted data. Such a request cannot run
        where only a shard of the data is (a worker); one that is a product
        per batch with fitted factors can.
        """
        return False

    def check_cost(self, what: str, train_data: Any = None) -> None:
        """Refuse up front a request (``"influence"``, ``"self-influence"``) that would cost far more than usual.

        Raises :class:`~influence_core.errors.CostLimitError` with the estimate;
        a calculator whose every result is a product per batch refuses nothing.
        The calculators call it themselves; chunked runs call it once for all chunks.
        """
        return None

    def _batch_total(self, data: Any) -> int | None:
        """Training batches of ``data`` (progress-bar totals), when known without a pass."""
        return self.model.num_batches(data, self.batch_size)

    def _collect(self, prepared: Any, train_data: Any, desc: str | None) -> Array:
        train = self.training_data(train_data)
        stream = self._scores_from_prepared(prepared, train)
        if desc is not None:
            stream = progress(stream, desc=desc, total=self._batch_total(train))
        return self._stack((scores for _, scores in stream), axis=1)

    def influence_and_self_influence(
        self, test_data: Any, train_data: Any = None
    ) -> tuple[Array, Array]:
        """:meth:`influence` and :meth:`self_influence` of the same training data, together.

        Returns ``(scores, self_influence)``, shapes (n_test, n_train) and
        (n_train,). Here it makes the two calls; the calculators whose two
        results come from the same training gradients (first-order, Arnoldi,
        TracIn) take those gradients once for both, which halves the gradient
        work of asking for both.
        """
        return self.influence(test_data, train_data), self.self_influence(train_data)

    def top_k(self, test_data: Any, train_data: Any = None, k: int = 5) -> TopK:
        """The k strongest proponents and opponents of each test point (running top-k)."""
        return self.top_k_from_prepared(self.prepare_test(test_data), train_data, k, "top-k")

    def top_k_from_prepared(
        self, prepared: Any, train_data: Any = None, k: int = 5, desc: str | None = None
    ) -> TopK:
        """:meth:`top_k` from :meth:`prepare_test` output."""
        proponents = RunningTopK(self.xp, k, largest=True)
        opponents = RunningTopK(self.xp, k, largest=False)
        train = self.training_data(train_data)
        stream = self._scores_from_prepared(prepared, train)
        if desc:
            stream = progress(stream, desc=desc, total=self._batch_total(train))
        for start, scores in stream:
            proponents.update(scores, start)
            opponents.update(scores, start)
        return TopK(proponents.indices, proponents.values, opponents.indices, opponents.values)
