"""Top-k over a stream of score blocks, in O(rows · k) memory."""

from __future__ import annotations

from typing import Any, NamedTuple

from ..arrays import top_k
from ..plugin.namespace import ArrayNamespace

__all__ = ["RunningTopK", "TopK"]

Array = Any


class TopK(NamedTuple):
    """For each test point, its strongest proponents and opponents.

    ``proponents`` / ``proponent_scores``: indices into the training data and
    scores, shape (n_test, k), highest score first. ``opponents`` /
    ``opponent_scores``: the k lowest (most negative) scores, lowest first.
    Ties go to the lower training index.
    """

    proponents: Array
    proponent_scores: Array
    opponents: Array
    opponent_scores: Array


class RunningTopK:
    """Keeps the k largest (or smallest) scores per row and their column indices.

    Each :meth:`update` takes a block of scores (rows, b) for columns
    ``start .. start + b``, merges it with the kept (rows, k) and keeps the
    top k: memory O(rows · (k + b)), never the full (rows, n) matrix. The
    result equals a stable full sort: the kept columns precede the new ones,
    so ties resolve to the lower index.
    """

    def __init__(self, xp: ArrayNamespace, k: int, *, largest: bool = True) -> None:
        if k < 1:
            raise ValueError(f"k must be ≥ 1, got {k}")
        self.xp, self.k, self.largest = xp, int(k), largest
        self.values: Array | None = None
        self.indices: Array | None = None

    def update(self, scores: Array, start: int) -> None:
        """Merge the block ``scores`` (rows, b) for training columns ``start .. start + b``."""
        self.merge(
            scores, self.xp.reshape(self.xp.arange(start, start + int(scores.shape[1])), (1, -1))
        )

    def merge(self, scores: Array, columns: Array) -> None:
        """Merge ``scores`` (rows, b) whose training indices are ``columns`` ((rows, b) or (1, b))."""
        xp = self.xp
        rows, b = int(scores.shape[0]), int(scores.shape[1])
        columns = xp.astype(columns, xp.int64) + xp.zeros((rows, b), dtype=xp.int64)
        if self.values is not None:
            scores = xp.concat([self.values, scores], axis=1)
            columns = xp.concat([self.indices, columns], axis=1)
        self.values, position = top_k(xp, scores, self.k, axis=1, largest=self.largest)
        self.indices = xp.take_along_axis(columns, position, axis=1)
