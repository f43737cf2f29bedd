"""influence_core: which training examples made my model do this?

One implementation of training-data influence for PyTorch, TensorFlow and
any framework with a backend plugin. The user API is this module: wrap a
model (:class:`InfluenceModel`), configure a solver and a calculator, fit the
calculator on the training data, ask for scores::

    im = InfluenceModel(model, loss_fn, parameters=["fc2"])
    calc = FirstOrderInfluenceCalculator(im, ExactIHVP(damping=1e-3)).fit(train)
    top = calc.top_k(test, k=5)

The plugin-author API (the protocol, the registry, the hooks) is
:mod:`influence_core.plugin`; the command-line application is
:mod:`influence_core.app`.
"""

from __future__ import annotations

from typing import Any

from .data import Batch
from .errors import (
    AmbiguousBackendError,
    BackendNotFoundError,
    ChunkRecomputedWarning,
    ConvergenceWarning,
    CostLimitError,
    DataConsumedError,
    DataOrderError,
    DatasetFormatError,
    DuplicateBackendError,
    EmptyDataError,
    EndlessDataError,
    FingerprintMismatchError,
    FrozenParameterError,
    InvalidBackendSpecError,
    InvalidSampleError,
    LissaDivergenceError,
    MeasurementError,
    NonFiniteGradientError,
    NotFittedError,
    NotPositiveDefiniteError,
    PerSampleLossError,
    PluginLoadWarning,
    PrecisionWarning,
    ResultFileError,
    RunLockedError,
    UnknownParameterError,
)
from .estimators import (
    TRAK,
    ArnoldiInfluenceCalculator,
    FirstOrderInfluenceCalculator,
    GradientSimilarity,
    InfluenceCalculator,
    RepresenterPointL2,
    RepresenterPointLJE,
    SecondOrderInfluenceCalculator,
    TopK,
    TracIn,
)
from .ihvp import (
    EKFACIHVP,
    KFACIHVP,
    ArnoldiIHVP,
    ConjugateGradientIHVP,
    ExactIHVP,
    InverseHessianVectorProduct,
    LissaIHVP,
)
from .io import SavedResult, load_result, save_result
from .measurements import Measurement, logit, margin, probability
from .model import InfluenceModel
from .plugin.protocol import UnsupportedByBackendError
from .plugin.registry import get_registry
from .progress import set_progress
from .projection import KroneckerProjection, RandomProjection
from .runs import run_influence, run_self_influence, run_top_k

__all__ = [
    "EKFACIHVP",
    "KFACIHVP",
    "TRAK",
    "AmbiguousBackendError",
    "ArnoldiIHVP",
    "ArnoldiInfluenceCalculator",
    "BackendNotFoundError",
    "Batch",
    "ChunkRecomputedWarning",
    "ConjugateGradientIHVP",
    "ConvergenceWarning",
    "CostLimitError",
    "DataConsumedError",
    "DataOrderError",
    "DatasetFormatError",
    "DuplicateBackendError",
    "EmptyDataError",
    "EndlessDataError",
    "ExactIHVP",
    "FingerprintMismatchError",
    "FirstOrderInfluenceCalculator",
    "FrozenParameterError",
    "GradientSimilarity",
    "InfluenceCalculator",
    "InfluenceModel",
    "InvalidBackendSpecError",
    "InvalidSampleError",
    "InverseHessianVectorProduct",
    "KroneckerProjection",
    "LissaDivergenceError",
    "LissaIHVP",
    "Measurement",
    "MeasurementError",
    "NonFiniteGradientError",
    "NotFittedError",
    "NotPositiveDefiniteError",
    "PerSampleLossError",
    "PluginLoadWarning",
    "PrecisionWarning",
    "RandomProjection",
    "RepresenterPointL2",
    "RepresenterPointLJE",
    "ResultFileError",
    "RunLockedError",
    "SavedResult",
    "SecondOrderInfluenceCalculator",
    "TopK",
    "TracIn",
    "UnknownParameterError",
    "UnsupportedByBackendError",
    "array_namespace",
    "available_backends",
    "load_result",
    "logit",
    "margin",
    "probability",
    "run_influence",
    "run_self_influence",
    "run_top_k",
    "save_result",
    "set_progress",
]

__version__ = "0.1.0.dev0"


def available_backends() -> list[str]:
    """Names of the backends whose plugins loaded."""
    return get_registry().names()


def array_namespace(array: Any) -> Any:
    """The Array API namespace for a native or NumPy array.

    NumPy arrays are the core's: array-api-compat's NumPy namespace, whatever
    plugins are installed. A native array gets its backend's namespace.
    """
    import numpy as np

    from .plugin.namespace import numpy_namespace

    if isinstance(array, np.ndarray | np.generic):
        return numpy_namespace()
    spec = get_registry().for_array(array)
    if spec is not None:
        return spec.load_namespace()
    raise BackendNotFoundError(
        f"no installed backend handles arrays of type {type(array).__module__}."
        f"{type(array).__qualname__}; installed backends: {available_backends() or 'none'}"
    )
