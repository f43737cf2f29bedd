"""Per-token scores: which tokens of a test sequence a training sequence influences.

A sequence model's test loss is a sum over its tokens, ℓ(z) = Σ_t ℓ_t(z), so
every first-order score is a sum too: I(z_train, z_test) = Σ_t I_t, with
I_t the score of the measurement "the loss of token t alone" (the gradient is
linear in the measurement). :func:`per_token` turns a test set of sequences
into one query per scored token: the sequence, with every label but token t's
set to the ignored index (Hugging Face's ``-100``, which
``cross_entropy(..., ignore_index=-100)`` and Hugging Face's own losses skip).
Any calculator then scores the queries as ordinary test points, and
:meth:`TokenQueries.by_token` puts the scores back as (n_test, T, n_train).

Cost: the test side is solved once per scored token instead of once per
sequence (T times the test gradients; with a layer-wise solver, T times the
solved test block, which ``query_rank`` keeps small). The training side is
unchanged. Positions are those of the labels: with next-token labels,
position t scores the prediction made at t − 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .data import split_labels, take_samples
from .model import InfluenceModel

__all__ = ["TokenQueries", "per_token"]

Array = Any
#: The label of a position no loss reads (PyTorch's and Hugging Face's convention).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenQueries:
    """One test query per scored token (:func:`per_token`).

    Attributes:
        data: ``(inputs, labels)``, k rows: the inputs of ``sequence[i]`` and
            labels that keep only position ``position[i]``.
        sequence: (k,) the test sequence of each query (host integers).
        position: (k,) the label position each query scores.
        sequences: n_test, the number of test sequences.
        length: T, the label length.
    """

    data: tuple[Any, Any]
    sequence: np.ndarray
    position: np.ndarray
    sequences: int
    length: int

    def by_token(self, model: InfluenceModel, scores: Array) -> Array:
        """Scores of the queries (k, n_train) as (n_test, T, n_train); unscored positions 0.

        Placed with the backend's ``segment_sum`` (no (k, n_test·T) one-hot).
        Summed over the tokens, they are the sequences' scores.
        """
        if int(scores.shape[0]) != len(self.sequence):
            raise ValueError(
                f"expected the scores of the {len(self.sequence)} token queries (one row each), "
                f"got {int(scores.shape[0])} rows"
            )
        segments = model.kernels.as_native(self.sequence * self.length + self.position)
        placed = model.kernels.segment_sum(scores, segments, self.sequences * self.length)
        return model.xp.reshape(placed, (self.sequences, self.length, int(scores.shape[1])))


def per_token(
    model: InfluenceModel, data: Any, *, ignore_index: int = IGNORE_INDEX
) -> TokenQueries:
    """One test query per labelled token of ``data``, for per-token scores.

    Args:
        model: the :class:`~influence_core.InfluenceModel` whose loss reads the
            labels (it must skip ``ignore_index``, as ``cross_entropy`` with
            ``ignore_index=-100`` and Hugging Face's losses do).
        data: the test sequences: ``(inputs, labels)`` with labels (n, T), or a
            mapping holding ``"labels"`` (a Hugging Face batch); ``inputs`` an
            array or a mapping of arrays with n rows (``input_ids``,
            ``attention_mask``).
        ignore_index: the label of positions no loss reads.

    Returns:
        :class:`TokenQueries`; score ``queries.data`` with any calculator and
        pass the scores to :meth:`TokenQueries.by_token`.

    Example::

        queries = per_token(model, (test_ids, test_labels))
        scores = calculator.influence(queries.data)          # (k, n_train)
        by_token = queries.by_token(model, scores)            # (n_test, T, n_train)
    """
    pair = split_labels(data)
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise TypeError(
            "per_token takes (inputs, labels) or a mapping with 'labels', got "
            f"{type(data).__name__}"
        )
    inputs, labels = pair
    host = np.asarray(model.to_numpy(labels))
    if host.ndim != 2:
        raise ValueError(
            f"per-token scores need labels of shape (n, T), one per position; got {host.shape}"
        )
    sequence, position = np.nonzero(host != ignore_index)
    if len(sequence) == 0:
        raise ValueError(f"every label is the ignored index {ignore_index}: no token to score")
    xp, native = model.xp, model.kernels.as_native
    kept = take_samples(labels, sequence)
    columns = xp.arange(host.shape[1], dtype=kept.dtype)
    only = columns[None, :] == native(position.astype(host.dtype))[:, None]
    masked = xp.where(only, kept, xp.full_like(kept, ignore_index))
    return TokenQueries(
        (take_samples(inputs, sequence), masked), sequence, position, host.shape[0], host.shape[1]
    )
