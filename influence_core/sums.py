"""Sums over the training data, computed where the data is: in this process, or over shards elsewhere.

Every dataset-level quantity a solver fits is a sum over samples: the
Hessian or Gauss–Newton product (1/n) Σ_i H_i V, the full Hessian, the
K-FAC factors Σ ã ãᵀ and Σ g gᵀ, EK-FAC's corrected eigenvalues. A
*statistic* is a module-level function ``statistic(model, data, **arguments)``
returning a dict of such sums (native arrays, or Python numbers for counts)
over ``data``. :func:`dataset_sum` evaluates it over the training data:

* in this process, for any data the model iterates: the function itself;
* over shards held elsewhere, for :class:`ShardedData` (e.g.
  :class:`influence_core.distributed.ShardedTrainingSet` on a Dask
  cluster): each shard's worker evaluates the same function on its shard,
  and the sums are added up.

So a solver's fit is written once and runs in one process or on a cluster;
the core never knows which. Sharded data is never iterated in this process:
:meth:`~influence_core.InfluenceModel.batches` refuses it by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

__all__ = ["ShardedData", "Statistic", "curvature_sum", "dataset_sum", "hessian_sum"]

Array = Any
#: ``statistic(model, data, **arguments) -> {name: sum over the samples of data}``
Statistic = Callable[..., dict[str, Any]]


class ShardedData(ABC):
    """Training data held in shards elsewhere, whose sums are computed where each shard is.

    An implementation evaluates a :data:`Statistic` on every shard (each
    with the same model and weights) and returns the added sums as native
    arrays of ``model`` (Python numbers stay numbers). Arguments that are
    native arrays are sent as NumPy and arrive as the worker model's native
    arrays.
    """

    @property
    @abstractmethod
    def num_samples(self) -> int:
        """n, the samples in all the shards together."""

    @abstractmethod
    def sum_over_shards(
        self, model: Any, statistic: Statistic, arguments: dict[str, Any]
    ) -> dict[str, Any]:
        """Σ over shards of ``statistic(worker model, shard, **arguments)``, as ``model``'s arrays."""


def dataset_sum(model: Any, data: Any, statistic: Statistic, **arguments: Any) -> dict[str, Any]:
    """``statistic`` summed over all of ``data``: here, or over its shards for :class:`ShardedData`."""
    if isinstance(data, ShardedData):
        return data.sum_over_shards(model, statistic, arguments)
    return statistic(model, data, **arguments)


def curvature_sum(
    model: Any, data: Any, *, vectors: Array, curvature: str, batch_size: int | None
) -> dict[str, Any]:
    """Σ_i H_i V (or the Gauss–Newton product) over ``data``, and n: the statistic of an HVP pass."""
    n = model.count(data, batch_size)
    return {"sum": model.curvature_vp(data, vectors, curvature, batch_size) * n, "n": n}


def hessian_sum(
    model: Any,
    data: Any,
    *,
    curvature: str,
    batch_size: int | None,
    block_size: int,
    max_parameters: int,
) -> dict[str, Any]:
    """Σ_i H_i (d × d) over ``data``, and n: the statistic of the full Hessian."""
    n = model.count(data, batch_size)
    hessian = model.hessian(
        data,
        block_size=block_size,
        batch_size=batch_size,
        max_parameters=max_parameters,
        curvature=curvature,
    )
    return {"sum": hessian * n, "n": n}
