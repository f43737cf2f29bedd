"""Builds the conformance suite's reference models as Keras 3 models.

Keras' layout is the specs' canonical layout, so weights load as they are
and the canonical positions are the identity.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf

from influence_conformance.specs import (
    Conv2D,
    Dense,
    Flatten,
    GlobalAveragePool,
    ModelSpec,
    ReferenceModel,
)


def build(spec: ModelSpec, weights: list[np.ndarray], dtype: str) -> ReferenceModel:
    layers: list[Any] = [keras.Input(spec.input_shape, dtype=dtype)]
    layer_names: list[str] = []
    for i, layer in enumerate(spec.layers):
        name = f"layer{i}"
        if isinstance(layer, Dense):
            layers.append(
                keras.layers.Dense(layer.units, activation=layer.activation, dtype=dtype, name=name)
            )
        elif isinstance(layer, Conv2D):
            layers.append(
                keras.layers.Conv2D(
                    layer.filters,
                    layer.kernel_size,
                    activation=layer.activation,
                    dtype=dtype,
                    name=name,
                )
            )
        elif isinstance(layer, GlobalAveragePool):
            layers.append(keras.layers.GlobalAveragePooling2D(dtype=dtype, name=name))
            continue
        else:
            assert isinstance(layer, Flatten)
            layers.append(keras.layers.Flatten(dtype=dtype, name=name))
            continue
        layer_names.append(name)
    model = keras.Sequential(layers, name=f"reference_{spec.name}")
    model.set_weights([w.astype(dtype) for w in weights])

    # Keras losses compute in floatx() unless given a dtype: pass it, or float64 is lost.
    if spec.loss == "mse":
        loss_fn = keras.losses.MeanSquaredError(reduction=None, dtype=dtype)
        scalar_loss = keras.losses.MeanSquaredError(dtype=dtype)
    else:
        loss_fn = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=None, dtype=dtype
        )
        scalar_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=dtype)

    def native_dataset(X: np.ndarray, y: np.ndarray, batch_size: int | None) -> Any:
        data = tf.data.Dataset.from_tensor_slices((X.astype(dtype), y))
        return data if batch_size is None else data.batch(batch_size)

    return ReferenceModel(
        model=model,
        loss_fn=loss_fn,
        canonical_positions=np.arange(spec.num_parameters),
        layer_names=layer_names,
        native_dataset=native_dataset,
        scalar_loss_fn=scalar_loss,
    )


def layer_kind_case(kind: str) -> tuple[Any, Any, tuple[Any, Any]] | None:
    """A float64 Keras model with a layer of ``kind`` and a batch (LayerKindChecks)."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None, dtype="float64"
    )
    kwargs = {"dtype": "float64"}
    if kind == "embedding":
        ids = keras.Input((5,), dtype="int64")
        h = keras.layers.Embedding(9, 4, **kwargs)(ids)
        h = keras.layers.LayerNormalization(**kwargs)(keras.layers.Activation("tanh", **kwargs)(h))
        outputs = keras.layers.Dense(3, **kwargs)(keras.layers.GlobalAveragePooling1D(**kwargs)(h))
        tokens = rng.integers(0, 9, (7, 5))
        tokens[1] = 3  # one token at every position
        return keras.Model(ids, outputs), loss, (tokens, rng.integers(0, 3, 7))
    if kind == "elementwise":
        inputs = keras.Input((4, 4, 2), dtype="float64")
        h = keras.layers.Conv2D(4, 3, padding="same", **kwargs)(inputs)
        norm = keras.layers.BatchNormalization(**kwargs)
        h = keras.layers.LayerNormalization(**kwargs)(keras.layers.ReLU(**kwargs)(norm(h)))
        net = keras.Model(
            inputs, keras.layers.Dense(3, **kwargs)(keras.layers.Flatten(**kwargs)(h))
        )
        norm.moving_mean.assign(rng.uniform(-1, 1, 4))
        norm.moving_variance.assign(rng.uniform(0.5, 2, 4))
        norm.gamma.assign(rng.uniform(0.5, 1.5, 4))
        return net, loss, (rng.standard_normal((7, 4, 4, 2)), rng.integers(0, 3, 7))
    if kind == "parameter":
        inputs = keras.Input((5, 3), dtype="float64")
        h = _ClassToken(**kwargs)(keras.layers.Dense(4, **kwargs)(inputs))
        h = keras.layers.GroupNormalization(2, **kwargs)(h)
        # (No grouped convolution: TensorFlow's vectorized_map has no per-sample gradient of one.)
        h = keras.layers.Activation("tanh", **kwargs)(h)
        outputs = keras.layers.Dense(3, **kwargs)(keras.layers.GlobalAveragePooling1D(**kwargs)(h))
        net = keras.Model(inputs, outputs)
        return net, loss, (rng.standard_normal((7, 5, 3)), rng.integers(0, 3, 7))
    return None


class _ClassToken(keras.layers.Layer):
    """A class token prepended and a positional table added: weights used directly."""

    def build(self, shape: Any) -> None:
        width = int(shape[-1])
        self.token = self.add_weight(shape=(1, 1, width), initializer="random_normal")
        self.table = self.add_weight(shape=(int(shape[1]) + 1, width), initializer="random_normal")

    def call(self, h: Any) -> Any:
        token = keras.ops.broadcast_to(self.token, (keras.ops.shape(h)[0], 1, h.shape[-1]))
        return keras.ops.concatenate([token, h], axis=1) + self.table
