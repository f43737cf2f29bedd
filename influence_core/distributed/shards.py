"""Shard descriptors: where one piece of the training set is, loaded on the worker that scores it.

A training set is a list of shards, in order; shard j's samples are numbered
from the sizes of the shards before it, so indices (top-k, the samples an
error names) are those of the whole set. A descriptor is small and
picklable, and :meth:`Shard.load` runs on the worker: for a file, only the
path travels.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data import leading_dim

__all__ = ["ArrayShard", "DatasetShard", "NpzShard", "Shard", "shard_arrays"]


class Shard(ABC):
    """One piece of the training set: its size (known on the driver) and how to load it."""

    @property
    @abstractmethod
    def size(self) -> int:
        """The samples in this shard."""

    @abstractmethod
    def load(self) -> Any:
        """The shard's data, in any form the model takes (``(X, y)``, a DataLoader, a tf.data.Dataset)."""

    def describe(self) -> str:
        return f"{type(self).__name__} of {self.size} samples"


@dataclass(frozen=True, eq=False)
class ArrayShard(Shard):
    """In-memory arrays ``(inputs, targets)``, NumPy (or a pytree of NumPy arrays)."""

    inputs: Any
    targets: Any

    @property
    def size(self) -> int:
        return leading_dim(self.targets)

    def load(self) -> Any:
        return self.inputs, self.targets


@dataclass(frozen=True, eq=False)
class NpzShard(Shard):
    """An ``.npz`` file every worker can read, holding the inputs and targets under two names."""

    path: str
    inputs: str = "X"
    targets: str = "y"
    samples: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.samples is None:  # the targets' length, read once on the driver
            with np.load(os.fspath(self.path), allow_pickle=False) as stored:
                object.__setattr__(self, "samples", int(stored[self.targets].shape[0]))

    @property
    def size(self) -> int:
        return int(self.samples)  # type: ignore[arg-type]

    def load(self) -> Any:
        with np.load(os.fspath(self.path), allow_pickle=False) as stored:
            return stored[self.inputs], stored[self.targets]

    def describe(self) -> str:
        return f"{self.path} ({self.size} samples)"


@dataclass(frozen=True, eq=False)
class DatasetShard(Shard):
    """A shard built on the worker by ``make()``: a DataLoader, a tf.data.Dataset, any batches.

    ``samples`` must be given: offsets are computed on the driver without loading.
    ``make`` must be importable on the workers (or pickled by value).
    """

    make: Callable[[], Any]
    samples: int

    @property
    def size(self) -> int:
        return int(self.samples)

    def load(self) -> Any:
        return self.make()


def shard_arrays(inputs: Any, targets: Any, shard_size: int) -> list[ArrayShard]:
    """``(X, y)`` NumPy arrays cut into shards of ``shard_size`` samples (the last may be smaller).

    Make ``shard_size`` a multiple of the batch size, so the shards' batches
    are the single-process run's batches and the sums agree to rounding.
    """
    from ..tree import tree_map

    if int(shard_size) < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size}")
    n = leading_dim(targets)
    return [
        ArrayShard(
            tree_map(lambda a, s=start: a[s : s + shard_size], inputs),
            tree_map(lambda a, s=start: a[s : s + shard_size], targets),
        )
        for start in range(0, n, int(shard_size))
    ]
