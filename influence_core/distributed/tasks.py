"""What runs on a worker: one shard's statistic, scores, self-influence or top-k, and the merges.

Every task takes plain picklable inputs (the job, a placed shard, NumPy
arrays) and returns NumPy. The worker's model is built once per process
from the job's factory (:meth:`ModelFactory.cached`); the calculator is
restored once per fitted state. A task is a pure function of its inputs, so
one retried on another worker after a crash returns the same bits.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data import OffsetData
from ..estimators.base import InfluenceCalculator
from ..estimators.top_k import RunningTopK
from ..model import InfluenceModel
from ..plugin.namespace import numpy_namespace
from ..sums import Statistic
from ..tree import tree_map
from .factory import ModelFactory
from .shards import Shard

__all__ = [
    "ALIGNMENT",
    "FittedCalculator",
    "PlacedShard",
    "ShardResult",
    "TestSide",
    "WorkerJob",
    "add_sums",
    "aligned",
    "merge_top_k",
    "shard_scores",
    "shard_self_influence",
    "shard_sum",
    "shard_top_k",
]

MakeCalculator = Callable[[InfluenceModel], InfluenceCalculator]


@dataclass(frozen=True, eq=False)
class WorkerJob:
    """What every task of one run needs: the model factory, the calculator recipe, the weights' fingerprint."""

    factory: ModelFactory
    make_calculator: MakeCalculator | None
    weights_fingerprint: str | None

    def model(self) -> InfluenceModel:
        return self.factory.cached(self.weights_fingerprint)


@dataclass(frozen=True, eq=False)
class PlacedShard:
    """A shard and where it sits in the training set: its index and the number of its first sample."""

    index: int
    start: int
    shard: Shard

    @property
    def size(self) -> int:
        return self.shard.size

    def data(self) -> OffsetData:
        """The shard's data, numbered from ``start`` (loaded here, on the worker), NumPy aligned."""
        return OffsetData(aligned(self.shard.load()), self.start, self.size)


@dataclass(frozen=True, eq=False)
class FittedCalculator:
    """A calculator's fitted state (NumPy, from ``fitted_state()``), with the key workers cache it by."""

    key: str
    state: dict[str, np.ndarray]


@dataclass(frozen=True, eq=False)
class TestSide:
    """The calculator's prepared test side (NumPy), with the key workers cache its native form by."""

    key: str
    value: Any


@dataclass
class ShardResult:
    """A shard task's NumPy results, and where and how long it ran (for the driver's log line)."""

    index: int
    values: dict[str, Any]
    seconds: float
    worker: str = field(default="")


#: Bytes every NumPy buffer is aligned to before a framework computes on it.
ALIGNMENT = 64


def aligned(tree: Any) -> Any:
    """``tree`` with every NumPy leaf copied to a buffer aligned to :data:`ALIGNMENT` bytes.

    Arrays arrive from other processes at whatever offset their message put
    them, and BLAS kernels can round differently at different alignments
    (the last bits of a float64 product). Copied to one alignment, the same
    inputs give the same bits on every worker and every retry.
    """

    def copy(leaf: Any) -> Any:
        if not isinstance(leaf, np.ndarray) or leaf.dtype.hasobject:
            return leaf
        buffer = np.empty(leaf.nbytes + ALIGNMENT, dtype=np.uint8)
        offset = (-buffer.ctypes.data) % ALIGNMENT
        out = buffer[offset : offset + leaf.nbytes].view(leaf.dtype).reshape(leaf.shape)
        out[...] = leaf
        return out

    return tree_map(copy, tree)


def _native(model: InfluenceModel, tree: Any) -> Any:
    """NumPy leaves of ``tree`` (aligned) as the model's native arrays; everything else as it is."""
    return tree_map(
        lambda a: model.kernels.as_native(a) if isinstance(a, np.ndarray) else a, aligned(tree)
    )


def _host(model: InfluenceModel, value: Any) -> Any:
    """A native array as NumPy; Python numbers (and NumPy already) as they are."""
    if isinstance(value, int | float | np.ndarray | np.generic):
        return value
    return np.asarray(model.to_numpy(value))


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


_LOCAL = threading.local()


def _cached(kind: str, key: str, build: Callable[[], Any]) -> Any:
    """This thread's ``build()`` for ``key`` (the latest two of each kind kept)."""
    cache: dict[str, Any] = _LOCAL.__dict__.setdefault(kind, {})
    if key not in cache:
        value = build()
        while len(cache) >= 2:
            cache.pop(next(iter(cache)))
        cache[key] = value
    return cache[key]


def _calculator(job: WorkerJob, fitted: FittedCalculator) -> InfluenceCalculator:
    """This thread's calculator restored from ``fitted``, once per fit."""

    def build() -> InfluenceCalculator:
        model = job.model()
        if job.make_calculator is None:  # pragma: no cover - the driver checks
            raise ValueError("this run has no calculator")
        return job.make_calculator(model).restore_fitted(_native(model, fitted.state), None)

    return _cached("calculators", fitted.key, build)


def _test_side(calculator: InfluenceCalculator, test: TestSide) -> Any:
    """The test side as the calculator's native arrays, converted (and aligned) once per thread."""
    return _cached("test_sides", test.key, lambda: _native(calculator.model, test.value))


def _timed(index: int, compute: Callable[[], dict[str, Any]]) -> ShardResult:
    began = time.perf_counter()
    values = compute()
    return ShardResult(index, values, time.perf_counter() - began, _worker_name())


# -- the tasks --------------------------------------------------------------------------
def shard_sum(
    job: WorkerJob, placed: PlacedShard, statistic: Statistic, arguments: dict[str, Any]
) -> ShardResult:
    """``statistic(model, shard, **arguments)`` on this worker's model, as NumPy."""

    def compute() -> dict[str, Any]:
        model = job.model()
        sums = statistic(model, placed.data(), **_native(model, arguments))
        return {name: _host(model, value) for name, value in sums.items()}

    return _timed(placed.index, compute)


def shard_self_influence(
    job: WorkerJob, fitted: FittedCalculator, placed: PlacedShard
) -> ShardResult:
    """score(z, z) for every sample of the shard: ``{"self_influence": (size,)}``."""

    def compute() -> dict[str, Any]:
        calculator = _calculator(job, fitted)
        values = calculator.self_influence(placed.data())
        return {"self_influence": _host(calculator.model, values)}

    return _timed(placed.index, compute)


def shard_scores(
    job: WorkerJob, fitted: FittedCalculator, placed: PlacedShard, test: TestSide
) -> np.ndarray:
    """The shard's block of scores against the broadcast test side: (n_test, size)."""
    calculator = _calculator(job, fitted)
    scores = calculator.influence_from_prepared(_test_side(calculator, test), placed.data())
    return _host(calculator.model, scores)


def shard_scores_result(
    job: WorkerJob, fitted: FittedCalculator, placed: PlacedShard, test: TestSide
) -> ShardResult:
    """:func:`shard_scores` as a :class:`ShardResult` (``{"scores": (n_test, size)}``)."""
    return _timed(placed.index, lambda: {"scores": shard_scores(job, fitted, placed, test)})


def shard_top_k(
    job: WorkerJob, fitted: FittedCalculator, placed: PlacedShard, test: TestSide, k: int
) -> ShardResult:
    """The shard's k strongest proponents and opponents per test point, global indices, as NumPy."""

    def compute() -> dict[str, Any]:
        calculator = _calculator(job, fitted)
        top = calculator.top_k_from_prepared(_test_side(calculator, test), placed.data(), k)
        return {name: _host(calculator.model, value) for name, value in top._asdict().items()}

    return _timed(placed.index, compute)


def shard_meta(result: ShardResult) -> tuple[int, float, str]:
    """(shard index, seconds, worker) of a result: the small part the driver logs."""
    return result.index, result.seconds, result.worker


# -- the merges (a tree of them: each combines two neighbours, the lower shards first) ------
def add_sums(left: ShardResult, right: ShardResult) -> ShardResult:
    """Two shards' sums added, name by name."""
    values = {name: left.values[name] + right.values[name] for name in left.values}
    return ShardResult(left.index, values, left.seconds + right.seconds)


def merge_top_k(left: ShardResult, right: ShardResult, k: int) -> ShardResult:
    """The top k of two neighbouring shards' top k (``left`` has the lower indices).

    The same stable selection as the single-process running top-k, so ties
    go to the lower training index here too.
    """
    xp = numpy_namespace()
    merged: dict[str, Any] = {}
    for kind, largest in (("proponent", True), ("opponent", False)):
        running = RunningTopK(xp, k, largest=largest)
        for part in (left, right):
            running.merge(part.values[f"{kind}_scores"], part.values[f"{kind}s"])
        merged[f"{kind}s"], merged[f"{kind}_scores"] = running.indices, running.values
    return ShardResult(left.index, merged, left.seconds + right.seconds)


def identity(value: Any) -> Any:
    """A value held as a task's result: kept on a worker, recomputed from the scheduler if lost."""
    return value
