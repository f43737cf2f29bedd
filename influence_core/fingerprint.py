"""Fingerprints that tie saved results to the parameters they were computed at."""

from __future__ import annotations

import hashlib

import numpy as np

from .model import InfluenceModel

__all__ = ["parameter_fingerprint"]


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
