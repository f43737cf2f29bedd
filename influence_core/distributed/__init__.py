"""Influence over a sharded training set on Dask: ``pip install "influence-core[distributed]"``.

The training set is a list of shard descriptors; each worker builds the
model from a :class:`ModelFactory` (weights as NumPy or a checkpoint path,
never a live model) and loads its shards itself. Solvers fit on the driver
through :class:`ShardedTrainingSet`, whose every data pass is one task per
shard and a tree sum; the fitted state and the solved test block are held
once on the cluster as NumPy; self-influence, scores and top-k run shard by
shard. Dask retries the tasks of a lost worker, and every task is a pure
function of NumPy inputs, so the numbers are those of an uninterrupted run.
See ``docs/distributed.md``.
"""

from __future__ import annotations

from .config import worker_environment_config
from .factory import ModelFactory
from .influence import DistributedInfluence
from .sharded_set import ShardedTrainingSet
from .shards import ArrayShard, DatasetShard, NpzShard, Shard, shard_arrays

__all__ = [
    "ArrayShard",
    "DatasetShard",
    "DistributedInfluence",
    "ModelFactory",
    "NpzShard",
    "Shard",
    "ShardedTrainingSet",
    "shard_arrays",
    "worker_environment_config",
]
