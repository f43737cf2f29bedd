"""influence_core: which training examples made my model do this?

One implementation of training-data influence for PyTorch and TensorFlow.
The core is written against the Python Array API and the autodiff protocol
(:class:`ModelKernels`); backends are pluggy plugins.
"""

from __future__ import annotations

from typing import Any

from .data import Batch
from .errors import (
    BackendNotFoundError,
    ConvergenceWarning,
    DatasetFormatError,
    DuplicateBackendError,
    FingerprintMismatchError,
    InvalidBackendSpecError,
    LissaDivergenceError,
    NonFiniteGradientError,
    NotPositiveDefiniteError,
    PerSampleLossError,
    PluginLoadWarning,
    PrecisionWarning,
    ResultFileError,
    UnknownParameterError,
)
from .estimators import (
    ArnoldiInfluenceCalculator,
    FirstOrderInfluenceCalculator,
    InfluenceCalculator,
    RepresenterPointL2,
    RepresenterPointLJE,
    SecondOrderInfluenceCalculator,
    TopK,
    TracIn,
)
from .hookspecs import hookimpl
from .ihvp import (
    ArnoldiIHVP,
    ConjugateGradientIHVP,
    ExactIHVP,
    InverseHessianVectorProduct,
    LissaIHVP,
)
from .model import InfluenceModel
from .namespace import ArrayNamespace, numpy_namespace
from .progress import set_progress
from .protocol import ModelKernels
from .registry import BackendRegistry, BackendSpec, get_registry
from .results import SavedResult, load_result, run_chunked, save_result

__all__ = [
    "ArnoldiIHVP",
    "ArnoldiInfluenceCalculator",
    "ArrayNamespace",
    "BackendNotFoundError",
    "BackendRegistry",
    "BackendSpec",
    "Batch",
    "ConjugateGradientIHVP",
    "ConvergenceWarning",
    "DatasetFormatError",
    "DuplicateBackendError",
    "ExactIHVP",
    "FingerprintMismatchError",
    "FirstOrderInfluenceCalculator",
    "InfluenceCalculator",
    "InfluenceModel",
    "InvalidBackendSpecError",
    "InverseHessianVectorProduct",
    "LissaDivergenceError",
    "LissaIHVP",
    "ModelKernels",
    "NonFiniteGradientError",
    "NotPositiveDefiniteError",
    "PerSampleLossError",
    "PluginLoadWarning",
    "PrecisionWarning",
    "RepresenterPointL2",
    "RepresenterPointLJE",
    "ResultFileError",
    "SavedResult",
    "SecondOrderInfluenceCalculator",
    "TopK",
    "TracIn",
    "UnknownParameterError",
    "array_namespace",
    "available_backends",
    "get_registry",
    "hookimpl",
    "load_result",
    "run_chunked",
    "save_result",
    "set_progress",
]

__version__ = "0.1.0.dev0"


def available_backends() -> list[str]:
    """Names of the backends whose plugins loaded."""
    return get_registry().names()


def array_namespace(array: Any) -> ArrayNamespace:
    """The namespace (Array API plus ``top_k``) for a native or NumPy array."""
    spec = get_registry().for_array(array)
    if spec is not None:
        return spec.load_namespace()
    import numpy as np

    if isinstance(array, np.ndarray | np.generic):
        return numpy_namespace()
    raise BackendNotFoundError(
        f"no installed backend handles arrays of type {type(array).__module__}."
        f"{type(array).__qualname__}; installed backends: {available_backends() or 'none'}"
    )
