"""Results that are safe to keep: ``.npz`` arrays (no pickle), JSON metadata, fingerprints.

A result directory holds ``arrays.npz`` and ``metadata.json``: the method,
its parameters, the backend and framework versions, the data sizes, SHA-256
fingerprints of the model parameters and of each dataset, and the SHA-256 of
``arrays.npz`` itself, so a truncated or edited file is refused on load.
:func:`run_chunked` computes scores, self-influence or top-k over training
chunks, writes each finished chunk as it goes and, started again on the same
directory after an interruption, resumes from the chunks already written.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import Batch
from .errors import FingerprintMismatchError, ResultFileError
from .estimators.base import InfluenceCalculator
from .estimators.running_top_k import RunningTopK, TopK
from .fingerprint import parameter_fingerprint
from .model import InfluenceModel
from .progress import progress

__all__ = [
    "SavedResult",
    "data_fingerprint",
    "load_result",
    "run_chunked",
    "save_result",
]

FORMAT = "influence_core.result/1"
_ARRAYS, _META = "arrays.npz", "metadata.json"


@dataclass
class SavedResult:
    """A loaded result: NumPy arrays by name and the metadata dictionary."""

    arrays: dict[str, np.ndarray]
    metadata: dict[str, Any]


def data_fingerprint(
    model: InfluenceModel, data: Any, batch_size: int | None = None
) -> dict[str, Any]:
    """``{"sha256": ..., "n": ...}`` of every input and target value, batch by batch."""
    digest, n = hashlib.sha256(), 0
    for batch in model.batches(data, batch_size):
        for part in (batch.inputs, batch.targets):
            for leaf in _leaves(part):
                array = np.ascontiguousarray(model.to_numpy(leaf))
                digest.update(str((array.dtype.str, array.shape[1:])).encode())
                digest.update(array.tobytes())
        n += batch.size
    return {"sha256": digest.hexdigest(), "n": n}


def _leaves(tree: Any) -> Iterator[Any]:
    if isinstance(tree, dict):
        for key in sorted(tree):
            yield from _leaves(tree[key])
    elif isinstance(tree, list | tuple):
        for item in tree:
            yield from _leaves(item)
    else:
        yield tree


def _environment(model: InfluenceModel) -> dict[str, str]:
    from . import __version__

    framework = type(model.model).__module__.split(".")[0]
    module = sys.modules.get(framework)
    return {
        "influence_core": __version__,
        "backend": model.backend,
        "framework": framework,
        "framework_version": str(getattr(module, "__version__", "unknown")),
        "numpy": np.__version__,
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``path`` so it either exists whole or not at all (a kill never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    os.close(handle)
    try:
        np.savez(temporary, **arrays)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _atomic_write_text(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.replace(temporary, path)


def _host(model: InfluenceModel, value: Any) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else np.asarray(model.to_numpy(value))


def save_result(
    directory: str | Path,
    arrays: dict[str, Any],
    *,
    method: str,
    model: InfluenceModel,
    parameters: dict[str, Any] | None = None,
    data: dict[str, Any] | None = None,
    batch_size: int | None = None,
) -> Path:
    """Save named arrays (native or NumPy) and their metadata to ``directory``.

    ``data`` maps names (``"train"``, ``"test"``) to datasets whose
    fingerprints are recorded; :func:`load_result` can check them.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    host = {name: _host(model, value) for name, value in arrays.items()}
    _atomic_savez(directory / _ARRAYS, host)
    metadata = {
        "format": FORMAT,
        "method": method,
        "parameters": parameters or {},
        "environment": _environment(model),
        "parameter_names": list(model.parameter_names),
        "parameter_fingerprint": parameter_fingerprint(model),
        "data": {
            name: data_fingerprint(model, value, batch_size) for name, value in (data or {}).items()
        },
        "arrays": {name: [list(a.shape), a.dtype.str] for name, a in host.items()},
        "arrays_sha256": _sha256(directory / _ARRAYS),
    }
    _atomic_write_text(directory / _META, json.dumps(metadata, indent=2))
    return directory


def load_result(
    directory: str | Path,
    *,
    model: InfluenceModel | None = None,
    data: dict[str, Any] | None = None,
    batch_size: int | None = None,
) -> SavedResult:
    """Load a result; with ``model`` / ``data``, refuse it if their fingerprints differ.

    Raises :class:`~influence_core.errors.ResultFileError` for a missing,
    truncated or edited result, :class:`~influence_core.errors.FingerprintMismatchError`
    for one computed at other parameters or on other data.
    """
    directory = Path(directory)
    meta_path, arrays_path = directory / _META, directory / _ARRAYS
    if not meta_path.exists() or not arrays_path.exists():
        raise ResultFileError(f"{directory} holds no saved result ({_META} and {_ARRAYS})")
    try:
        metadata = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise ResultFileError(f"{meta_path} is not valid JSON: {error}") from error
    if metadata.get("format") != FORMAT:
        raise ResultFileError(f"{meta_path} is not an influence_core result (format {FORMAT})")
    if _sha256(arrays_path) != metadata.get("arrays_sha256"):
        raise ResultFileError(
            f"{arrays_path} does not match the checksum in {_META}: the file is corrupted or was "
            "changed after saving; recompute the result"
        )
    try:
        with np.load(arrays_path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
    except (zipfile.BadZipFile, ValueError, OSError) as error:
        raise ResultFileError(f"cannot read {arrays_path}: {error}") from error
    if model is not None:
        _check_model(metadata, model, str(directory))
        for name, value in (data or {}).items():
            expected = metadata["data"].get(name)
            if expected is None:
                raise FingerprintMismatchError(f"{directory} records no dataset named {name!r}")
            if data_fingerprint(model, value, batch_size) != expected:
                raise FingerprintMismatchError(
                    f"the {name!r} data differs from the data {directory} was computed on "
                    f"({expected['n']} samples, sha256 {expected['sha256'][:12]}…)"
                )
    return SavedResult(arrays, metadata)


def _check_model(metadata: dict[str, Any], model: InfluenceModel, where: str) -> None:
    if metadata["parameter_names"] != list(model.parameter_names):
        raise FingerprintMismatchError(
            f"{where} was computed for parameters {metadata['parameter_names']}, "
            f"but the model selects {list(model.parameter_names)}"
        )
    if metadata["parameter_fingerprint"] != parameter_fingerprint(model):
        raise FingerprintMismatchError(
            f"{where} was computed at other parameter values (fingerprint mismatch)"
        )


# -- chunked, resumable runs ----------------------------------------------------------
KINDS = ("influence", "self_influence", "top_k")


def _chunks(
    model: InfluenceModel, data: Any, chunk_size: int, batch_size: int | None
) -> Iterator[list[Batch]]:
    chunk: list[Batch] = []
    size = 0
    for batch in model.batches(data, batch_size):
        chunk.append(batch)
        size += batch.size
        if size >= chunk_size:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def run_chunked(
    calculator: InfluenceCalculator,
    directory: str | Path,
    kind: str,
    *,
    test_data: Any = None,
    train_data: Any = None,
    k: int = 5,
    chunk_size: int = 1024,
) -> Any:
    """Compute ``kind`` over training chunks, saving each chunk; resume if interrupted.

    Chunks are whole batches, each closed once it holds ``chunk_size`` samples or more.
    ``kind``: ``"influence"`` (n_test, n_train), ``"self_influence"``
    (n_train,) or ``"top_k"`` (a :class:`TopK`). Each finished chunk of
    ``chunk_size`` training samples is written atomically to
    ``directory/chunks/``; run again with the same directory, calculator
    and data, it skips the chunks already there (their data is read, not
    recomputed) and only computes the rest. The assembled result is saved
    with :func:`save_result` (``arrays.npz`` + ``metadata.json``) and
    returned as native arrays. A directory holding a different run (other
    kind, chunk size, parameters or test data) is refused.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind != "self_influence" and test_data is None:
        raise ValueError(f"{kind} needs test_data")
    model = calculator.model
    train = calculator._train(train_data)
    directory = Path(directory)
    chunks_dir = directory / "chunks"
    chunks_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": FORMAT,
        "kind": kind,
        "method": type(calculator).__name__,
        "chunk_size": int(chunk_size),
        "k": int(k) if kind == "top_k" else None,
        "parameter_names": list(model.parameter_names),
        "parameter_fingerprint": parameter_fingerprint(model),
        "test": None if test_data is None else data_fingerprint(model, test_data),
    }
    manifest_path = directory / "run.json"
    if manifest_path.exists():
        previous = json.loads(manifest_path.read_text())
        if previous != manifest:
            different = sorted(key for key in manifest if previous.get(key) != manifest[key])
            raise FingerprintMismatchError(
                f"{directory} holds another run (different {', '.join(different)}); "
                "use a new directory, or delete this one to start over"
            )
    else:
        _atomic_write_text(manifest_path, json.dumps(manifest, indent=2))

    prepared = None
    computed = 0
    for index, chunk in enumerate(
        progress(_chunks(model, train, chunk_size, calculator.batch_size), desc=kind)
    ):
        path = chunks_dir / f"chunk_{index:06d}.npz"
        if _readable(path):
            continue
        chunk_data = [(b.inputs, b.targets) for b in chunk]
        start = chunk[0].start
        if kind == "self_influence":
            arrays = {"values": _host(model, calculator.self_influence(chunk_data))}
        else:
            if prepared is None:
                prepared = calculator.prepare_test(test_data)
            scores = calculator.influence_from_prepared(prepared, chunk_data)
            if kind == "influence":
                arrays = {"scores": _host(model, scores)}
            else:
                arrays = _chunk_top_k(model, scores, start, k)
        arrays["start"] = np.array(start)
        _atomic_savez(path, arrays)
        computed += 1
    result = _assemble(model, chunks_dir, kind, k)
    host_arrays = (
        dict(zip(TopK._fields, (model.to_numpy(a) for a in result), strict=True))
        if kind == "top_k"
        else {kind: model.to_numpy(result)}
    )
    save_result(
        directory,
        host_arrays,
        method=type(calculator).__name__,
        model=model,
        parameters={
            "kind": kind,
            "chunk_size": chunk_size,
            "k": manifest["k"],
            "chunks": len(list(chunks_dir.glob("chunk_*.npz"))),
            "chunks_computed_by_the_last_call": computed,
        },
        data={"train": train} | ({} if test_data is None else {"test": test_data}),
    )
    return result


def _readable(path: Path) -> bool:
    if not path.exists():
        return False
    try:
        with np.load(path, allow_pickle=False) as stored:
            return "start" in stored.files
    except (zipfile.BadZipFile, ValueError, OSError):
        return False


def _chunk_top_k(model: InfluenceModel, scores: Any, start: int, k: int) -> dict[str, np.ndarray]:
    xp = model.xp
    index_like = xp.astype(xp.zeros((1,)), xp.int64)
    out = {}
    for name, largest in (("proponents", True), ("opponents", False)):
        top = RunningTopK(xp, k, largest=largest)
        top.update(scores, start, index_like)
        out[name] = _host(model, top.indices)
        out[f"{name[:-1]}_scores"] = _host(model, top.values)
    return out


def _assemble(model: InfluenceModel, chunks_dir: Path, kind: str, k: int) -> Any:
    xp, native = model.xp, model.kernels.as_native
    paths = sorted(chunks_dir.glob("chunk_*.npz"))
    parts = []
    for path in paths:
        with np.load(path, allow_pickle=False) as stored:
            parts.append({name: stored[name] for name in stored.files})
    if kind == "self_influence":
        return native(np.concatenate([p["values"] for p in parts]))
    if kind == "influence":
        return native(np.concatenate([p["scores"] for p in parts], axis=1))
    merged = []
    for name, largest in (("proponent", True), ("opponent", False)):
        indices = native(np.concatenate([p[f"{name}s"] for p in parts], axis=1))
        values = native(np.concatenate([p[f"{name}_scores"] for p in parts], axis=1))
        top_values, position = xp.top_k(
            values, min(k, int(values.shape[1])), axis=1, largest=largest
        )
        merged += [xp.take_along_axis(indices, position, axis=1), top_values]
    return TopK(*merged)
