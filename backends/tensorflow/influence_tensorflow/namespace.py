"""An Array API namespace for ``tf.Tensor``: exactly the subset influence_core uses.

``array_api_compat`` has no TensorFlow namespace (and ``tf.experimental.numpy``
follows NumPy, not the standard), so this module provides the functions listed
in :class:`influence_core.plugin.ArrayNamespace`, with the standard's
signatures and semantics, on plain ``tf.Tensor`` s. Each function is checked
against ``array-api-strict`` on random inputs (``tests/test_tensorflow_namespace.py``).

Deviations, all documented in the standard as implementation-defined:
the default floating dtype is ``float32`` (TensorFlow's); ``sum``/``prod`` keep
the input's integer dtype; devices are TensorFlow's placement.
"""

from __future__ import annotations

import builtins
import math
import sys
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

__array_api_version__ = "2023.12"

float32 = tf.float32
float64 = tf.float64
int32 = tf.int32
int64 = tf.int64
bool = tf.bool

Array = tf.Tensor

_builtin_bool = builtins.bool
_builtin_any = builtins.any


def _axes(axis: Any) -> Any:
    return list(axis) if isinstance(axis, tuple) else axis


# -- creation ---------------------------------------------------------------------
def asarray(obj: Any, /, *, dtype: Any = None, device: Any = None, copy: Any = None) -> Array:
    if isinstance(obj, tf.Variable):
        obj = obj.read_value()
    tensor = obj if isinstance(obj, tf.Tensor) else tf.convert_to_tensor(obj)
    if dtype is not None and tensor.dtype != dtype:
        tensor = tf.cast(tensor, dtype)
    return tf.identity(tensor) if copy else tensor


def zeros(shape: Any, *, dtype: Any = None, device: Any = None) -> Array:
    return tf.zeros(shape, dtype=dtype or float32)


def ones(shape: Any, *, dtype: Any = None, device: Any = None) -> Array:
    return tf.ones(shape, dtype=dtype or float32)


def full(shape: Any, fill_value: Any, *, dtype: Any = None, device: Any = None) -> Array:
    if dtype is None:
        dtype = (
            bool
            if isinstance(fill_value, _builtin_bool)
            else (int64 if isinstance(fill_value, int) else float32)
        )
    return tf.fill(shape, tf.constant(fill_value, dtype=dtype))


def full_like(x: Array, /, fill_value: Any, *, dtype: Any = None, device: Any = None) -> Array:
    return tf.fill(tf.shape(x), tf.constant(fill_value, dtype=dtype or x.dtype))


def zeros_like(x: Array, /, *, dtype: Any = None, device: Any = None) -> Array:
    return tf.zeros_like(x, dtype=dtype)


def ones_like(x: Array, /, *, dtype: Any = None, device: Any = None) -> Array:
    return tf.ones_like(x, dtype=dtype)


def eye(
    n_rows: int, n_cols: int | None = None, /, *, k: int = 0, dtype: Any = None, device: Any = None
) -> Array:
    return tf.constant(np.eye(n_rows, n_cols, k), dtype=dtype or float32)


def arange(
    start: Any, /, stop: Any = None, step: Any = 1, *, dtype: Any = None, device: Any = None
) -> Array:
    if stop is None:
        start, stop = 0, start
    if dtype is None:
        dtype = int64 if builtins.all(isinstance(v, int) for v in (start, stop, step)) else float32
    return tf.range(start, stop, step, dtype=dtype)


# -- manipulation -------------------------------------------------------------------
def reshape(x: Array, /, shape: Any, *, copy: Any = None) -> Array:
    return tf.reshape(x, shape)


def concat(arrays: Any, /, *, axis: int | None = 0) -> Array:
    if axis is None:
        return tf.concat([tf.reshape(a, [-1]) for a in arrays], axis=0)
    return tf.concat(list(arrays), axis=axis)


def stack(arrays: Any, /, *, axis: int = 0) -> Array:
    return tf.stack(list(arrays), axis=axis)


def expand_dims(x: Array, /, *, axis: int = 0) -> Array:
    return tf.expand_dims(x, axis)


def squeeze(x: Array, /, axis: Any) -> Array:
    return tf.squeeze(x, axis=_axes(axis))


def permute_dims(x: Array, /, axes: Any) -> Array:
    return tf.transpose(x, perm=list(axes))


def matrix_transpose(x: Array, /) -> Array:
    return tf.linalg.matrix_transpose(x)


# -- element-wise -------------------------------------------------------------------
def abs(x: Array, /) -> Array:
    return tf.math.abs(x)


def sqrt(x: Array, /) -> Array:
    return tf.math.sqrt(x)


def exp(x: Array, /) -> Array:
    return tf.math.exp(x)


def expm1(x: Array, /) -> Array:
    return tf.math.expm1(x)


def log(x: Array, /) -> Array:
    return tf.math.log(x)


def square(x: Array, /) -> Array:
    return tf.math.square(x)


def isfinite(x: Array, /) -> Array:
    if not x.dtype.is_floating:
        return tf.ones_like(x, dtype=bool)
    return tf.math.is_finite(x)


def isnan(x: Array, /) -> Array:
    if not x.dtype.is_floating:
        return tf.zeros_like(x, dtype=bool)
    return tf.math.is_nan(x)


def logical_not(x: Array, /) -> Array:
    return tf.math.logical_not(x)


def logical_and(x1: Array, x2: Array, /) -> Array:
    return tf.math.logical_and(x1, x2)


def logical_or(x1: Array, x2: Array, /) -> Array:
    return tf.math.logical_or(x1, x2)


def maximum(x1: Array, x2: Array, /) -> Array:
    return tf.math.maximum(x1, x2)


def minimum(x1: Array, x2: Array, /) -> Array:
    return tf.math.minimum(x1, x2)


def where(condition: Array, x1: Any, x2: Any, /) -> Array:
    dtype = next((v.dtype for v in (x1, x2) if isinstance(v, tf.Tensor)), None)
    x1 = tf.convert_to_tensor(x1, dtype=dtype)
    x2 = tf.convert_to_tensor(x2, dtype=dtype)
    return tf.where(condition, x1, x2)


# -- reductions ---------------------------------------------------------------------
def sum(
    x: Array, /, *, axis: Any = None, dtype: Any = None, keepdims: _builtin_bool = False
) -> Array:
    if dtype is not None:
        x = tf.cast(x, dtype)
    return tf.math.reduce_sum(x, axis=_axes(axis), keepdims=keepdims)


def mean(x: Array, /, *, axis: Any = None, keepdims: _builtin_bool = False) -> Array:
    return tf.math.reduce_mean(x, axis=_axes(axis), keepdims=keepdims)


def max(x: Array, /, *, axis: Any = None, keepdims: _builtin_bool = False) -> Array:
    return tf.math.reduce_max(x, axis=_axes(axis), keepdims=keepdims)


def min(x: Array, /, *, axis: Any = None, keepdims: _builtin_bool = False) -> Array:
    return tf.math.reduce_min(x, axis=_axes(axis), keepdims=keepdims)


def all(x: Array, /, *, axis: Any = None, keepdims: _builtin_bool = False) -> Array:
    return tf.math.reduce_all(tf.cast(x, bool), axis=_axes(axis), keepdims=keepdims)


def any(x: Array, /, *, axis: Any = None, keepdims: _builtin_bool = False) -> Array:
    return tf.math.reduce_any(tf.cast(x, bool), axis=_axes(axis), keepdims=keepdims)


# -- linear algebra -------------------------------------------------------------------
def matmul(x1: Array, x2: Array, /) -> Array:
    """Matrix product with the standard's rules for 1-D operands (prepend/append a dim, then drop it)."""
    a = x1[tf.newaxis, :] if x1.shape.rank == 1 else x1
    b = x2[:, tf.newaxis] if x2.shape.rank == 1 else x2
    out = tf.linalg.matmul(a, b)
    if x2.shape.rank == 1:
        out = out[..., 0]
    if x1.shape.rank == 1:
        out = out[..., 0, :] if x2.shape.rank != 1 else out[..., 0]
    return out


def vecdot(x1: Array, x2: Array, /, *, axis: int = -1) -> Array:
    return tf.math.reduce_sum(x1 * x2, axis=axis)


class EighResult(NamedTuple):
    eigenvalues: Array
    eigenvectors: Array


def _solve(x1: Array, x2: Array, /) -> Array:
    if x2.shape.rank == 1:
        return tf.linalg.solve(x1, x2[:, tf.newaxis])[:, 0]
    return tf.linalg.solve(x1, x2)


def _cholesky(x: Array, /, *, upper: _builtin_bool = False) -> Array:
    lower = tf.linalg.cholesky(x)
    return tf.linalg.matrix_transpose(lower) if upper else lower


def _eigh(x: Array, /) -> EighResult:
    values, vectors = tf.linalg.eigh(x)
    return EighResult(values, vectors)


def _vector_norm(
    x: Array, /, *, axis: Any = None, keepdims: _builtin_bool = False, ord: Any = 2
) -> Array:
    a = tf.math.abs(x)
    ax = _axes(axis)
    if ord == 2:
        return tf.math.sqrt(tf.math.reduce_sum(a * a, axis=ax, keepdims=keepdims))
    if ord == 1:
        return tf.math.reduce_sum(a, axis=ax, keepdims=keepdims)
    if ord == math.inf:
        return tf.math.reduce_max(a, axis=ax, keepdims=keepdims)
    if ord == -math.inf:
        return tf.math.reduce_min(a, axis=ax, keepdims=keepdims)
    if ord == 0:
        return tf.math.reduce_sum(tf.cast(a != 0, x.dtype), axis=ax, keepdims=keepdims)
    return tf.math.reduce_sum(a**ord, axis=ax, keepdims=keepdims) ** (1.0 / ord)


linalg = SimpleNamespace(
    solve=_solve,
    cholesky=_cholesky,
    eigh=_eigh,
    vector_norm=_vector_norm,
    matrix_transpose=matrix_transpose,
)


# -- searching and sorting ----------------------------------------------------------
def argsort(
    x: Array, /, *, axis: int = -1, descending: _builtin_bool = False, stable: _builtin_bool = True
) -> Array:
    # TensorFlow's argsort is stable in both directions (ties keep index order).
    return tf.cast(
        tf.argsort(
            x, axis=axis, direction="DESCENDING" if descending else "ASCENDING", stable=True
        ),
        int64,
    )


def sort(
    x: Array, /, *, axis: int = -1, descending: _builtin_bool = False, stable: _builtin_bool = True
) -> Array:
    return tf.sort(x, axis=axis, direction="DESCENDING" if descending else "ASCENDING")


def argmax(x: Array, /, *, axis: int | None = None, keepdims: _builtin_bool = False) -> Array:
    if axis is None:
        out = tf.math.argmax(tf.reshape(x, [-1]), axis=0, output_type=int64)
        return tf.reshape(out, [1] * x.shape.rank) if keepdims else out
    out = tf.math.argmax(x, axis=axis, output_type=int64)
    return tf.expand_dims(out, axis) if keepdims else out


def nonzero(x: Array, /) -> tuple[Array, ...]:
    coords = tf.where(tf.cast(x, bool))
    return tuple(coords[:, i] for i in range(x.shape.rank))


def take(x: Array, indices: Array, /, *, axis: int | None = None) -> Array:
    if axis is None:
        if x.shape.rank != 1:
            raise ValueError("take: axis is required for arrays of rank > 1")
        axis = 0
    return tf.gather(x, indices, axis=axis)


def take_along_axis(x: Array, indices: Array, /, *, axis: int = -1) -> Array:
    rank = x.shape.rank
    axis = axis % rank
    if axis != rank - 1:
        moved = tf.experimental.numpy.moveaxis(x, axis, -1)
        moved_idx = tf.experimental.numpy.moveaxis(indices, axis, -1)
        out = tf.gather(moved, moved_idx, batch_dims=rank - 1)
        return tf.experimental.numpy.moveaxis(out, -1, axis)
    return tf.gather(x, indices, batch_dims=rank - 1)


_KINDS = {
    "bool": lambda d: d == tf.bool,
    "signed integer": lambda d: d.is_integer and not d.is_unsigned,
    "unsigned integer": lambda d: d.is_integer and d.is_unsigned,
    "integral": lambda d: d.is_integer,
    "real floating": lambda d: d.is_floating,
    "complex floating": lambda d: d.is_complex,
    "numeric": lambda d: d.is_integer or d.is_floating or d.is_complex,
}


def isdtype(dtype: Any, kind: Any) -> _builtin_bool:
    """Whether ``dtype`` is of ``kind``: a dtype, a kind name, or a tuple of them."""
    dtype = tf.as_dtype(dtype)
    if isinstance(kind, tuple):
        return _builtin_any(isdtype(dtype, k) for k in kind)
    if isinstance(kind, str):
        return _builtin_bool(_KINDS[kind](dtype))
    return dtype == tf.as_dtype(kind)


def astype(x: Array, dtype: Any, /, *, copy: _builtin_bool = True, device: Any = None) -> Array:
    return tf.cast(x, dtype)


#: The namespace is this module, as with ``array_api_strict``.
namespace = sys.modules[__name__]
