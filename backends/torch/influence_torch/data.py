"""Iteration over PyTorch datasets: a ``DataLoader`` in dataset order, a map-style ``Dataset`` batched.

Scores are numbered by position, so a ``DataLoader`` is read **whole and in
dataset order**: one that shuffles (a ``RandomSampler`` without replacement
over the whole dataset) or drops its last partial batch is read through a
sequential loader over the same dataset with the same batch size, collate
function and workers, so score i is ``loader.dataset[i]``. A loader that
samples with replacement or a subset at random has no order to restore and is
refused. Any other sampler is read as it is; the core then checks that every
pass yields the same samples in the same order
(:mod:`influence_core.pass_order`).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    WeightedRandomSampler,
)

from influence_core.plugin import DataOrderError

__all__ = ["in_dataset_order", "native_batch_count", "native_batches"]

_SEQUENTIAL: weakref.WeakKeyDictionary[DataLoader, DataLoader] = weakref.WeakKeyDictionary()


def in_dataset_order(loader: DataLoader) -> DataLoader:
    """``loader`` itself, or a loader over the same dataset that reads it whole and in order.

    Replaced (once per loader, then reused): a shuffling ``RandomSampler``
    (``shuffle=True``), by the dataset's order; ``drop_last=True``, by reading
    the last partial batch too. Refused with the fix named:
    samplers that draw with replacement or a random subset.
    """
    if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
        return (
            loader  # the dataset (or a custom batch_sampler) decides the order: checked by the core
        )
    sampler = loader.sampler
    if isinstance(sampler, (WeightedRandomSampler, SubsetRandomSampler)) or (
        isinstance(sampler, RandomSampler)
        and (sampler.replacement or sampler.num_samples != len(loader.dataset))
    ):
        raise DataOrderError(
            f"the DataLoader draws its samples with a {type(sampler).__name__} (with replacement "
            "or a random subset), so its passes are not one training set in one order and no "
            "score could be matched to a sample. Pass a DataLoader over the training set itself "
            "(torch.utils.data.Subset(dataset, indices) for a subset), without a sampler."
        )
    shuffles = isinstance(sampler, RandomSampler)
    drops = bool(loader.drop_last)
    if not shuffles and not drops:
        return loader
    cached = _SEQUENTIAL.get(loader)
    if cached is None:
        workers = int(loader.num_workers)
        extra: dict[str, Any] = {}
        if workers > 0:
            extra = {
                "prefetch_factor": loader.prefetch_factor,
                "persistent_workers": loader.persistent_workers,
                "multiprocessing_context": loader.multiprocessing_context,
                "worker_init_fn": loader.worker_init_fn,
            }
        cached = DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            # a shuffle becomes the dataset's order; any other sampler keeps its own order
            sampler=SequentialSampler(loader.dataset) if shuffles else sampler,
            drop_last=False,
            collate_fn=loader.collate_fn,
            num_workers=workers,
            pin_memory=loader.pin_memory,
            timeout=loader.timeout,
            **extra,
        )
        _SEQUENTIAL[loader] = cached
    return cached


def native_batch_count(data: Any, batch_size: int) -> int | None:
    if isinstance(data, DataLoader):
        try:
            return len(in_dataset_order(data))
        except TypeError:  # an iterable-style dataset without a length
            return None
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return -(-len(data) // batch_size)
    return None


def native_batches(data: Any, batch_size: int) -> Iterator[Any] | None:
    if isinstance(data, DataLoader):
        return iter(in_dataset_order(data))
    if isinstance(data, (Dataset, IterableDataset)):
        return iter(DataLoader(data, batch_size=batch_size, shuffle=False))
    return None
