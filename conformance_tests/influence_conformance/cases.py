"""Built reference cases shared by the suite's checks (one build per backend, spec and dtype)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import pytest

from influence_core import InfluenceModel, UnsupportedByBackendError, get_registry

from . import numpy_reference as ref
from .reference_specs import SPECS, make_data
from .specs import ModelSpec, ReferenceModel, make_weights

#: Samples in the reference data, and the batch size: 13 = 4 + 4 + 4 + 1, so
#: every dataset-level quantity crosses a partial last batch.
N_SAMPLES = 13
BATCH_SIZE = 4

#: Relative tolerances, measured against the largest magnitude of the reference.
RTOL = {"float64": 1e-8, "float32": 1e-4}


@dataclass
class Case:
    spec: ModelSpec
    dtype: str
    weights: list[np.ndarray]
    X: np.ndarray
    y: np.ndarray
    reference: ReferenceModel
    model: InfluenceModel

    @property
    def data(self) -> tuple[np.ndarray, np.ndarray]:
        return self.X, self.y

    @property
    def rtol(self) -> float:
        return RTOL[self.dtype]


def optional(check: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a check of an optional capability: it is skipped, with the reason, when unsupported.

    A backend that implements only the abstract members of ``ModelKernels``
    passes every required check and skips these, never failing them.
    """

    @functools.wraps(check)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return check(*args, **kwargs)
        except UnsupportedByBackendError as error:
            pytest.skip(f"optional capability not implemented: {error}")

    return run


def to_numpy(array: object) -> np.ndarray:
    """A native array as float64/int NumPy (via ``__array__``/``.numpy()``)."""
    numpy = getattr(array, "numpy", None)
    if callable(numpy):
        array = numpy() if not hasattr(array, "detach") else array.detach().cpu().numpy()
    out = np.asarray(array)
    return out.astype(np.float64) if np.issubdtype(out.dtype, np.floating) else out


def assert_close(actual: object, expected: np.ndarray, rtol: float, what: str) -> None:
    """max |actual − expected| ≤ rtol · max |expected| (a norm-relative test; fails on NaN)."""
    actual = to_numpy(actual)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (
        f"{what}: shape {actual.shape} != expected {expected.shape}"
    )
    scale = float(np.max(np.abs(expected))) or 1.0
    error = float(np.max(np.abs(actual - expected))) / scale
    assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol:g} (scale {scale:.3g})"


ReferenceBuilder = Callable[[ModelSpec, list[np.ndarray], str], ReferenceModel]


def registered_builder(backend: str) -> ReferenceBuilder:
    """The ``reference_models`` builder a backend's :class:`~influence_core.BackendSpec` names."""
    return get_registry().by_name(backend).load_reference_models()


@cache
def build_case(
    backend: str, spec_name: str, dtype: str, builder: ReferenceBuilder | None = None
) -> Case:
    """Build (once per backend, spec, dtype and builder) a reference model and its data."""
    spec = SPECS[spec_name]
    weights = make_weights(spec)
    X, y = make_data(spec, weights, n=N_SAMPLES)
    reference = (builder or registered_builder(backend))(spec, weights, dtype)
    model = InfluenceModel(
        reference.model, reference.loss_fn, backend=backend, batch_size=BATCH_SIZE
    )
    return Case(spec, dtype, weights, X, y, reference, model)


@cache
def numpy_gradients(spec_name: str) -> np.ndarray:
    """Reference per-sample gradients (canonical order, float64) for a spec's data."""
    spec = SPECS[spec_name]
    weights = make_weights(spec)
    X, y = make_data(spec, weights, n=N_SAMPLES)
    if spec.reference == "closed_form":
        return ref.closed_form_per_sample_grads(spec, weights, X, y)
    return ref.finite_difference_per_sample_grads(spec, weights, X, y)
