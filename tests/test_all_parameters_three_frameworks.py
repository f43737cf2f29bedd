"""Keras 3 and flax.nnx on all parameters (issue 25): a transformer block and a CNN with BatchNorm.

The transformer block (token and positional embeddings, multi-head attention
whose query/key/value/output projections (Keras ``EinsumDense``, nnx
``LinearGeneral``) are dense layers over positions, a LayerNorm and a dense
head) is covered parameter for parameter in each framework, its statistics
rebuild its per-sample gradients, and the same block in torch, Keras and
flax.nnx with the same weights gives the same EK-FAC, K-FAC and TracIn
scores to 1e-8 in float64.
"""

from __future__ import annotations

import importlib

import jax

jax.config.update("jax_enable_x64", True)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from flax.nnx.nn.attention import dot_product_attention_weights  # noqa: E402

from influence_core import (  # noqa: E402
    EKFACIHVP,
    KFACIHVP,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
    TracIn,
)
from influence_core.layerwise import coverage, per_sample_grads_from_layers  # noqa: E402

VOCAB, T, D, HEADS, CLASSES = 13, 5, 8, 2, 3


class KerasBlock(keras.Model):
    def __init__(self) -> None:
        super().__init__()
        kwargs = {"dtype": "float64"}
        self.tokens = keras.layers.Embedding(VOCAB, D, **kwargs)
        self.positions = keras.layers.Embedding(T, D, **kwargs)
        self.attention = keras.layers.MultiHeadAttention(HEADS, D // HEADS, **kwargs)
        self.norm = keras.layers.LayerNormalization(epsilon=1e-5, **kwargs)
        self.head = keras.layers.Dense(CLASSES, **kwargs)

    def call(self, ids):
        x = self.tokens(ids) + self.positions(keras.ops.arange(T)[None])
        x = self.norm(x + self.attention(x, x))
        return self.head(keras.ops.mean(x, axis=1))


class TorchBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(VOCAB, D)
        self.positions = torch.nn.Embedding(T, D)
        self.query, self.key, self.value, self.out = (torch.nn.Linear(D, D) for _ in range(4))
        self.norm = torch.nn.LayerNorm(D, eps=1e-5)
        self.head = torch.nn.Linear(D, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions(torch.arange(T)[None])
        b = x.shape[0]

        def heads(layer: torch.nn.Linear) -> torch.Tensor:
            return layer(x).reshape(b, T, HEADS, D // HEADS).transpose(1, 2)

        q, k, v = heads(self.query), heads(self.key), heads(self.value)
        weights = torch.softmax(q @ k.transpose(2, 3) / (D // HEADS) ** 0.5, dim=-1)
        attended = (weights @ v).transpose(1, 2).reshape(b, T, D)
        x = self.norm(x + self.out(attended))
        return self.head(x.mean(dim=1))


def float64_attention(query: jax.Array, key: jax.Array, value: jax.Array, **_: object) -> jax.Array:
    """nnx's attention without jax.nn.dot_product_attention, which takes its softmax in float32."""
    weights = dot_product_attention_weights(query, key)
    return jax.numpy.einsum("...hqk,...khd->...qhd", weights, value)


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        kwargs = {"param_dtype": jax.numpy.float64, "dtype": jax.numpy.float64, "rngs": rngs}
        self.tokens = nnx.Embed(VOCAB, D, **kwargs)
        self.positions = nnx.Embed(T, D, **kwargs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=HEADS,
            in_features=D,
            qkv_features=D,
            out_features=D,
            decode=False,
            attention_fn=float64_attention,
            **kwargs,
        )
        self.norm = nnx.LayerNorm(D, epsilon=1e-5, use_fast_variance=False, **kwargs)
        self.head = nnx.Linear(D, CLASSES, **kwargs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        x = self.tokens(ids) + self.positions(jax.numpy.arange(T)[None])
        x = self.norm(x + self.attention(x))
        return self.head(x.mean(axis=1))


def nnx_twin(twin: torch.nn.Module) -> NnxBlock:
    """The nnx block with the torch block's weights."""
    net = NnxBlock(nnx.Rngs(0))

    def host(parameter: torch.nn.Parameter) -> np.ndarray:
        return parameter.detach().numpy()

    net.tokens.embedding[...] = host(twin.tokens.weight)
    net.positions.embedding[...] = host(twin.positions.weight)
    for name in ("query", "key", "value"):
        dense = getattr(net.attention, name)
        dense.kernel[...] = host(getattr(twin, name).weight).T.reshape(D, HEADS, D // HEADS)
        dense.bias[...] = host(getattr(twin, name).bias).reshape(HEADS, D // HEADS)
    net.attention.out.kernel[...] = host(twin.out.weight).T.reshape(HEADS, D // HEADS, D)
    net.attention.out.bias[...] = host(twin.out.bias)
    net.norm.scale[...] = host(twin.norm.weight)
    net.norm.bias[...] = host(twin.norm.bias)
    net.head.kernel[...] = host(twin.head.weight).T
    net.head.bias[...] = host(twin.head.bias)
    return net


def nnx_loss(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    logits = outputs - jax.scipy.special.logsumexp(outputs, axis=1, keepdims=True)
    return -jax.numpy.take_along_axis(logits, targets[:, None], axis=1)[:, 0]


def keras_block() -> keras.Model:
    keras.utils.set_random_seed(0)
    net = KerasBlock()
    net(np.zeros((1, T), dtype=np.int64))
    rng = np.random.default_rng(1)  # LayerNorm away from the identity
    net.norm.gamma.assign(rng.uniform(0.5, 1.5, D))
    net.norm.beta.assign(rng.uniform(-0.5, 0.5, D))
    return net


def torch_twin(net: keras.Model) -> torch.nn.Module:
    """The torch block with the Keras block's weights."""
    twin = TorchBlock().double().eval()

    def put(parameter: torch.nn.Parameter, value: np.ndarray) -> None:
        with torch.no_grad():
            parameter.copy_(torch.as_tensor(np.asarray(value, np.float64)))

    put(twin.tokens.weight, net.tokens.embeddings.numpy())
    put(twin.positions.weight, net.positions.embeddings.numpy())
    attention = net.attention
    for name, dense in (
        ("query", attention._query_dense),
        ("key", attention._key_dense),
        ("value", attention._value_dense),
        ("out", attention._output_dense),
    ):
        kernel = dense.kernel.numpy()
        inner = kernel.reshape(D, D)  # (in, heads, key_dim) or (heads, key_dim, out)
        put(getattr(twin, name).weight, inner.T)
        put(getattr(twin, name).bias, dense.bias.numpy().reshape(-1))
    put(twin.norm.weight, net.norm.gamma.numpy())
    put(twin.norm.bias, net.norm.beta.numpy())
    put(twin.head.weight, net.head.kernel.numpy().T)
    put(twin.head.bias, net.head.bias.numpy())
    return twin


def data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, VOCAB, (n, T)), rng.integers(0, CLASSES, n)


def keras_loss() -> keras.losses.Loss:
    return keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None, dtype="float64"
    )


def assert_rebuilt(model: InfluenceModel, batch: tuple[np.ndarray, np.ndarray]) -> None:
    """Every parameter covered, and the statistics rebuild the per-sample gradients."""
    covered = coverage(model)
    assert list(covered) == list(model.parameter_names)  # 100 % of θ
    assert {c.kind for c in covered.values()} == {"embedding", "elementwise", "dense"}
    flat = model.to_numpy(model.per_sample_grads(batch))
    rebuilt = model.to_numpy(per_sample_grads_from_layers(model, batch))
    np.testing.assert_allclose(rebuilt, flat, atol=1e-12 * np.abs(flat).max())


def test_the_keras_block_is_covered_whole_and_its_statistics_rebuild_its_gradients() -> None:
    model = InfluenceModel(keras_block(), keras_loss())
    kinds = {name.rsplit("/", 2)[-2]: c.kind for name, c in coverage(model).items()}
    assert kinds["query"] == kinds["attention_output"] == "dense"  # MultiHeadAttention's
    assert_rebuilt(model, data(6, 0))


def test_the_nnx_block_is_covered_whole_and_its_statistics_rebuild_its_gradients() -> None:
    model = InfluenceModel(nnx_twin(torch_twin(keras_block())), nnx_loss)
    covered = coverage(model)
    assert covered["attention/query/kernel"].kind == covered["attention/out/kernel"].kind == "dense"
    assert_rebuilt(model, data(6, 0))


def test_the_torch_keras_and_nnx_blocks_agree_to_1e_8() -> None:
    net = keras_block()
    twin = torch_twin(net)
    train, test = data(16, 2), data(4, 3)
    keras_model = InfluenceModel(net, keras_loss())
    torch_model = InfluenceModel(twin, torch.nn.CrossEntropyLoss(reduction="none"))
    nnx_model = InfluenceModel(nnx_twin(twin), nnx_loss)
    models = (keras_model, torch_model, nnx_model)
    outputs = [m.to_numpy(m.kernels.outputs(m.kernels.as_native(train[0]))) for m in models]
    for other in outputs[1:]:
        np.testing.assert_allclose(other, outputs[0], rtol=1e-12)
    scores: dict[str, list[np.ndarray]] = {}
    for model in models:
        for solver in (KFACIHVP, EKFACIHVP):
            calculator = FirstOrderInfluenceCalculator(
                model, solver(damping=1e-3, fisher="empirical")
            ).fit(train)
            scores.setdefault(solver.__name__, []).append(
                model.to_numpy(calculator.influence(test))
            )
            scores.setdefault(f"{solver.__name__} self", []).append(
                model.to_numpy(calculator.self_influence())
            )
            for label, part in zip(
                ("one pass", "one pass self"),
                calculator.influence_and_self_influence(test),
                strict=True,
            ):
                scores.setdefault(f"{solver.__name__} {label}", []).append(model.to_numpy(part))
        tracin = TracIn(model, [model.save_state()], 0.1, layerwise=True).fit(train)
        scores.setdefault("TracIn", []).append(model.to_numpy(tracin.influence(test)))
    for name, (keras_scores, torch_scores, nnx_scores) in scores.items():
        for other in (keras_scores, nnx_scores):
            gap = np.abs(other - torch_scores).max() / np.abs(torch_scores).max()
            assert gap < 1e-8, (name, gap)
    for name in ("KFACIHVP", "EKFACIHVP"):  # the one pass (in the eigenbases) = the two apart
        for part, apart in (("one pass", name), ("one pass self", f"{name} self")):
            for joint, separate in zip(scores[f"{name} {part}"], scores[apart], strict=True):
                gap = np.abs(joint - separate).max() / np.abs(separate).max()
                assert gap < 1e-10, (name, part, gap)


def keras_cnn() -> keras.Model:
    keras.utils.set_random_seed(4)
    inputs = keras.Input((6, 6, 2), dtype="float64")
    x = keras.layers.Conv2D(4, 3, padding="same", dtype="float64")(inputs)
    x = keras.layers.BatchNormalization(dtype="float64")(x)
    x = keras.layers.ReLU(dtype="float64")(x)
    x = keras.layers.Flatten(dtype="float64")(x)
    outputs = keras.layers.Dense(3, dtype="float64")(x)
    net = keras.Model(inputs, outputs)
    norm = net.layers[2]
    rng = np.random.default_rng(5)  # moving statistics and an affine map away from the identity
    norm.moving_mean.assign(rng.uniform(-1, 1, 4))
    norm.moving_variance.assign(rng.uniform(0.5, 2, 4))
    norm.gamma.assign(rng.uniform(0.5, 1.5, 4))
    return net


def assert_cnn_scores(model: InfluenceModel, train: tuple, solver: type) -> None:
    """All parameters covered; statistics rebuild the gradients; scores equal solve(g_test)ᵀ g_train."""
    assert {c.kind for c in coverage(model).values()} == {"conv2d", "elementwise", "dense"}
    assert_scores(model, train, solver)


def assert_scores(model: InfluenceModel, train: tuple, solver: type) -> None:
    """Statistics rebuild the per-sample gradients; scores equal solve(g_test)ᵀ g_train."""
    flat = model.to_numpy(model.per_sample_grads(train))
    rebuilt = model.to_numpy(per_sample_grads_from_layers(model, train))
    np.testing.assert_allclose(rebuilt, flat, atol=1e-12 * np.abs(flat).max())
    calculator = FirstOrderInfluenceCalculator(model, solver(damping=1e-2, fisher="empirical"))
    calculator = calculator.fit(train)
    test = (train[0][:3], train[1][:3])
    g_test = model.to_numpy(model.per_sample_grads(test))
    solved = model.to_numpy(calculator.ihvp.solve(model.kernels.as_native(g_test.T)))
    expected = solved.T @ flat.T
    got = model.to_numpy(calculator.influence(test))
    np.testing.assert_allclose(got, expected, atol=1e-9 * np.abs(expected).max())


@pytest.mark.parametrize("solver", [KFACIHVP, EKFACIHVP])
def test_a_keras_cnn_with_batch_normalization_on_all_parameters(solver) -> None:
    rng = np.random.default_rng(6)
    train = (rng.standard_normal((12, 6, 6, 2)), rng.integers(0, 3, 12))
    assert_cnn_scores(InfluenceModel(keras_cnn(), keras_loss()), train, solver)


class NnxCNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        kwargs = {"param_dtype": jax.numpy.float64, "dtype": jax.numpy.float64, "rngs": rngs}
        self.conv = nnx.Conv(2, 4, (3, 3), padding="SAME", **kwargs)
        self.norm = nnx.BatchNorm(4, **kwargs)
        self.head = nnx.Linear(6 * 6 * 4, 3, **kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.norm(self.conv(x)))
        return self.head(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("solver", [KFACIHVP, EKFACIHVP])
def test_an_nnx_cnn_with_batch_norm_on_all_parameters(solver) -> None:
    net = NnxCNN(nnx.Rngs(4))
    rng = np.random.default_rng(5)  # running averages and an affine map away from the identity
    net.norm.mean[...] = rng.uniform(-1, 1, 4).astype(np.float32)  # nnx keeps them in float32
    net.norm.var[...] = rng.uniform(0.5, 2, 4).astype(np.float32)
    net.norm.scale[...] = rng.uniform(0.5, 1.5, 4)
    train = (rng.standard_normal((12, 6, 6, 2)), rng.integers(0, 3, 12))
    assert_cnn_scores(InfluenceModel(net, nnx_loss), train, solver)


@pytest.mark.parametrize("framework", ["torch", "tensorflow", "jax"])
def test_parameters_of_no_layer_get_the_fisher_diagonal_in_every_framework(framework) -> None:
    """A class token, a positional table, packed attention, grouped convolutions, GroupNorm."""
    module = importlib.import_module(f"influence_{framework}.reference_models")
    net, loss, train = module.layer_kind_case("parameter")
    model = InfluenceModel(net, loss)
    kinds = {c.kind for c in coverage(model).values()}
    assert kinds == {"dense", "parameter"}, kinds
    assert_scores(model, train, EKFACIHVP)
    flat = model.to_numpy(model.per_sample_grads(train))
    fitted = EKFACIHVP(damping=1e-3, fisher="empirical").fit(model, train)
    d = model.num_parameters
    curvature = model.to_numpy(
        fitted.damped_hvp(model.kernels.as_native(np.eye(d)))
    ) - 1e-3 * np.eye(d)
    offsets = np.cumsum((0, *model.layout.sizes))
    index = np.concatenate(
        [
            np.arange(offsets[i], offsets[i + 1])
            for i, name in enumerate(model.layout.names)
            if fitted.coverage_[name].kind == "parameter"
        ]
    )
    expected = np.diag(np.mean(flat[:, index] ** 2, axis=0))
    got = curvature[np.ix_(index, index)]
    np.testing.assert_allclose(got, expected, atol=1e-12 * np.abs(expected).max())
