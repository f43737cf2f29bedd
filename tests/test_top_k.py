"""``top_k`` of every namespace adapter is a prefix of the standard's stable argsort."""

from __future__ import annotations

import array_api_strict as xps
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

import influence_core
from influence_core.namespace import numpy_namespace

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("ci")

NAMESPACES = {
    "numpy": (numpy_namespace, np.asarray, np.asarray),
    "torch": (
        lambda: influence_core.array_namespace(torch.zeros(1)),
        torch.as_tensor,
        lambda t: t.numpy(),
    ),
}


@pytest.mark.parametrize("name", list(NAMESPACES))
@pytest.mark.parametrize("largest", [True, False])
def test_top_k_matches_stable_sort(name: str, largest: bool) -> None:
    get_namespace, to_native, to_numpy = NAMESPACES[name]
    xp = get_namespace()

    @given(
        arrays(
            np.float64,
            array_shapes(min_dims=1, max_dims=2, max_side=6),
            elements=st.integers(-3, 3).map(float),
        ),
        st.data(),
    )
    def check(x: np.ndarray, data: st.DataObject) -> None:
        axis = data.draw(st.sampled_from(list(range(x.ndim))))
        k = data.draw(st.integers(1, x.shape[axis]))
        order = np.asarray(xps.argsort(xps.asarray(x), axis=axis, descending=largest, stable=True))
        expected = np.take(order, np.arange(k), axis=axis)
        values, idx = xp.top_k(to_native(x), k, axis=axis, largest=largest)
        np.testing.assert_array_equal(to_numpy(idx), expected)
        np.testing.assert_array_equal(to_numpy(values), np.take_along_axis(x, expected, axis=axis))

    check()


def test_array_namespace_dispatches_on_array_type() -> None:
    import tensorflow as tf

    assert influence_core.array_namespace(np.ones(2)).__name__ == "numpy"
    assert influence_core.array_namespace(torch.ones(2)).__name__ == "torch"
    assert hasattr(influence_core.array_namespace(tf.ones(2)), "top_k")
    with pytest.raises(influence_core.BackendNotFoundError, match="installed backends"):
        influence_core.array_namespace([1, 2])
