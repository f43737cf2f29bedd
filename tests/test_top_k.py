"""``top_k``, written once over the namespace, is a prefix of the standard's stable argsort in every framework."""

from __future__ import annotations

import array_api_strict as xps
import numpy as np
import pytest
import tensorflow as tf
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

import influence_core
from influence_core.arrays import top_k

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("ci")

NATIVE = {
    "numpy": (np.asarray, np.asarray),
    "torch": (torch.as_tensor, lambda t: t.numpy()),
    "tensorflow": (tf.constant, lambda t: t.numpy()),
}


@pytest.mark.parametrize("name", list(NATIVE))
@pytest.mark.parametrize("largest", [True, False])
def test_top_k_matches_stable_sort(name: str, largest: bool) -> None:
    to_native, to_numpy = NATIVE[name]
    xp = influence_core.array_namespace(to_native(np.zeros(1)))

    @given(
        arrays(
            np.float64,
            array_shapes(min_dims=1, max_dims=2, max_side=6),
            elements=st.integers(-3, 3).map(float),  # many ties
        ),
        st.data(),
    )
    def check(x: np.ndarray, data: st.DataObject) -> None:
        axis = data.draw(st.sampled_from(list(range(x.ndim))))
        k = data.draw(st.integers(1, x.shape[axis] + 2))  # k beyond the axis: the whole sort
        order = np.asarray(xps.argsort(xps.asarray(x), axis=axis, descending=largest, stable=True))
        expected = np.take(order, np.arange(min(k, x.shape[axis])), axis=axis)
        values, idx = top_k(xp, to_native(x), k, axis=axis, largest=largest)
        np.testing.assert_array_equal(to_numpy(idx), expected)
        np.testing.assert_array_equal(to_numpy(values), np.take_along_axis(x, expected, axis=axis))

    check()


def test_array_namespace_dispatches_on_array_type() -> None:
    assert influence_core.array_namespace(np.ones(2)).__name__ == "array_api_compat.numpy"
    assert influence_core.array_namespace(torch.ones(2)).__name__ == "array_api_compat.torch"
    assert influence_core.array_namespace(tf.ones(2)).__name__ == "influence_tensorflow.namespace"
    with pytest.raises(influence_core.BackendNotFoundError, match="installed backends"):
        influence_core.array_namespace([1, 2])
