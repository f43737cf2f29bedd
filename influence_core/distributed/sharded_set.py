"""``ShardedTrainingSet``: a training set in shards on a Dask cluster, summed where each shard is.

It is :class:`~influence_core.sums.ShardedData`: every solver's fit (the
Hessian, CG's and Arnoldi's HVP passes, the K-FAC/EK-FAC factors) runs on it
unchanged. Each pass maps the statistic over the shards (one task per
shard, on the worker holding it) and adds the results in a tree of pairwise
sums on the workers, neighbours first, so the driver receives one array per
pass and the order of the additions is fixed (the same bits on every run).
The driver keeps what iterates (CG's iterate, Arnoldi's basis).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from ..io import weights_fingerprint
from ..model import InfluenceModel
from ..progress import progress
from ..sums import ShardedData, Statistic
from ..tree import tree_map
from .factory import ModelFactory
from .shards import Shard
from .tasks import (
    MakeCalculator,
    PlacedShard,
    ShardResult,
    WorkerJob,
    add_sums,
    aligned,
    identity,
    shard_meta,
    shard_sum,
)

__all__ = ["ShardedTrainingSet"]

#: One line per finished shard, at INFO: ``logging.getLogger("influence_core.distributed")``.
logger = logging.getLogger("influence_core.distributed")


class ShardedTrainingSet(ShardedData):
    """Shards of the training set, held on the workers of a Dask ``client``.

    Args:
        client: a ``distributed.Client`` (of a ``LocalCluster``, or of a
            remote scheduler: ``Client("tcp://scheduler:8786")``).
        factory: builds the model on each worker (:class:`ModelFactory`).
        shards: the training set, in order (:mod:`influence_core.distributed.shards`).

    Each shard descriptor is held as a task result on a worker (a file
    shard holds only its path), so the tasks of every pass run where their
    shard is; a worker lost mid-run has its shards and tasks recomputed
    elsewhere by Dask, from the descriptors the scheduler keeps.
    """

    def __init__(self, client: Any, factory: ModelFactory, shards: Sequence[Shard]) -> None:
        shards = list(shards)
        if not shards:
            raise ValueError("a sharded training set needs at least one shard")
        bad = [type(s).__name__ for s in shards if not isinstance(s, Shard)]
        if bad:
            raise TypeError(
                f"shards must be Shard descriptors (ArrayShard, NpzShard, DatasetShard), got {bad}"
            )
        self.client = client
        self.factory = factory
        self.token = uuid.uuid4().hex[:12]
        placed, start = [], 0
        for index, shard in enumerate(shards):
            if shard.size < 1:
                raise ValueError(f"shard {index} ({shard.describe()}) holds no samples")
            placed.append(PlacedShard(index, start, shard))
            start += shard.size
        #: The shards, each with its index and the number of its first sample.
        self.placed: list[PlacedShard] = placed
        self._n = start
        self.shard_futures = [self.hold(p, f"shard-{p.index}") for p in placed]
        self._jobs: dict[tuple[str | None, int], tuple[Any, Any]] = {}

    @property
    def num_samples(self) -> int:
        return self._n

    def __len__(self) -> int:
        return len(self.placed)

    def __repr__(self) -> str:
        return f"ShardedTrainingSet({len(self.placed)} shards, {self._n} samples)"

    # -- holding values on the cluster -----------------------------------------------------
    def hold(self, value: Any, name: str) -> Any:
        """``value`` held on a worker as a task's result (recomputable: the scheduler keeps it)."""
        key = f"influence-{name}-{self.token}-{uuid.uuid4().hex[:8]}"
        return self.client.submit(identity, value, key=key, pure=False)

    def job(self, model: InfluenceModel, make_calculator: MakeCalculator | None = None) -> Any:
        """The held :class:`WorkerJob` for a driver model (its weights' fingerprint) and recipe."""
        fingerprint = weights_fingerprint(model)  # every call: the driver's weights may change
        cache_key = (fingerprint, id(make_calculator))
        if cache_key not in self._jobs:
            job = WorkerJob(self.factory, make_calculator, fingerprint)
            # The recipe is kept beside its job, so its id is never reused by another.
            self._jobs[cache_key] = (make_calculator, self.hold(job, "job"))
        return self._jobs[cache_key][1]

    # -- passes ------------------------------------------------------------------------
    def map_shards(self, task: Callable[..., Any], *arguments: Any, name: str) -> list[Any]:
        """One future per shard: ``task(*arguments, shard j's held descriptor)``."""
        return self.submit_each(task, lambda j: (*arguments, self.shard_futures[j]), name)

    def submit_each(
        self,
        task: Callable[..., Any],
        arguments: Callable[[int], tuple[Any, ...]],
        name: str,
        shards: Sequence[int] | None = None,
    ) -> list[Any]:
        """One future per shard (or per listed shard): ``task(*arguments(j))``."""
        stamp = uuid.uuid4().hex[:8]
        indices = range(len(self.placed)) if shards is None else shards
        return [
            self.client.submit(
                task, *arguments(j), key=f"influence-{name}-{self.token}-{stamp}-{j}", pure=False
            )
            for j in indices
        ]

    def tree(self, futures: list[Any], combine: Callable[..., Any], *extra: Any, name: str) -> Any:
        """The futures combined pairwise, neighbours first, on the workers: one future."""
        stamp = uuid.uuid4().hex[:8]
        level = 0
        while len(futures) > 1:
            combined = [
                self.client.submit(
                    combine,
                    futures[i],
                    futures[i + 1],
                    *extra,
                    key=f"influence-{name}-{self.token}-{stamp}-{level}-{i}",
                    pure=False,
                )
                for i in range(0, len(futures) - 1, 2)
            ]
            if len(futures) % 2:
                combined.append(futures[-1])
            futures, level = combined, level + 1
        return futures[0]

    def follow(self, futures: list[Any], what: str) -> Iterator[ShardResult | tuple]:
        """Each shard's result (or metadata) as it finishes, with a log line and a progress bar.

        ``futures`` return :class:`ShardResult` s or ``(index, seconds, worker)``.
        """
        from distributed import as_completed

        began = time.perf_counter()
        done = 0
        stream = as_completed(futures, with_results=True)
        for _, result in progress(stream, desc=what, total=len(futures)):
            index, seconds, worker = (
                (result.index, result.seconds, result.worker)
                if isinstance(result, ShardResult)
                else result
            )
            placed = self.placed[index]
            done += 1
            logger.info(
                "%s: shard %d (samples %d-%d) done on %s in %.2f s [%d/%d, %.1f s elapsed]",
                what,
                index,
                placed.start,
                placed.start + placed.size - 1,
                worker,
                seconds,
                done,
                len(futures),
                time.perf_counter() - began,
            )
            yield result

    def sum_over_shards(
        self, model: InfluenceModel, statistic: Statistic, arguments: dict[str, Any]
    ) -> dict[str, Any]:
        """Σ over shards of the statistic, tree-summed on the workers; native arrays of ``model``."""
        host = tree_map(lambda a: _to_numpy(model, a), arguments)
        held = self.hold(host, "arguments")
        job = self.job(model)
        name = getattr(statistic, "__name__", "statistic").strip("_")
        leaves = self.submit_each(
            shard_sum, lambda j: (job, self.shard_futures[j], statistic, held), name
        )
        metas = [self.client.submit(shard_meta, f, pure=False) for f in leaves]
        total = self.tree(leaves, add_sums, name=f"{name}-sum")
        for _ in self.follow(metas, name.replace("_", " ")):
            pass
        values = aligned(total.result().values)
        return {
            key: model.kernels.as_native(value) if isinstance(value, np.ndarray) else value
            for key, value in values.items()
        }


def _to_numpy(model: InfluenceModel, leaf: Any) -> Any:
    """Native arrays as NumPy (what crosses processes); NumPy, numbers and objects as they are."""
    if isinstance(leaf, np.ndarray) or not hasattr(leaf, "shape"):
        return leaf
    return np.asarray(model.to_numpy(leaf))
