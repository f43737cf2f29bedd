"""Where TRAK keeps its training features: in memory, or as verified chunk files on disk.

Per model s of the ensemble and chunk c of the training data, the store holds
Φ_s,c (the chunk's projected gradients, (len, k)) and Q_s,c (its out-to-loss
weights, (len,)). On disk each is ``checkpoint_S/chunk_C.npz`` with its JSON
record (:mod:`influence_core.chunk_store`): a run killed mid-fit resumes from the
chunks already written, and scoring reads one chunk at a time, so memory
stays flat in n_train.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..chunk_store import verified_chunk, write_chunk
from ..errors import ChunkRecomputedWarning, FingerprintMismatchError
from ..io import atomic_write_text, host, parameter_fingerprint, weights_fingerprint
from ..model import InfluenceModel

__all__ = ["FeatureStore"]

Array = Any


class FeatureStore:
    """Φ and Q per (model, chunk): native arrays in memory, or NumPy chunk files in ``directory``."""

    def __init__(self, model: InfluenceModel, directory: str | Path | None) -> None:
        self.model = model
        self.directory = None if directory is None else Path(directory)
        self._memory: dict[tuple[int, int], tuple[Array, Array, int]] = {}
        #: (start, length) of every chunk, in order.
        self.chunks: list[tuple[int, int]] = []

    def _path(self, s: int, c: int) -> Path:
        assert self.directory is not None
        return self.directory / f"checkpoint_{s:03d}" / f"chunk_{c:06d}.npz"

    def check_checkpoint(self, s: int) -> None:
        """Refuse a directory whose model s was featurised at other weights (the loaded ones)."""
        if self.directory is None:
            return
        record = {
            "parameter_fingerprint": parameter_fingerprint(self.model),
            "weights_fingerprint": weights_fingerprint(self.model),
        }
        path = self.directory / f"checkpoint_{s:03d}" / "checkpoint.json"
        if path.exists():
            previous = json.loads(path.read_text())
            if previous != record:
                raise FingerprintMismatchError(
                    f"{path.parent} holds features of other weights for checkpoint {s}; "
                    "use a new directory, or delete this one to start over"
                )
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record))

    def stored(self, s: int, c: int, start: int, length: int) -> tuple[Array, Array] | None:
        """(Φ, Q) of model s, chunk c, if already there (and verified, on disk)."""
        if self.directory is None:
            return None
        path = self._path(s, c)

        def valid(arrays: dict[str, np.ndarray], start: int, length: int) -> bool:
            return len(arrays["features"]) == length and len(arrays["weights"]) == length

        arrays, problem = verified_chunk(path, start, length, valid)
        if arrays is None:
            if problem is not None:
                warnings.warn(
                    f"TRAK features {path} {problem}: computing them again",
                    ChunkRecomputedWarning,
                    stacklevel=3,
                )
            return None
        native = self.model.kernels.as_native
        return native(arrays["features"], floating=True), native(arrays["weights"], floating=True)

    def put(self, s: int, c: int, start: int, features: Array, weights: Array) -> None:
        length = int(features.shape[0])
        if s == 0:
            self.chunks.append((start, length))
        if self.directory is None:
            self._memory[(s, c)] = (features, weights, start)
            return
        path = self._path(s, c)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"features": host(self.model, features), "weights": host(self.model, weights)}
        write_chunk(path, arrays, start, length)

    def get(self, s: int, c: int) -> tuple[Array, Array]:
        """(Φ_s,c, Q_s,c) as native arrays (read from disk, one chunk at a time)."""
        if self.directory is None:
            features, weights, _ = self._memory[(s, c)]
            return features, weights
        start, length = self.chunks[c]
        found = self.stored(s, c, start, length)
        if found is None:
            raise FileNotFoundError(
                f"TRAK features of checkpoint {s}, chunk {c} are missing from {self.directory}; "
                "fit again on this directory to recompute them"
            )
        return found
