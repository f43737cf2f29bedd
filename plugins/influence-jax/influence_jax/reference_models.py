"""Builds the conformance suite's reference models as flax.nnx modules (and as pure models).

nnx's ``Linear`` kernel is ``(in, out)`` and ``Conv`` kernel ``(kh, kw, in,
out)`` with NHWC inputs: the specs' canonical layout. Only the parameter
order differs (nnx sorts names: ``bias`` before ``kernel``), which the
canonical positions record.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from influence_conformance.specs import (
    Conv2D,
    Dense,
    Flatten,
    GlobalAveragePool,
    ModelSpec,
    ReferenceModel,
    canonical_offsets,
)

from .model import Functional

ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu, None: lambda a: a}


def require_x64(dtype: str) -> None:
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise RuntimeError(
            "float64 in JAX needs x64: call jax.config.update('jax_enable_x64', True) before "
            "creating any array (or set JAX_ENABLE_X64=1)"
        )


class Reference(nnx.Module):
    """A spec's layers as ``layer0``, ``layer1`` … (a flatten layer holds no parameters)."""

    def __init__(self, spec: ModelSpec, weights: list[np.ndarray], dtype: str) -> None:
        activations: list[str | None] = []
        shape, kernels = spec.input_shape, iter(zip(weights[::2], weights[1::2], strict=True))
        for i, layer in enumerate(spec.layers):
            if isinstance(layer, Flatten):
                activations.append("flatten")
                shape = (int(np.prod(shape)),)
                continue
            if isinstance(layer, GlobalAveragePool):
                activations.append("mean")
                shape = (shape[-1],)
                continue
            kernel, bias = next(kernels)
            rngs = nnx.Rngs(0)
            if isinstance(layer, Dense):
                module = nnx.Linear(
                    kernel.shape[0], layer.units, dtype=dtype, param_dtype=dtype, rngs=rngs
                )
                shape = (layer.units,)
            else:
                assert isinstance(layer, Conv2D)
                k = layer.kernel_size
                module = nnx.Conv(
                    kernel.shape[2],
                    layer.filters,
                    kernel_size=(k, k),
                    padding="VALID",
                    dtype=dtype,
                    param_dtype=dtype,
                    rngs=rngs,
                )
                shape = (shape[0] - k + 1, shape[1] - k + 1, layer.filters)
            module.kernel[...] = jnp.asarray(kernel, dtype)
            module.bias[...] = jnp.asarray(bias, dtype)
            setattr(self, f"layer{i}", module)
            activations.append(layer.activation)
        self.activations = tuple(activations)  # static: part of the graph definition

    def __call__(self, x: Any) -> Any:
        for i, activation in enumerate(self.activations):
            if activation == "flatten":
                x = x.reshape(x.shape[0], -1)
            elif activation == "mean":
                x = x.mean(axis=(1, 2))
            else:
                x = ACTIVATIONS[activation](getattr(self, f"layer{i}")(x))
        return x


def _parameterless(layer: Any) -> bool:
    return isinstance(layer, Flatten | GlobalAveragePool)


def loss_for(spec: ModelSpec) -> Any:
    """The per-sample loss, ``loss(outputs, targets) -> (b,)``, as optax orders its arguments."""
    if spec.loss == "mse":
        return lambda outputs, targets: jnp.mean((outputs - targets) ** 2, axis=-1)

    def cross_entropy(outputs: Any, targets: Any) -> Any:
        log_p = jax.nn.log_softmax(outputs, axis=-1)
        return -jnp.take_along_axis(log_p, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]

    return cross_entropy


def positions(spec: ModelSpec, names: list[str]) -> np.ndarray:
    """Canonical position of every entry of the backend's flat θ (nnx order: names sorted)."""
    offsets = canonical_offsets(spec)
    parametric = [i for i, layer in enumerate(spec.layers) if not _parameterless(layer)]
    sizes = [int(np.prod(s)) for pair in spec.parameter_shapes() for s in pair]
    out = []
    for name in names:
        layer, _, leaf = name.rpartition("/")
        j = 2 * parametric.index(int(layer.removeprefix("layer"))) + (0 if leaf == "kernel" else 1)
        out.append(np.arange(offsets[j], offsets[j] + sizes[j]))
    return np.concatenate(out)


def build(spec: ModelSpec, weights: list[np.ndarray], dtype: str) -> ReferenceModel:
    require_x64(dtype)
    model = Reference(spec, weights, dtype)
    names = [
        "/".join(str(getattr(k, "key", k)) for k in path[:-1])
        for path, _ in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    ]
    loss = loss_for(spec)
    return ReferenceModel(
        model=model,
        loss_fn=loss,
        canonical_positions=positions(spec, names),
        layer_names=[
            f"layer{i}" for i, layer in enumerate(spec.layers) if not _parameterless(layer)
        ],
        native_dataset=None,
        scalar_loss_fn=lambda outputs, targets: jnp.mean(loss(outputs, targets)),
    )


def build_functional(spec: ModelSpec, weights: list[np.ndarray], dtype: str) -> ReferenceModel:
    """The same spec as a pure model: ``Functional(apply_fn, params)`` over a nested dict."""
    reference = build(spec, weights, dtype)
    graphdef, params = nnx.split(reference.model, nnx.Param)
    pure = nnx.to_pure_dict(params)

    def apply_fn(p: Any, x: Any) -> Any:
        state = jax.tree_util.tree_map(lambda a: a, params)
        nnx.replace_by_pure_dict(state, p)
        return nnx.merge(graphdef, state)(x)

    reference.model = Functional(apply_fn, pure)
    return reference


def layer_kind_case(kind: str) -> tuple[Any, Any, tuple[Any, Any]] | None:
    """A float64 nnx model with a layer of ``kind`` and a batch (LayerKindChecks)."""
    rng = np.random.default_rng(0)
    kwargs = {"param_dtype": jnp.float64, "dtype": jnp.float64, "rngs": nnx.Rngs(0)}

    def loss(outputs: Any, targets: Any) -> Any:
        logits = outputs - jax.scipy.special.logsumexp(outputs, axis=1, keepdims=True)
        return -jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]

    if kind == "embedding":

        class Tokens(nnx.Module):
            def __init__(self) -> None:
                self.tokens = nnx.Embed(9, 4, **kwargs)
                self.positions = nnx.Embed(5, 4, **kwargs)
                self.norm = nnx.LayerNorm(4, **kwargs)
                self.rms = nnx.RMSNorm(4, **kwargs)
                self.head = nnx.Linear(4, 3, **kwargs)

            def __call__(self, ids: Any) -> Any:
                h = self.tokens(ids) + self.positions(jnp.arange(ids.shape[1])[None])
                return self.head(self.rms(jnp.tanh(self.norm(h))).mean(axis=1))

        ids = rng.integers(0, 9, (7, 5))
        ids[1] = 3
        return Tokens(), loss, (ids, rng.integers(0, 3, 7))
    if kind == "elementwise":

        class Normed(nnx.Module):
            def __init__(self) -> None:
                self.conv = nnx.Conv(2, 4, (3, 3), padding="SAME", **kwargs)
                self.norm = nnx.BatchNorm(4, use_running_average=True, **kwargs)
                self.head = nnx.Linear(4 * 16, 3, **kwargs)

            def __call__(self, x: Any) -> Any:
                h = jax.nn.relu(self.norm(self.conv(x)))
                return self.head(h.reshape(h.shape[0], -1))

        net = Normed()
        net.norm.mean[...] = rng.uniform(-1, 1, 4).astype(net.norm.mean[...].dtype)
        net.norm.var[...] = rng.uniform(0.5, 2, 4).astype(net.norm.var[...].dtype)
        net.norm.scale[...] = rng.uniform(0.5, 1.5, 4)
        return net, loss, (rng.standard_normal((7, 4, 4, 2)), rng.integers(0, 3, 7))
    if kind == "parameter":

        class Direct(nnx.Module):
            """A class token and a positional table used directly, and a grouped Conv."""

            def __init__(self) -> None:
                self.embed = nnx.Linear(3, 4, **kwargs)
                self.cls = nnx.Param(jnp.asarray(rng.standard_normal((1, 1, 4))))
                self.pos = nnx.Param(jnp.asarray(rng.standard_normal((6, 4))))
                self.mix = nnx.Conv(4, 4, (1,), feature_group_count=2, **kwargs)
                self.head = nnx.Linear(4, 3, **kwargs)

            def __call__(self, x: Any) -> Any:
                h = self.embed(x)
                token = jnp.broadcast_to(self.cls[...], (h.shape[0], 1, 4))
                h = jnp.concatenate([token, h], axis=1) + self.pos[...]
                h = self.mix(jnp.tanh(h))
                return self.head(h[:, 0] + h.mean(axis=1))

        return Direct(), loss, (rng.standard_normal((7, 5, 3)), rng.integers(0, 3, 7))
    return None
