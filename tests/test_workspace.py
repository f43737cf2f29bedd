"""The buffer the layer-wise solvers write each batch's (b, p, o) products into."""

from __future__ import annotations

import gc
import threading
import weakref

import numpy as np
import pytest
import torch

from influence_core import InfluenceModel
from influence_core.plugin import UnsupportedByBackendError
from influence_core.workspace import Workspace, shared_workspace


def tiny_model(backend: str = "torch") -> InfluenceModel:
    if backend == "torch":
        net = torch.nn.Linear(3, 2).double()
        return InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"))
    import keras

    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    return InfluenceModel(net, loss)


def test_products_are_written_into_one_buffer_that_grows_to_the_largest() -> None:
    workspace = Workspace(tiny_model())
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 5, 6)), rng.normal(size=(4, 6, 7))
    first = workspace.matmul(torch.from_numpy(a), torch.from_numpy(b))
    np.testing.assert_allclose(first.numpy(), a @ b, rtol=1e-13)
    address = workspace._buffer.data_ptr()
    small = workspace.matmul(torch.from_numpy(a[:2]), torch.from_numpy(b[:2]))
    np.testing.assert_allclose(small.numpy(), a[:2] @ b[:2], rtol=1e-13)
    assert workspace._buffer.data_ptr() == address  # reused: no fresh pages
    assert small.data_ptr() == address
    c = rng.normal(size=(4, 5, 7))
    big = workspace.matmul(torch.from_numpy(a).transpose(1, 2), torch.from_numpy(c))  # a view
    np.testing.assert_allclose(big.numpy(), a.transpose(0, 2, 1) @ c, rtol=1e-13)
    assert int(workspace._buffer.shape[0]) == 4 * 6 * 7  # grown to the largest
    # x2 with more leading axes than x1 broadcasts them: a plain product, the buffer untouched
    spread = workspace.matmul(torch.from_numpy(a[0]), torch.from_numpy(b))
    np.testing.assert_allclose(spread.numpy(), a[0] @ b, rtol=1e-13)
    assert spread.data_ptr() != workspace._buffer.data_ptr()
    single = workspace.matmul(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    assert single.dtype == torch.float32 and workspace._buffer.dtype == torch.float32
    np.testing.assert_allclose(single.numpy(), a @ b, rtol=1e-5)  # a new buffer, not a cast


def test_without_writeable_arrays_or_matmul_into_it_is_plain_matmul(monkeypatch) -> None:
    pytest.importorskip("tensorflow")
    import tensorflow as tf

    keras_model = tiny_model("keras")
    workspace = Workspace(keras_model)
    a, b = np.ones((2, 3, 4)), np.ones((2, 4, 5))
    got = workspace.matmul(tf.constant(a), tf.constant(b))
    np.testing.assert_allclose(got.numpy(), a @ b)
    assert workspace._writes is False and workspace._buffer is None

    model = tiny_model()

    def refused(*_):
        raise UnsupportedByBackendError("no matmul_into")

    monkeypatch.setattr(type(model.kernels), "matmul_into", refused)
    workspace = Workspace(model)
    got = workspace.matmul(torch.ones(2, 3, 4), torch.ones(2, 4, 5))
    assert torch.equal(got, torch.full((2, 3, 5), 4.0)) and workspace._writes is False


def test_a_pass_shares_one_workspace_freed_with_its_last_side_and_threads_never_share() -> None:
    model, owner = tiny_model(), object.__new__(type("Solver", (), {}))
    first = shared_workspace(owner, model)
    assert shared_workspace(owner, model) is first  # while a side holds it: the same
    other = []
    thread = threading.Thread(target=lambda: other.append(shared_workspace(owner, model)))
    thread.start()
    thread.join()
    assert other[0] is not first  # another thread's pass: its own buffer
    held = weakref.ref(first)
    del first
    gc.collect()
    assert held() is None  # the solver does not keep it: it went with the sides holding it
    assert shared_workspace(owner, model)._buffer is None  # the next pass starts afresh
