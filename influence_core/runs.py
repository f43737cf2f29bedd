"""Chunked, resumable runs: influence, self-influence and top-k over training chunks.

Each function streams the training data in chunks (whole batches, each
closed once it holds ``chunk_size`` samples or more), writes every finished
chunk atomically to ``directory/chunks/``, and, started again on the same
directory after an interruption, reads the chunks already there instead of
recomputing them. The assembled result is saved with
:func:`~influence_core.io.save_result` and returned as native arrays.

``directory/run.json`` records what the run is: the function, the
calculator and its settings (solver, damping, measurement …), the chunk
size, the parameters' fingerprint and the fingerprints of the scored
training data and the test data. A directory holding another run is refused
with :class:`~influence_core.errors.FingerprintMismatchError` naming what differs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .data import chunks
from .errors import FingerprintMismatchError
from .estimators.base import InfluenceCalculator
from .estimators.top_k import RunningTopK, TopK
from .io import (
    FORMAT,
    atomic_savez,
    atomic_write_text,
    data_fingerprint,
    host,
    parameter_fingerprint,
    read_npz,
    save_result,
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
    prepared = _test_side_once(calculator, test_data)

    def compute(chunk: list[tuple[Any, Any]], start: int) -> dict[str, np.ndarray]:
        return {"scores": host(model, calculator.influence_from_prepared(prepared(), chunk))}

    parts = _run(calculator, directory, "influence", compute, test_data, train_data, chunk_size)
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

    def compute(chunk: list[tuple[Any, Any]], start: int) -> dict[str, np.ndarray]:
        return {"values": host(model, calculator.self_influence(chunk))}

    parts = _run(calculator, directory, "self_influence", compute, None, train_data, chunk_size)
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
        arrays["proponents"] += start  # indices into the whole training data
        arrays["opponents"] += start
        return arrays

    parts = _run(
        calculator, directory, "top_k", compute, test_data, train_data, chunk_size, k=int(k)
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
        "train": data_fingerprint(model, train, calculator.batch_size),
        "test": None if test_data is None else data_fingerprint(model, test_data),
    }


def _run(
    calculator: InfluenceCalculator,
    directory: str | Path,
    what: str,
    compute: ChunkCompute,
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
    manifest = _manifest(calculator, what, test_data, train, chunk_size, k)
    manifest_path = directory / "run.json"
    if manifest_path.exists():
        try:
            previous = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            previous = {}
        if previous != manifest:
            different = sorted(
                key
                for key in manifest
                if not isinstance(previous, dict) or previous.get(key) != manifest[key]
            )
            raise FingerprintMismatchError(
                f"{directory} holds another run (different {', '.join(different)}); "
                "use a new directory, or delete this one to start over"
            )
    else:
        atomic_write_text(manifest_path, json.dumps(manifest, indent=2))

    parts, computed = [], 0
    stream = chunks(model.batches(train, calculator.batch_size), chunk_size)
    for index, chunk in enumerate(progress(stream, desc=what)):
        path = chunks_dir / f"chunk_{index:06d}.npz"
        stored = read_npz(path)
        if stored is None or "start" not in stored:
            start = chunk[0].start
            stored = compute([(b.inputs, b.targets) for b in chunk], start)
            stored["start"] = np.array(start)
            atomic_savez(path, stored)
            computed += 1
        parts.append(stored)
    return parts, computed


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
