"""The one saving layer: atomic ``.npz`` + JSON files, fingerprints, no pickle.

Everything influence_core writes (a result, a chunk of a resumable run, a
fitted solver's state) is a directory holding ``arrays.npz`` and
``metadata.json``. The metadata records the format, what wrote it and with
which settings, the backend and framework versions, SHA-256 fingerprints of
the parameters θ and of each dataset, the recorded shape and dtype of every
array, and the SHA-256 of ``arrays.npz`` itself, so a truncated or edited file
is refused on load. Arrays are read with ``allow_pickle=False``, always.

Writes are atomic (a temporary file in the same directory, then
``os.replace``): a process killed mid-write leaves the old file or none, never
half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FingerprintMismatchError, ResultFileError
from .model import InfluenceModel
from .tree import tree_leaves

__all__ = [
    "FORMAT",
    "SavedResult",
    "atomic_savez",
    "atomic_write_text",
    "check_model",
    "data_fingerprint",
    "host_data_fingerprint",
    "load_result",
    "parameter_fingerprint",
    "read_npz",
    "save_result",
    "sha256_file",
    "weights_fingerprint",
]

FORMAT = "influence_core.result/1"
ARRAYS, METADATA = "arrays.npz", "metadata.json"


@dataclass
class SavedResult:
    """A loaded result: NumPy arrays by name and the metadata dictionary."""

    arrays: dict[str, np.ndarray]
    metadata: dict[str, Any]


# -- fingerprints ---------------------------------------------------------------------
def parameter_fingerprint(model: InfluenceModel) -> str:
    """SHA-256 of the selected parameter names and of θ as float64 bytes.

    The same weights give the same fingerprint in every framework only when
    their flat orders agree; saved results are meant to be reloaded with the
    framework that wrote them.
    """
    digest = hashlib.sha256()
    digest.update("\n".join(model.parameter_names).encode())
    theta = np.ascontiguousarray(model.to_numpy(model.get_parameters()), dtype=np.float64)
    digest.update(theta.tobytes())
    return digest.hexdigest()


def weights_fingerprint(model: InfluenceModel) -> str | None:
    """SHA-256 of **all** the model's weights (not only θ), or ``None`` if the backend cannot list them.

    Scores depend on every weight (a first layer changes the last layer's
    gradients), so saved results and runs record this beside θ's fingerprint.
    Uses the backend's optional ``save_state``.
    """
    from .plugin.protocol import UnsupportedByBackendError

    try:
        state = model.save_state()
    except UnsupportedByBackendError:
        return None
    digest = hashlib.sha256()
    if isinstance(state, dict):
        for key in sorted(state, key=str):
            digest.update(str(key).encode())
            digest.update(_leaf_bytes(model, state[key]))
    else:
        for leaf in tree_leaves(state):
            digest.update(_leaf_bytes(model, leaf))
    return digest.hexdigest()


def _leaf_bytes(model: InfluenceModel, leaf: Any) -> bytes:
    array = leaf if isinstance(leaf, np.ndarray) else np.asarray(model.to_numpy(leaf))
    array = np.ascontiguousarray(array)
    return str((array.dtype.str, array.shape)).encode() + array.tobytes()


def data_fingerprint(
    model: InfluenceModel, data: Any, batch_size: int | None = None
) -> dict[str, Any]:
    """``{"sha256": ..., "n": ...}`` of every input and target value, whatever the batching.

    Each leaf of the inputs and the targets is hashed as one stream of its
    rows (its dtype and per-sample shape first), so the same samples give the
    same fingerprint as ``(X, y)`` arrays, a ``DataLoader`` or another
    ``batch_size``.
    """
    return _stream_fingerprint(
        [np.ascontiguousarray(model.to_numpy(leaf)) for leaf in _leaves(batch)]
        for batch in model.batches(data, batch_size, whole=True)
    )


def host_data_fingerprint(data: Any, floating: str) -> dict[str, Any]:
    """:func:`data_fingerprint` without a model, for data NumPy can read: the check ``load_result`` makes with ``data=`` alone.

    ``data``: ``(X, y)`` arrays (NumPy or any array NumPy converts) or a list
    of ``(inputs, targets)`` batches; floating values are cast to ``floating``
    (the dtype the model converted them to when the result was saved), as
    the model's own conversion does. A framework's dataset (a ``DataLoader``,
    a ``tf.data.Dataset``) is read by its backend: pass ``model=`` for it.
    """
    from .data import is_array_pair

    def rows(leaf: Any) -> np.ndarray:
        array = np.asarray(leaf)
        if array.dtype.kind == "f":
            array = array.astype(floating, copy=False)
        return np.ascontiguousarray(array)

    def pairs(batch: Any) -> list[np.ndarray]:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(
                f"checking data= without model= reads (X, y) arrays or a list of (inputs, "
                f"targets) batches, got an element of type {type(batch).__name__}; pass model="
            )
        return [rows(leaf) for part in batch for leaf in tree_leaves(part)]

    if is_array_pair(data):
        return _stream_fingerprint([pairs(data)])
    if not isinstance(data, list):
        raise TypeError(
            f"checking data= of type {type(data).__name__} needs model=: its backend reads it "
            "(a DataLoader or a tf.data.Dataset), so pass the model the result was computed "
            "with, or the data as (X, y) arrays"
        )
    return _stream_fingerprint(pairs(batch) for batch in data)


def _stream_fingerprint(batches: Any) -> dict[str, Any]:
    """The fingerprint of a stream of batches, each a list of host leaves (inputs', then targets')."""
    streams: list[Any] = []
    n = 0
    for leaves in batches:
        if not streams:
            streams = [hashlib.sha256(str((a.dtype.str, a.shape[1:])).encode()) for a in leaves]
        for stream, array in zip(streams, leaves, strict=True):
            stream.update(array.tobytes())
        n += int(leaves[-1].shape[0])
    digest = hashlib.sha256()
    for stream in streams:
        digest.update(stream.digest())
    return {"sha256": digest.hexdigest(), "n": n}


def _leaves(batch: Any) -> list[Any]:
    return [*tree_leaves(batch.inputs), *tree_leaves(batch.targets)]


# -- atomic files -----------------------------------------------------------------------
def atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
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


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.replace(temporary, path)


def read_npz(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of an ``.npz`` file, or ``None`` if it is missing or unreadable (never unpickled)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {name: stored[name] for name in stored.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError):
        return None


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def host(model: InfluenceModel, value: Any) -> np.ndarray:
    """A NumPy copy of a native (or NumPy) array."""
    return value if isinstance(value, np.ndarray) else np.asarray(model.to_numpy(value))


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


# -- results ----------------------------------------------------------------------------
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

    ``parameters`` are the settings that produced them (JSON values);
    ``data`` maps names (``"train"``, ``"test"``) to datasets whose
    fingerprints are recorded, and :func:`load_result` can check them.
    """
    directory = Path(directory)
    host_arrays = {name: host(model, value) for name, value in arrays.items()}
    atomic_savez(directory / ARRAYS, host_arrays)
    metadata = {
        "format": FORMAT,
        "method": method,
        "parameters": parameters or {},
        "environment": _environment(model),
        "parameter_names": list(model.parameter_names),
        "parameter_fingerprint": parameter_fingerprint(model),
        "weights_fingerprint": weights_fingerprint(model),
        # what the model converted floating data to: load_result checks data= alone with it
        "floating_dtype": str(np.dtype(host(model, model.xp.zeros((1,), dtype=model.dtype)).dtype)),
        "data": {
            name: data_fingerprint(model, value, batch_size) for name, value in (data or {}).items()
        },
        "arrays": {name: [list(a.shape), a.dtype.str] for name, a in host_arrays.items()},
        "arrays_sha256": sha256_file(directory / ARRAYS),
    }
    atomic_write_text(directory / METADATA, json.dumps(metadata, indent=2))
    return directory


def load_result(
    directory: str | Path,
    *,
    model: InfluenceModel | None = None,
    data: dict[str, Any] | None = None,
    batch_size: int | None = None,
    method: str | None = None,
) -> SavedResult:
    """Load a result; with ``model`` / ``data``, refuse it if their fingerprints differ.

    ``data`` is checked with or without ``model``: without it, ``(X, y)``
    arrays and lists of batches are read with NumPy (a framework's dataset
    needs ``model=``, and says so).

    Raises :class:`~influence_core.errors.ResultFileError` for a missing,
    truncated or edited result (or one written by another ``method``), and
    :class:`~influence_core.errors.FingerprintMismatchError` for one computed
    at other parameters or on other data.
    """
    directory = Path(directory)
    meta_path, arrays_path = directory / METADATA, directory / ARRAYS
    if not meta_path.exists() or not arrays_path.exists():
        raise ResultFileError(f"{directory} holds no saved result ({METADATA} and {ARRAYS})")
    try:
        metadata = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise ResultFileError(f"{meta_path} is not valid JSON: {error}") from error
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ResultFileError(f"{meta_path} is not an influence_core result (format {FORMAT})")
    _check_metadata(metadata, meta_path)
    if sha256_file(arrays_path) != metadata.get("arrays_sha256"):
        raise ResultFileError(
            f"{arrays_path} does not match the checksum in {METADATA}: the file is corrupted or "
            "was changed after saving; recompute the result"
        )
    arrays = read_npz(arrays_path)
    if arrays is None:
        raise ResultFileError(f"cannot read {arrays_path}")
    recorded = {name: [list(a.shape), a.dtype.str] for name, a in arrays.items()}
    if recorded != metadata["arrays"]:
        raise ResultFileError(
            f"the arrays in {arrays_path} ({recorded}) are not those {METADATA} records "
            f"({metadata['arrays']}): one of the two was changed after saving; recompute the result"
        )
    if method is not None and metadata.get("method") != method:
        raise ResultFileError(
            f"{directory} holds a result of {metadata.get('method')!r}, not of {method!r}"
        )
    if model is not None:
        check_model(metadata, model, str(directory))
    for name, value in (data or {}).items():
        expected = metadata.get("data", {}).get(name)
        if expected is None:
            raise FingerprintMismatchError(f"{directory} records no dataset named {name!r}")
        if model is not None:
            found = data_fingerprint(model, value, batch_size)
        elif "floating_dtype" in metadata:
            found = host_data_fingerprint(value, metadata["floating_dtype"])
        else:
            raise TypeError(
                f"{directory} was saved before results recorded the data's floating dtype, so "
                "data= can be checked only with model=; pass the model"
            )
        if found != expected:
            raise FingerprintMismatchError(
                f"the {name!r} data differs from the data {directory} was computed on "
                f"({expected['n']} samples, sha256 {expected['sha256'][:12]}…)"
            )
    return SavedResult(arrays, metadata)


#: The keys every metadata.json holds, and their JSON types.
_REQUIRED = {
    "method": str,
    "parameters": dict,
    "environment": dict,
    "parameter_names": list,
    "parameter_fingerprint": str,
    "data": dict,
    "arrays": dict,
    "arrays_sha256": str,
}


def _check_metadata(metadata: dict[str, Any], where: Path) -> None:
    problems = [
        f"{key!r} ({'missing' if key not in metadata else 'not a ' + kind.__name__})"
        for key, kind in _REQUIRED.items()
        if not isinstance(metadata.get(key), kind)
    ]
    for name, record in (metadata.get("data") or {}).items():
        if not (isinstance(record, dict) and {"sha256", "n"} <= set(record)):
            problems.append(f"data record {name!r}")
    if problems:
        raise ResultFileError(f"{where} is damaged: {', '.join(problems)}; recompute the result")


def check_model(metadata: dict[str, Any], model: InfluenceModel, where: str) -> None:
    """Refuse (:class:`FingerprintMismatchError`) metadata written for other weights or θ."""
    if metadata.get("parameter_names") != list(model.parameter_names):
        raise FingerprintMismatchError(
            f"{where} was computed for parameters {metadata.get('parameter_names')}, "
            f"but the model selects {list(model.parameter_names)}"
        )
    if metadata.get("parameter_fingerprint") != parameter_fingerprint(model):
        raise FingerprintMismatchError(
            f"{where} was computed at other parameter values (fingerprint mismatch)"
        )
    recorded = metadata.get("weights_fingerprint")
    if recorded is not None and recorded != weights_fingerprint(model):
        raise FingerprintMismatchError(
            f"{where} was computed with other weights outside θ (the selected parameters match, "
            "but another layer differs; every weight changes the scores)"
        )
