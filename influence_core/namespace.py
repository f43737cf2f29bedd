"""The array namespace the core computes with.

The core never calls a framework directly: it asks the model (or an array) for
its namespace ``xp`` and writes ``xp.matmul``, ``xp.linalg.solve`` … as in the
Python Array API standard. NumPy and PyTorch get their namespace from
``array_api_compat``; TensorFlow, which ``array_api_compat`` does not cover,
gets one from its backend.

The standard has no top-k, which the estimators need for running top-k over
training batches, so every namespace adapter adds it::

    values, indices = xp.top_k(x, k, axis=-1, largest=True)

``values`` are sorted (largest first when ``largest``), ties broken by the
lower index, ``indices`` are integer arrays of the same shape.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Protocol, runtime_checkable

__all__ = ["ArrayNamespace", "NamespaceWithTopK", "numpy_namespace"]


@runtime_checkable
class ArrayNamespace(Protocol):
    """What the core uses from a namespace: the Array API standard plus ``top_k``.

    Only the names below are relied upon; a backend that cannot offer the whole
    standard (TensorFlow) implements exactly these. Semantics follow the
    standard (2023.12) wherever a name exists there.

    Creation: ``asarray, zeros, ones, eye, arange, full, zeros_like, ones_like``.
    Manipulation: ``reshape, concat, stack, expand_dims, squeeze, permute_dims``.
    Element-wise: ``abs, sqrt, exp, log, square, isfinite, isnan, logical_not,
    logical_and, logical_or, where, maximum, minimum``. Reductions: ``sum, mean, max, min, all, any``.
    Linear algebra: ``matmul, vecdot, matrix_transpose, linalg.solve,
    linalg.cholesky, linalg.eigh, linalg.vector_norm``. Searching and sorting:
    ``argsort, sort, argmax, nonzero, take, take_along_axis``. Types: ``astype, float32, float64,
    int64, bool``. Extension: ``top_k``.
    """

    float32: Any
    float64: Any
    int64: Any

    def asarray(self, obj: Any, /, *, dtype: Any = None) -> Any: ...
    def matmul(self, x1: Any, x2: Any, /) -> Any: ...
    def sum(self, x: Any, /, *, axis: Any = None, keepdims: bool = False) -> Any: ...
    def concat(self, arrays: Any, /, *, axis: int | None = 0) -> Any: ...
    def top_k(
        self, x: Any, k: int, /, *, axis: int = -1, largest: bool = True
    ) -> tuple[Any, Any]: ...


class NamespaceWithTopK:
    """An ``array_api_compat`` namespace plus a ``top_k`` function.

    Attribute access falls through to the wrapped namespace, so
    ``xp.linalg.solve`` and friends are the compat layer's own.
    """

    def __init__(self, namespace: ModuleType, top_k: Any, name: str):
        self._namespace = namespace
        self.top_k = top_k
        self.__name__ = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._namespace, attr)

    def __repr__(self) -> str:
        return f"<array namespace {self.__name__}>"


def _numpy_top_k(x: Any, k: int, /, *, axis: int = -1, largest: bool = True) -> tuple[Any, Any]:
    import numpy as np

    # A stable sort of the key keeps the lower index first among ties, the
    # tie-break every backend's ``top_k`` follows.
    key = -x if largest else x
    idx = np.take(np.argsort(key, axis=axis, kind="stable"), np.arange(k), axis=axis)
    return np.take_along_axis(x, idx, axis=axis), idx


_NUMPY: NamespaceWithTopK | None = None


def numpy_namespace() -> NamespaceWithTopK:
    """The NumPy namespace (through ``array_api_compat``) with ``top_k``."""
    global _NUMPY
    if _NUMPY is None:
        import array_api_compat.numpy as compat_numpy

        _NUMPY = NamespaceWithTopK(compat_numpy, _numpy_top_k, "numpy")
    return _NUMPY
