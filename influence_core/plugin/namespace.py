"""The array namespace the core computes with.

The core never calls a framework directly: it asks the model (or an array) for
its namespace ``xp`` and writes ``xp.matmul``, ``xp.linalg.solve`` … as in the
Python Array API standard. NumPy and PyTorch get their namespace from
``array_api_compat`` as it is; TensorFlow, which ``array_api_compat`` does not
cover, gets one from its backend, implementing exactly the names below.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["ArrayNamespace", "numpy_namespace"]


@runtime_checkable
class ArrayNamespace(Protocol):
    """What the core uses from a namespace: a subset of the Array API standard (2023.12).

    Only the names below are relied upon; a backend that cannot offer the whole
    standard (TensorFlow) implements exactly these, with the standard's semantics.

    Creation: ``asarray, zeros, ones, eye, arange, full, zeros_like, ones_like``.
    Manipulation: ``reshape, concat, stack, expand_dims, squeeze, permute_dims``.
    Element-wise: ``abs, sqrt, exp, log, square, isfinite, isnan, logical_not,
    logical_and, logical_or, where, maximum, minimum``. Reductions: ``sum, mean, max, min, all, any``.
    Linear algebra: ``matmul, vecdot, matrix_transpose, linalg.solve,
    linalg.cholesky, linalg.eigh, linalg.vector_norm``. Searching and sorting:
    ``argsort`` (with ``descending`` and ``stable``), ``sort, argmax, nonzero, take,
    take_along_axis``. Types: ``astype, isdtype, float32, float64, int64, bool``.
    """

    float32: Any
    float64: Any
    int64: Any

    def asarray(self, obj: Any, /, *, dtype: Any = None) -> Any: ...
    def matmul(self, x1: Any, x2: Any, /) -> Any: ...
    def sum(self, x: Any, /, *, axis: Any = None, keepdims: bool = False) -> Any: ...
    def concat(self, arrays: Any, /, *, axis: int | None = 0) -> Any: ...
    def argsort(
        self, x: Any, /, *, axis: int = -1, descending: bool = False, stable: bool = True
    ) -> Any: ...


def numpy_namespace() -> Any:
    """The NumPy namespace, through ``array_api_compat``."""
    import array_api_compat.numpy as compat_numpy

    return compat_numpy
