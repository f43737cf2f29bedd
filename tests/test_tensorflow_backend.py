"""TensorFlow specifics: plain tf.Modules, unused variables, dataset batching, tracing."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from influence_conformance import SPECS
from influence_conformance.cases import assert_close, build_case, to_numpy
from influence_core import InfluenceModel
from influence_tensorflow.data import is_batched


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
    names = dict(zip(im.parameter_names, im.layout.shapes, strict=True))
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


def test_traces_are_bounded_and_exact_shapes_reused() -> None:
    case = build_case("tensorflow", "logistic_regression", "float64")
    fresh = InfluenceModel(case.reference.model, case.reference.loss_fn, backend="tensorflow")
    d = SPECS["logistic_regression"].num_parameters
    k = fresh.kernels
    # Batch sizes 13, 4, 5, 6, 7 cut 13 samples into eight distinct batch shapes; twice over.
    for _ in range(2):
        for batch_size in (13, 4, 5, 6, 7):
            fresh.loss_grad(case.data, batch_size=batch_size)
            fresh.hvp(case.data, np.ones(d), batch_size=batch_size)
            for _, _ in fresh.iter_per_sample_grads(case.data, batch_size=batch_size):
                pass
    # With check_finite (the default) per-sample gradients come with their finiteness flag.
    for fn in (k._grad_fn, k._hvp_fn, k._per_sample_grads_and_finite_fn):
        assert 1 <= fn.tracing_count() <= 5  # four exact shapes + one relaxed
    before_hvp, before_grad = k._hvp_fn.tracing_count(), k._grad_fn.tracing_count()
    fresh.hvp(case.data, np.ones((d, 3)), batch_size=13)  # a new shape: the relaxed trace
    fresh.loss_grad(case.data, batch_size=13)  # a known shape: its exact trace
    assert k._hvp_fn.tracing_count() == before_hvp
    assert k._grad_fn.tracing_count() == before_grad


def test_keras_2_models_match_keras_3() -> None:
    """tf_keras (Keras 2) models are tf.Modules named by their variables' scoped names."""
    import tf_keras

    case = build_case("tensorflow", "mlp_tanh", "float64")
    model = tf_keras.Sequential(
        [
            tf_keras.layers.Dense(
                8, activation="tanh", input_shape=(4,), dtype="float64", name="hidden"
            ),
            tf_keras.layers.Dense(3, dtype="float64", name="out"),
        ]
    )
    model.set_weights(case.weights)
    loss = tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    im = InfluenceModel(model, loss, batch_size=4)
    assert im.parameter_names == ("hidden/kernel", "hidden/bias", "out/kernel", "out/bias")
    data = case.data
    assert_close(
        im.per_sample_grads(data), to_numpy(case.model.per_sample_grads(data)), 1e-12, "grads"
    )
    V = np.random.default_rng(0).normal(size=(im.num_parameters, 2))
    assert_close(im.hvp(data, V), to_numpy(case.model.hvp(data, V)), 1e-12, "HVP")
    assert InfluenceModel(model, loss, parameters=["out"]).num_parameters == 27
