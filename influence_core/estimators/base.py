"""What every influence calculator shares: pairwise scores streamed over training batches."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

from ..model import InfluenceModel
from ..namespace import ArrayNamespace
from ..progress import progress
from .running_top_k import RunningTopK, TopK

__all__ = ["InfluenceCalculator"]

Array = Any


class InfluenceCalculator(ABC):
    """Scores of training points for test points, one sign convention for all methods.

    **score(z_train, z_test) > 0 means z_train is a proponent of z_test**: it
    lowers the test loss (or raises the test point's target output); negative
    means opponent. A subclass yields blocks of scores, shape (n_test, b), one
    per training batch, from :meth:`_score_stream`; :meth:`influence` and
    :meth:`top_k` are built on that stream, so no method holds an
    n_train × d array and :meth:`top_k` keeps O(n_test · k) memory.
    """

    model: InfluenceModel
    train_data: Any
    batch_size: int | None

    @property
    def xp(self) -> ArrayNamespace:
        return self.model.xp

    def _train(self, train_data: Any) -> Any:
        return self.train_data if train_data is None else train_data

    def prepare_test(self, test_data: Any) -> Any:
        """The test side of the scores, computed once (e.g. solved test gradients).

        Keep it to score several training sets or chunks with
        :meth:`influence_from_prepared` without recomputing it.
        """
        return test_data

    @abstractmethod
    def _scores_from_prepared(self, prepared: Any, train_data: Any) -> Iterator[tuple[int, Array]]:
        """(start index of the training batch, scores of shape (n_test, b)) per batch."""

    def _score_stream(self, test_data: Any, train_data: Any) -> Iterator[tuple[int, Array]]:
        return self._scores_from_prepared(self.prepare_test(test_data), train_data)

    @abstractmethod
    def self_influence(self, train_data: Any = None) -> Array:
        """score(z, z) for every training point: shape (n_train,)."""

    def influence(self, test_data: Any, train_data: Any = None) -> Array:
        """Scores of every training point for every test point: shape (n_test, n_train)."""
        stream = self._score_stream(test_data, self._train(train_data))
        blocks = [scores for _, scores in progress(stream, desc="influence")]
        return blocks[0] if len(blocks) == 1 else self.xp.concat(blocks, axis=1)

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

    def influence_from_prepared(self, prepared: Any, train_data: Any = None) -> Array:
        """:meth:`influence` from :meth:`prepare_test` output: one pass over the training data."""
        stream = self._scores_from_prepared(prepared, self._train(train_data))
        blocks = [scores for _, scores in stream]
        return blocks[0] if len(blocks) == 1 else self.xp.concat(blocks, axis=1)

    def top_k(self, test_data: Any, train_data: Any = None, k: int = 5) -> TopK:
        """The k strongest proponents and opponents of each test point (running top-k)."""
        xp = self.xp
        proponents = RunningTopK(xp, k, largest=True)
        opponents = RunningTopK(xp, k, largest=False)
        index_like = xp.astype(xp.zeros((1,)), xp.int64)
        stream = self._score_stream(test_data, self._train(train_data))
        for start, scores in progress(stream, desc="top-k"):
            proponents.update(scores, start, index_like)
            opponents.update(scores, start, index_like)
        return TopK(proponents.indices, proponents.values, opponents.indices, opponents.values)
