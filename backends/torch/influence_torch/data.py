"""Iteration over PyTorch datasets: ``DataLoader`` as is, a map-style ``Dataset`` batched."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, IterableDataset


def native_batch_count(data: Any, batch_size: int) -> int | None:
    if isinstance(data, DataLoader):
        try:
            return len(data)
        except TypeError:  # an iterable-style dataset without a length
            return None
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return -(-len(data) // batch_size)
    return None


def native_batches(data: Any, batch_size: int) -> Iterator[Any] | None:
    if isinstance(data, DataLoader):
        return iter(data)
    if isinstance(data, (Dataset, IterableDataset)):
        return iter(DataLoader(data, batch_size=batch_size, shuffle=False))
    return None
