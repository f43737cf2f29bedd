"""Iteration over ``tf.data.Dataset``: batched ones as they are, unbatched ones batched.

Scores are numbered by position and the training data is read several times,
so a pipeline is checked before it is read: one that reshuffles on every
iteration (``.shuffle()``, the default ``reshuffle_each_iteration=True``) or
never ends (``.repeat()``) is refused with the fix named, and one that drops
its last partial batch (``.batch(drop_remainder=True)``) is read with a
warning naming how many samples get no score. Other non-determinism (an
``interleave`` with ``deterministic=False``) is caught by the core's check
that every pass gives the same samples (:mod:`influence_core.pass_order`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import tensorflow as tf

from influence_core.plugin import DataOrderError, EndlessDataError

__all__ = ["check_pipeline", "is_batched", "native_batch_count", "native_batches"]


def _stages(dataset: tf.data.Dataset) -> Iterator[tf.data.Dataset]:
    """``dataset`` and every dataset it is built from (``_inputs()``; none where TF lacks it)."""
    pending, seen = [dataset], set()
    while pending:
        stage = pending.pop()
        if id(stage) in seen:
            continue
        seen.add(id(stage))
        yield stage
        try:
            pending.extend(stage._inputs())
        except Exception:  # a dataset class without _inputs(): the core's check still applies
            continue


def check_pipeline(dataset: tf.data.Dataset) -> None:
    """Refuse a pipeline that reshuffles or never ends; warn when it drops samples."""
    if int(dataset.cardinality()) == int(tf.data.INFINITE_CARDINALITY):
        raise EndlessDataError(
            "the tf.data.Dataset is infinite (cardinality INFINITE: a .repeat() without a "
            "count), so a pass over it never ends. Pass the training set without .repeat(), "
            "or .take(n) of it."
        )
    for stage in _stages(dataset):
        name = type(stage).__name__
        if "Shuffle" in name and bool(getattr(stage, "_reshuffle_each_iteration", True)):
            raise DataOrderError(
                "the tf.data.Dataset is shuffled (.shuffle() reshuffles on every iteration), so "
                "each pass over it gives another order and scores could not be matched to "
                "samples. Pass the pipeline without .shuffle() (keep one for training and one "
                "for influence), or shuffle once with .shuffle(buffer, seed=s, "
                "reshuffle_each_iteration=False)."
            )
        if "Batch" in name and _drops_remainder(stage):
            size = int(stage._batch_size)
            before = (
                int(stage._input_dataset.cardinality()) if hasattr(stage, "_input_dataset") else -1
            )
            dropped = (
                f"{before % size} samples"
                if before >= 0
                else "the samples of its last partial batch"
            )
            warnings.warn(
                f".batch({size}, drop_remainder=True) drops {dropped}: they get no score. "
                "Batch with drop_remainder=False to score every sample.",
                UserWarning,
                stacklevel=6,
            )


def _drops_remainder(stage: Any) -> bool:
    try:
        return bool(stage._drop_remainder)
    except Exception:
        return False


def is_batched(dataset: tf.data.Dataset) -> bool:
    """Whether ``dataset`` already yields batches.

    A dataset made with ``.batch()`` has an unknown (``None``) leading dimension
    in every component of its element spec; ``.batch(drop_remainder=True)`` is
    recognised by its dataset class. Anything else is taken as one sample per
    element.
    """
    if "BatchDataset" in type(dataset).__name__:
        return True
    specs = tf.nest.flatten(dataset.element_spec)
    return bool(specs) and all(
        s.shape.rank is not None and s.shape.rank >= 1 and s.shape[0] is None for s in specs
    )


def native_batch_count(data: Any, batch_size: int) -> int | None:
    """Batches a ``tf.data.Dataset`` yields, from its cardinality (``None`` when unknown)."""
    if not isinstance(data, tf.data.Dataset):
        return None
    cardinality = int(data.cardinality())
    if cardinality < 0:  # unknown or infinite
        return None
    return cardinality if is_batched(data) else -(-cardinality // batch_size)


def native_batches(data: Any, batch_size: int) -> Iterator[Any] | None:
    if not isinstance(data, tf.data.Dataset):
        return None
    check_pipeline(data)
    dataset = data if is_batched(data) else data.batch(batch_size)
    return iter(dataset)
