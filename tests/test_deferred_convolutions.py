"""Convolutions scored against one test point without their patches, in torch, Keras and flax.nnx.

Each framework's ``layer_statistics_deferred`` gives a convolution's input in
place of its patches; ``conv2d_patches`` must rebuild the patches from it and
``conv2d_map`` must equal patches @ K, at padded, strided and dilated
geometries (the conformance suite's reference convnet is "valid" and stride
1). EK-FAC's first-order scores against one test point, which take that route,
must equal solve(g_test)ᵀ g_train with no patches formed while scoring; two
test points take G from the patches, and must equal it too.
"""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from influence_core import EKFACIHVP, FirstOrderInfluenceCalculator, InfluenceModel  # noqa: E402

#: (kernel, stride, dilation, padding) per framework: padding on one side only where it can.
GEOMETRIES = {
    "padded, strided": ((3, 3), (2, 2), (1, 1), "same"),
    "dilated, unpadded": ((3, 2), (1, 1), (2, 1), "valid"),
}


def torch_net(kernel, stride, dilation, padding) -> torch.nn.Module:
    torch.manual_seed(0)
    pad = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
    conv = torch.nn.Conv2d(
        2, 4, kernel, stride=stride, dilation=dilation, padding=pad if padding == "same" else 0
    )
    width = conv(torch.zeros(1, 2, 7, 6)).numel()
    return torch.nn.Sequential(
        conv, torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(width, 3)
    ).double()


def keras_net(kernel, stride, dilation, padding) -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((7, 6, 2), dtype="float64")
    x = keras.layers.Conv2D(
        4,
        kernel,
        strides=stride,
        dilation_rate=dilation,
        padding=padding,
        activation="tanh",
        dtype="float64",
    )(inputs)
    x = keras.layers.Flatten(dtype="float64")(x)
    return keras.Model(inputs, keras.layers.Dense(3, dtype="float64")(x))


class NnxNet(nnx.Module):
    def __init__(self, kernel, stride, dilation, padding) -> None:
        kwargs = {"param_dtype": jax.numpy.float64, "dtype": jax.numpy.float64}
        rngs = nnx.Rngs(0)
        self.conv = nnx.Conv(
            2,
            4,
            kernel,
            strides=stride,
            kernel_dilation=dilation,
            padding=padding.upper(),
            rngs=rngs,
            **kwargs,
        )
        width = self.conv(jax.numpy.zeros((1, 7, 6, 2))).size
        self.head = nnx.Linear(width, 3, rngs=rngs, **kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.numpy.tanh(self.conv(x))
        return self.head(x.reshape(x.shape[0], -1))


def nnx_loss(logits, y):
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def case(framework: str, geometry: str) -> tuple[InfluenceModel, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 9)
    if framework == "torch":
        net = torch_net(*GEOMETRIES[geometry])
        X = rng.standard_normal((9, 2, 7, 6))
        return InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none")), (X, y)
    X = rng.standard_normal((9, 7, 6, 2))
    if framework == "tensorflow":
        loss = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=None, dtype="float64"
        )
        return InfluenceModel(keras_net(*GEOMETRIES[geometry]), loss), (X, y)
    return InfluenceModel(NnxNet(*GEOMETRIES[geometry]), nnx_loss), (X, y)


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("framework", ["torch", "tensorflow", "jax"])
def test_the_deferred_input_gives_the_patches_and_their_map(framework, geometry) -> None:
    model, (X, y) = case(framework, geometry)
    kernels = model.kernels
    X, y = kernels.as_native(X), kernels.as_native(y)
    plain, deferred = kernels.layer_statistics(X, y), kernels.layer_statistics_deferred(X, y)
    (layer,) = [layer for layer in kernels.layers() if layer.kind == "conv2d"]
    a = model.to_numpy(plain[layer.name][0])
    x, g = deferred[layer.name]
    np.testing.assert_array_equal(model.to_numpy(g), model.to_numpy(plain[layer.name][1]))
    np.testing.assert_allclose(model.to_numpy(kernels.conv2d_patches(layer, x)), a, atol=1e-14)
    K = np.random.default_rng(2).standard_normal((layer.inputs, 5))
    mapped = model.to_numpy(kernels.conv2d_map(layer, x, kernels.as_native(K, floating=True)))
    np.testing.assert_allclose(mapped, a @ K, atol=1e-12 * np.abs(a @ K).max())


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("framework", ["torch", "tensorflow", "jax"])
def test_one_or_two_test_points_scores_equal_the_solved_gradients(framework, geometry, n) -> None:
    model, train = case(framework, geometry)
    calculator = FirstOrderInfluenceCalculator(model, EKFACIHVP(damping=1e-2, fisher="empirical"))
    calculator = calculator.fit(train)
    formed = []
    patches = model.kernels.conv2d_patches
    model.kernels.conv2d_patches = lambda layer, x: formed.append(layer.name) or patches(layer, x)
    test = (train[0][:n], train[1][:n])
    got = model.to_numpy(calculator.influence(test))
    assert (formed == []) == (n == 1)  # one test point through conv2d_map, two through G
    flat = model.to_numpy(model.per_sample_grads(train))
    g_test = model.to_numpy(model.per_sample_grads(test))
    solved = model.to_numpy(calculator.ihvp.solve(model.kernels.as_native(g_test.T)))
    expected = solved.T @ flat.T
    np.testing.assert_allclose(got, expected, atol=1e-10 * np.abs(expected).max())
