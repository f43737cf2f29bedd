"""The TensorFlow array namespace against array-api-strict, on random inputs (float32 and float64)."""

from __future__ import annotations

import math

import array_api_strict as xps
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from influence_tensorflow import namespace as tfx

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("ci")

FLOATS = {"float32": np.float32, "float64": np.float64}
RTOL = {"float32": 1e-5, "float64": 1e-12}
dtypes = pytest.mark.parametrize("dtype", list(FLOATS))


def float_arrays(
    dtype: str,
    *,
    min_dims: int = 1,
    max_dims: int = 3,
    lo: float = -10,
    hi: float = 10,
    integral: bool = False,
) -> st.SearchStrategy[np.ndarray]:
    elements = (
        st.integers(-3, 3).map(float)
        if integral
        else st.floats(lo, hi, width=32, allow_nan=False, allow_subnormal=False)
    )
    return arrays(
        FLOATS[dtype],
        array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=1, max_side=5),
        elements=elements,
    )


def same(tf_result: object, strict_result: object, dtype: str = "float64") -> None:
    actual = tf_result.numpy() if hasattr(tf_result, "numpy") else np.asarray(tf_result)
    expected = np.asarray(strict_result)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.dtype == bool or np.issubdtype(expected.dtype, np.integer):
        np.testing.assert_array_equal(actual, expected)
    else:
        assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
        np.testing.assert_allclose(actual, expected, rtol=RTOL[dtype], atol=RTOL[dtype])


def both(x: np.ndarray) -> tuple[tf.Tensor, object]:
    return tf.constant(x), xps.asarray(x)


@dtypes
@pytest.mark.parametrize(
    "name", ["abs", "sqrt", "exp", "expm1", "log", "square", "isfinite", "isnan"]
)
def test_elementwise(dtype: str, name: str) -> None:
    lo, hi = {"sqrt": (0, 10), "log": (0.125, 10), "exp": (-5, 5), "expm1": (-5, 5)}.get(
        name, (-10, 10)
    )

    @given(float_arrays(dtype, lo=lo, hi=hi))
    def check(x: np.ndarray) -> None:
        t, s = both(x)
        same(getattr(tfx, name)(t), getattr(xps, name)(s), dtype)

    check()


@dtypes
@pytest.mark.parametrize("name", ["sum", "mean", "max", "min"])
@pytest.mark.parametrize("keepdims", [False, True])
def test_reductions(dtype: str, name: str, keepdims: bool) -> None:
    @given(float_arrays(dtype), st.data())
    def check(x: np.ndarray, data: st.DataObject) -> None:
        axis = data.draw(st.sampled_from([None, 0, -1, tuple(range(x.ndim))]))
        t, s = both(x)
        same(
            getattr(tfx, name)(t, axis=axis, keepdims=keepdims),
            getattr(xps, name)(s, axis=axis, keepdims=keepdims),
            dtype,
        )

    check()


@pytest.mark.parametrize("name", ["all", "any"])
@given(arrays(np.bool_, array_shapes(min_dims=1, max_dims=3, max_side=4)))
def test_logical_reductions(name: str, x: np.ndarray) -> None:
    t, s = both(x)
    same(getattr(tfx, name)(t, axis=0), getattr(xps, name)(s, axis=0))
    same(getattr(tfx, name)(t), getattr(xps, name)(s))
    same(tfx.logical_not(t), xps.logical_not(s))
    same(tfx.logical_and(t, tfx.logical_not(t)), xps.logical_and(s, xps.logical_not(s)))
    same(tfx.logical_or(t, tfx.logical_not(t)), xps.logical_or(s, xps.logical_not(s)))
    same(tfx.ones_like(tf.cast(t, tf.float64)), xps.ones_like(xps.astype(s, xps.float64)))


@dtypes
def test_matmul_and_vecdot(dtype: str) -> None:
    @given(st.integers(1, 5), st.integers(1, 5), st.integers(1, 5), st.integers(0, 2**31 - 1))
    def check(m: int, k: int, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        a, b = rng.normal(size=(m, k)).astype(dtype), rng.normal(size=(k, n)).astype(dtype)
        v, w = rng.normal(size=k).astype(dtype), rng.normal(size=k).astype(dtype)
        same(
            tfx.matmul(tf.constant(a), tf.constant(b)),
            xps.matmul(xps.asarray(a), xps.asarray(b)),
            dtype,
        )
        same(
            tfx.matmul(tf.constant(a), tf.constant(v)),
            xps.matmul(xps.asarray(a), xps.asarray(v)),
            dtype,
        )
        same(
            tfx.matmul(tf.constant(v), tf.constant(b)),
            xps.matmul(xps.asarray(v), xps.asarray(b)),
            dtype,
        )
        same(
            tfx.matmul(tf.constant(v), tf.constant(w)),
            xps.matmul(xps.asarray(v), xps.asarray(w)),
            dtype,
        )
        c = rng.normal(size=(m, k)).astype(dtype)
        same(
            tfx.vecdot(tf.constant(a), tf.constant(c), axis=-1),
            xps.vecdot(xps.asarray(a), xps.asarray(c), axis=-1),
            dtype,
        )

    check()


@dtypes
def test_manipulation(dtype: str) -> None:
    @given(float_arrays(dtype, min_dims=2, max_dims=3))
    def check(x: np.ndarray) -> None:
        t, s = both(x)
        same(tfx.concat([t, t], axis=1), xps.concat([s, s], axis=1), dtype)
        same(tfx.concat([t, t], axis=None), xps.concat([s, s], axis=None), dtype)
        same(tfx.stack([t, t], axis=-1), xps.stack([s, s], axis=-1), dtype)
        same(tfx.reshape(t, (-1,)), xps.reshape(s, (-1,)), dtype)
        same(tfx.expand_dims(t, axis=1), xps.expand_dims(s, axis=1), dtype)
        same(
            tfx.squeeze(tfx.expand_dims(t, axis=0), axis=0),
            xps.squeeze(xps.expand_dims(s, axis=0), axis=0),
            dtype,
        )
        axes = tuple(reversed(range(x.ndim)))
        same(tfx.permute_dims(t, axes), xps.permute_dims(s, axes), dtype)
        same(tfx.matrix_transpose(t), xps.matrix_transpose(s), dtype)
        same(tfx.astype(t, tfx.float64), xps.astype(s, xps.float64), "float64")
        same(tfx.where(t > 0, t, tfx.zeros_like(t)), xps.where(s > 0, s, xps.zeros_like(s)), dtype)
        same(tfx.maximum(t, -t), xps.maximum(s, -s), dtype)
        same(tfx.minimum(t, -t), xps.minimum(s, -s), dtype)

    check()


@dtypes
@pytest.mark.parametrize("descending", [False, True])
def test_sorting_is_stable_with_ties(dtype: str, descending: bool) -> None:
    @given(float_arrays(dtype, integral=True))
    def check(x: np.ndarray) -> None:
        t, s = both(x)
        same(
            tfx.argsort(t, axis=-1, descending=descending),
            xps.argsort(s, axis=-1, descending=descending),
        )
        same(
            tfx.sort(t, axis=0, descending=descending),
            xps.sort(s, axis=0, descending=descending),
            dtype,
        )
        same(tfx.argmax(t, axis=-1), xps.argmax(s, axis=-1))
        same(tfx.argmax(t), xps.argmax(s))
        order = xps.argsort(s, axis=0, descending=descending)
        same(
            tfx.take_along_axis(t, tf.constant(np.asarray(order)), axis=0),
            xps.take_along_axis(s, order, axis=0),
            dtype,
        )

    check()


@given(arrays(np.bool_, array_shapes(min_dims=1, max_dims=3, max_side=4)))
def test_nonzero_and_take(x: np.ndarray) -> None:
    t, s = both(x)
    for a, b in zip(tfx.nonzero(t), xps.nonzero(s), strict=True):
        same(a, b)
    flat = np.arange(x.size, dtype=np.float64)
    idx = np.asarray(xps.nonzero(xps.asarray(x.reshape(-1))))[0]
    same(
        tfx.take(tf.constant(flat), tf.constant(idx)), xps.take(xps.asarray(flat), xps.asarray(idx))
    )


def spd(n: int, seed: int, dtype: str) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(n, n))
    return (a @ a.T + n * np.eye(n)).astype(dtype)


@dtypes
def test_linalg(dtype: str) -> None:
    @given(st.integers(1, 6), st.integers(0, 2**31 - 1))
    def check(n: int, seed: int) -> None:
        a = spd(n, seed, dtype)
        rhs = np.random.default_rng(seed + 1).normal(size=(n, 3)).astype(dtype)
        t, s = both(a)
        same(tfx.linalg.solve(t, tf.constant(rhs)), xps.linalg.solve(s, xps.asarray(rhs)), dtype)
        same(
            tfx.linalg.solve(t, tf.constant(rhs[:, 0])),
            xps.linalg.solve(s, xps.asarray(rhs[:, 0])),
            dtype,
        )
        same(tfx.linalg.cholesky(t), xps.linalg.cholesky(s), dtype)
        same(tfx.linalg.cholesky(t, upper=True), xps.linalg.cholesky(s, upper=True), dtype)
        values, vectors = tfx.linalg.eigh(t)
        expected = xps.linalg.eigh(s)
        same(values, expected.eigenvalues, dtype)
        v = vectors.numpy()  # eigenvectors are unique up to sign: compare the reconstruction
        same(tf.constant(v @ np.diag(values.numpy()) @ v.T), a, dtype)

    check()


@dtypes
@pytest.mark.parametrize("ord", [2, 1, math.inf, -math.inf, 3])
def test_vector_norm(dtype: str, ord: float) -> None:
    @given(float_arrays(dtype), st.data())
    def check(x: np.ndarray, data: st.DataObject) -> None:
        axis = data.draw(st.sampled_from([None, 0, -1]))
        t, s = both(x)
        same(
            tfx.linalg.vector_norm(t, axis=axis, ord=ord),
            xps.linalg.vector_norm(s, axis=axis, ord=ord),
            dtype,
        )

    check()


@dtypes
def test_creation(dtype: str) -> None:
    d = getattr(tfx, dtype)
    sd = getattr(xps, dtype)
    same(tfx.zeros((2, 3), dtype=d), xps.zeros((2, 3), dtype=sd), dtype)
    same(tfx.ones((4,), dtype=d), xps.ones((4,), dtype=sd), dtype)
    same(tfx.full((2, 2), 1.5, dtype=d), xps.full((2, 2), 1.5, dtype=sd), dtype)
    base = np.arange(6.0).reshape(2, 3)
    t, s = tfx.asarray(base, dtype=d), xps.asarray(base, dtype=sd)
    same(tfx.full_like(t, 2.5), xps.full_like(s, 2.5), dtype)
    for k in (-1, 0, 2):
        same(tfx.eye(3, 4, k=k, dtype=d), xps.eye(3, 4, k=k, dtype=sd), dtype)
    same(tfx.arange(5), xps.arange(5))
    same(tfx.arange(1.0, 2.0, 0.25, dtype=d), xps.arange(1.0, 2.0, 0.25, dtype=sd), dtype)
    same(tfx.asarray(np.ones(3), dtype=d), xps.asarray(np.ones(3), dtype=sd), dtype)


@pytest.mark.parametrize("dtype", ["bool", "int32", "int64", "uint8", "float32", "float64"])
@pytest.mark.parametrize(
    "kind",
    [
        "bool",
        "signed integer",
        "unsigned integer",
        "integral",
        "real floating",
        "numeric",
        ("integral", "real floating"),
    ],
)
def test_isdtype(dtype: str, kind: object) -> None:
    assert tfx.isdtype(getattr(tf, dtype), kind) == xps.isdtype(getattr(xps, dtype), kind)
    assert tfx.isdtype(getattr(tf, dtype), getattr(tf, dtype))
