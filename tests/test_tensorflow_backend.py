"""TensorFlow specifics: plain tf.Modules, unused variables, dataset batching, tracing."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from influence_backends.tensorflow.data import is_batched
from influence_conformance import SPECS
from influence_conformance.cases import assert_close, build_case, to_numpy
from influence_core import InfluenceModel


class TwoLayerModule(tf.Module):
    """The mlp_tanh reference model as a plain tf.Module, plus a variable the loss never uses."""

    def __init__(self, weights: list[np.ndarray]) -> None:
        super().__init__(name="plain")
        self.hidden_kernel = tf.Variable(weights[0])
        self.hidden_bias = tf.Variable(weights[1])
        self.out_kernel = tf.Variable(weights[2])
        self.out_bias = tf.Variable(weights[3])
        self.unused = tf.Variable(np.ones(2))

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        h = tf.tanh(x @ self.hidden_kernel + self.hidden_bias)
        return h @ self.out_kernel + self.out_bias


def cross_entropy(y_true: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y_true, logits=logits)


def test_plain_tf_module_matches_the_keras_model_and_zero_fills_unused_variables() -> None:
    keras_case = build_case("tensorflow", "mlp_tanh", "float64")
    module = TwoLayerModule(keras_case.weights)
    im = InfluenceModel(module, cross_entropy, batch_size=4)
    assert im.backend == "tensorflow"
    assert im.parameter_names == (
        "hidden_bias",
        "hidden_kernel",
        "out_bias",
        "out_kernel",
        "unused",
    )
    selected = InfluenceModel(module, cross_entropy, parameters=["out_kernel", "out_bias"])
    assert selected.num_parameters == 8 * 3 + 3

    # tf.Module orders variables by attribute name; map to the canonical (Keras) order.
    names = dict(zip(im.parameter_names, im.kernels.parameter_shapes, strict=True))
    sizes = {n: int(np.prod(s)) for n, s in names.items()}
    offsets = np.cumsum([0] + [sizes[n] for n in im.parameter_names])
    start = dict(zip(im.parameter_names, offsets, strict=False))
    canonical = np.concatenate(
        [
            np.arange(start[n], start[n] + sizes[n])
            for n in ("hidden_kernel", "hidden_bias", "out_kernel", "out_bias")
        ]
    )
    unused = np.arange(start["unused"], start["unused"] + 2)

    data = keras_case.data
    grads = to_numpy(im.per_sample_grads(data))
    assert_close(
        grads[:, canonical], to_numpy(keras_case.model.per_sample_grads(data)), 1e-12, "grads"
    )
    assert np.all(grads[:, unused] == 0)
    assert np.all(to_numpy(im.loss_grad(data))[unused] == 0)
    V = np.random.default_rng(0).normal(size=(im.num_parameters, 2))
    hv = to_numpy(im.hvp(data, V))
    assert np.all(hv[unused] == 0)
    V_keras = V[canonical]
    assert_close(hv[canonical], to_numpy(keras_case.model.hvp(data, V_keras)), 1e-12, "HVP")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda ds: ds, False),
        (lambda ds: ds.batch(4), True),
        (lambda ds: ds.batch(4, drop_remainder=True), True),
        (lambda ds: ds.batch(4).prefetch(2), True),
        (lambda ds: ds.map(lambda x, y: (x * 2, y)), False),
    ],
)
def test_batched_datasets_are_recognised(make, expected: bool) -> None:
    ds = tf.data.Dataset.from_tensor_slices((np.zeros((10, 3)), np.zeros(10)))
    assert is_batched(make(ds)) is expected


def test_each_kernel_traces_at_most_twice_over_many_batch_sizes() -> None:
    case = build_case("tensorflow", "logistic_regression", "float64")
    fresh = InfluenceModel(case.reference.model, case.reference.loss_fn, backend="tensorflow")
    for batch_size in (13, 5, 4, 3):
        fresh.loss_grad(case.data, batch_size=batch_size)
        fresh.hvp(
            case.data, np.ones(SPECS["logistic_regression"].num_parameters), batch_size=batch_size
        )
        for _, _ in fresh.iter_per_sample_grads(case.data, batch_size=batch_size):
            pass
    k = fresh.kernels
    for fn in (k._grad_fn, k._hvp_fn, k._per_sample_grads_fn):
        assert fn.experimental_get_tracing_count() <= 2
