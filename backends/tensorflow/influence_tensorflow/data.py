"""Iteration over ``tf.data.Dataset``: batched ones as they are, unbatched ones batched."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import tensorflow as tf


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
    dataset = data if is_batched(data) else data.batch(batch_size)
    return iter(dataset)
