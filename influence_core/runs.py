"""Chunked, resumable runs: influence, self-influence and top-k over training chunks.

Each function streams the training data in chunks (whole batches, each
closed once it holds ``chunk_size`` samples or more), writes every finished
chunk atomically to ``directory/chunks/``, and, started again on the same
directory after an interruption, reads the chunks already there instead of
recomputing them. The assembled result is saved with
:func:`~influence_core.io.save_result` and returned as native arrays.

``directory/run.json`` records what the run is: the function, the
calculator and its settings (solver type and every setting, damping,
measurement …), the chunk size, the fingerprints of θ and of **all** the
model's weights, and the fingerprints of the scored training data and the
test data (which depend only on the samples, not on batching or container).
A directory holding another run is refused with
:class:`~influence_core.errors.FingerprintMismatchError` naming what differs.

Every chunk is verified before it is reused: ``chunk_N.json`` beside
``chunk_N.npz`` records its start, its length and the SHA-256 of the file; a
chunk whose file is unreadable, whose checksum or record does not match, or
whose arrays have the wrong length is computed again, with a
:class:`~influence_core.errors.ChunkRecomputedWarning` naming it.

One process writes a run at a time: ``directory/run.lock`` holds the writer's
process id, and a second writer is refused with
:class:`~influence_core.errors.RunLockedError`. A lock left by a process that
no longer runs (killed) is taken over.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .chunk_store import check_manifest, locked, verified_chunk, write_chunk
from .data import chunks
from .errors import ChunkRecomputedWarning
from .estimators.base import InfluenceCalculator
from .estimators.top_k import RunningTopK, TopK
from .io import (
    FORMAT,
    data_fingerprint,
    host,
    parameter_fingerprint,
    save_result,
    weights_fingerprint,
)
from .progress import progress

__all__ = ["run_influence", "run_self_influence", "run_top_k"]

Array = Any
#: ``compute(chunk data, start) -> arrays of the chunk``
ChunkCompute = Callable[[list[tuple[Any, Any]], int], dict[str, np.ndarray]]


def run_influence(
    calculator: InfluenceCalculator,
    directory: str | Path,
    test_data: Any,
    train_data: Any = None,
    *,
    chunk_size: int = 1024,
) -> Array:
    """:meth:`~InfluenceCalculator.influence` (n_test, n_train), chunk by chunk, resumable."""
    model = calculator.model
    calculator.check_cost("influence", train_data)
    prepared = _test_side_once(calculator, test_data)

    def compute(chunk: list[tuple[Any, Any]], start: int) -> dict[str, np.ndarray]:
        return {"scores": host(model, calculator.influence_from_prepared(prepared(), chunk))}

    def valid(arrays: dict[str, np.ndarray], start: int, length: int) -> bool:
        return arrays["scores"].ndim == 2 and arrays["scores"].shape[1] == length

    parts = _run(
        calculator, directory, "influence", compute, valid, test_data, train_data, chunk_size
    )
    scores = model.kernels.as_native(np.concatenate([p["scores"] for p in parts[0]], axis=1))
    _save(calculator, directory, {"influence": scores}, test_data, train_data, chunk_size, parts)
    return scores


def run_self_influence(
    calculator: InfluenceCalculator,
    directory: str | Path,
    train_data: Any = None,
    *,
    chunk_size: int = 1024,
) -> Array:
    """:meth:`~InfluenceCalculator.self_influence` (n_train,), chunk by chunk, resumable."""
    model = calculator.model
    calculator.check_cost("self-influence", train_data)

    def compute(chunk: list[tuple[Any, Any]], start: int) -> dict[str, np.ndarray]:
        return {"values": host(model, calculator.self_influence(chunk))}

    def valid(arrays: dict[str, np.ndarray], start: int, length: int) -> bool:
        return arrays["values"].shape == (length,)

    parts = _run(
        calculator, directory, "self_influence", compute, valid, None, train_data, chunk_size
    )
    values = model.kernels.as_native(np.concatenate([p["values"] for p in parts[0]]))
    _save(calculator, directory, {"self_influence": values}, None, train_data, chunk_size, parts)
    return values


def run_top_k(
    calculator: InfluenceCalculator,
    directory: str | Path,
    test_data: Any,
    train_data: Any = None,
    *,
    k: int = 5,
    chunk_size: int = 1024,
) -> TopK:
    """:meth:`~InfluenceCalculator.top_k`, chunk by chunk, resumable; chunks keep their own top-k."""
    model = calculator.model
    xp = model.xp
    prepared = _test_side_once(calculator, test_data)

    def compute(chunk: list[tuple[Any, Any]], start: int) -> dict[str, np.ndarray]:
        top = calculator.top_k_from_prepared(prepared(), chunk, k)
        arrays = {name: host(model, value) for name, value in zip(TopK._fields, top, strict=True)}
        for name in ("proponents", "opponents"):  # indices into the whole training data
            arrays[name] = arrays[name] + start  # (a host copy may be read-only: JAX)
        return arrays

    def valid(arrays: dict[str, np.ndarray], start: int, length: int) -> bool:
        indices = np.concatenate([arrays["proponents"], arrays["opponents"]], axis=1)
        return indices.shape[1] == 2 * min(int(k), length) and bool(
            np.all((indices >= start) & (indices < start + length))
        )

    parts = _run(
        calculator,
        directory,
        "top_k",
        compute,
        valid,
        test_data,
        train_data,
        chunk_size,
        k=int(k),
    )
    merged = []
    for name, largest in (("proponent", True), ("opponent", False)):
        top = RunningTopK(xp, k, largest=largest)
        for part in parts[0]:
            top.merge(
                model.kernels.as_native(part[f"{name}_scores"]),
                model.kernels.as_native(part[f"{name}s"]),
            )
        merged += [top.indices, top.values]
    result = TopK(*merged)
    arrays = dict(zip(TopK._fields, result, strict=True))
    _save(calculator, directory, arrays, test_data, train_data, chunk_size, parts, k=int(k))
    return result


# -- the shared machinery ------------------------------------------------------------------
def _test_side_once(calculator: InfluenceCalculator, test_data: Any) -> Callable[[], Any]:
    """The calculator's test side, computed on first use: never when every chunk is on disk."""
    cache: list[Any] = []

    def prepared() -> Any:
        if not cache:
            cache.append(calculator.prepare_test(test_data))
        return cache[0]

    return prepared


def _manifest(
    calculator: InfluenceCalculator,
    what: str,
    test_data: Any,
    train: Any,
    chunk_size: int,
    k: int | None,
) -> dict[str, Any]:
    model = calculator.model
    return {
        "format": FORMAT,
        "run": what,
        "method": type(calculator).__name__,
        "settings": calculator.get_params(),
        "chunk_size": int(chunk_size),
        "k": k,
        "parameter_names": list(model.parameter_names),
        "parameter_fingerprint": parameter_fingerprint(model),
        "weights_fingerprint": weights_fingerprint(model),
        "train": data_fingerprint(model, train, calculator.batch_size),
        "test": None if test_data is None else data_fingerprint(model, test_data),
    }


def _run(
    calculator: InfluenceCalculator,
    directory: str | Path,
    what: str,
    compute: ChunkCompute,
    valid: Callable[[dict[str, np.ndarray], int, int], bool],
    test_data: Any,
    train_data: Any,
    chunk_size: int,
    *,
    k: int | None = None,
) -> tuple[list[dict[str, np.ndarray]], int]:
    """(every chunk's arrays in order, how many this call computed).

    A chunk whose file is there and readable is read; any other (missing,
    truncated, unreadable) is computed and written.
    """
    model = calculator.model
    train = calculator.training_data(train_data)
    directory = Path(directory)
    chunks_dir = directory / "chunks"
    with locked(directory):
        manifest = _manifest(calculator, what, test_data, train, chunk_size, k)
        check_manifest(directory, manifest)
        parts, computed = [], 0
        stream = chunks(model.batches(train, calculator.batch_size), chunk_size)
        for index, chunk in enumerate(
            progress(
                stream,
                desc=what,
                total=_chunk_total(model, train, calculator.batch_size, chunk_size),
            )
        ):
            start, length = chunk[0].start, sum(b.size for b in chunk)
            path = chunks_dir / f"chunk_{index:06d}.npz"
            stored, problem = verified_chunk(path, start, length, valid)
            if stored is None:
                if problem is not None:
                    warnings.warn(
                        f"chunk {index} of {directory} ({path.name}, samples {start} to "
                        f"{start + length - 1}) {problem}: computing it again",
                        ChunkRecomputedWarning,
                        stacklevel=3,
                    )
                stored = compute([(b.inputs, b.targets) for b in chunk], start)
                write_chunk(path, stored, start, length)
                computed += 1
            parts.append(stored)
    return parts, computed


def _chunk_total(model: Any, train: Any, batch_size: int | None, chunk_size: int) -> int | None:
    """Chunks of an ``(X, y)`` pair (each closes at ``chunk_size`` samples or more)."""
    batches = model.num_batches(train, batch_size)
    if batches is None or not isinstance(train, tuple):
        return None
    per_chunk = -(-chunk_size // (batch_size or model.batch_size))
    return -(-batches // per_chunk)


def _save(
    calculator: InfluenceCalculator,
    directory: str | Path,
    arrays: dict[str, Array],
    test_data: Any,
    train_data: Any,
    chunk_size: int,
    parts: tuple[list[dict[str, np.ndarray]], int],
    *,
    k: int | None = None,
) -> None:
    save_result(
        directory,
        arrays,
        method=type(calculator).__name__,
        model=calculator.model,
        parameters={
            **calculator.get_params(),
            "chunk_size": int(chunk_size),
            "k": k,
            "chunks": len(parts[0]),
            "chunks_computed_by_the_last_call": parts[1],
        },
        data={"train": calculator.training_data(train_data)}
        | ({} if test_data is None else {"test": test_data}),
        batch_size=calculator.batch_size,
    )
