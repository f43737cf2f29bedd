"""Layer-wise statistics for Keras: each Dense / Conv2D layer's inputs and output gradients.

Keras fuses a layer's activation into its call, so its pre-activation z is
not a tensor of the model's graph. The approach chosen: one auxiliary
functional model (built once, sharing the layers and weights) returns every
selected layer's input and output along with the model's outputs; one tape
gives ∂ℓ/∂(layer output) for every sample at once (samples are independent
with ``training=False``); z = a W + b is recomputed from the captured input
(one small product per layer) and g = ∂ℓ/∂z is the vector-Jacobian product of
the layer's activation at z. Convolutions are unfolded with
``tf.image.extract_patches``, whose patches are already in the canonical
``(kh, kw, in)`` order. This needs a model whose inputs are known (Sequential
with ``keras.Input``, or functional), as the representer points do.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow as tf

from influence_core.plugin import Layer, select_output

__all__ = ["LayerStatistics"]


def _flat_layers(layer: Any) -> Iterator[Any]:
    for child in getattr(layer, "layers", []):
        if getattr(child, "layers", None):
            yield from _flat_layers(child)
        else:
            yield child


def _kind(layer: Any) -> str | None:
    names = {c.__name__ for c in type(layer).__mro__}
    if "Dense" in names:
        return "dense"
    if "Conv2D" in names and getattr(layer, "groups", 1) == 1:
        if getattr(layer, "data_format", "channels_last") == "channels_last":
            return "conv2d"
    return None


def _unwrapped(variable: Any) -> Any:
    return (
        variable.value
        if hasattr(variable, "value") and not isinstance(variable, tf.Variable)
        else variable
    )


def _output_structure(model: Any) -> Any:
    """The model's outputs as it returns them: one tensor, or a list or dict for several heads.

    A functional model knows its structure (``output``); a Sequential built on
    ``keras.Input`` has only its flat ``outputs`` list until it is called.
    """
    try:
        return model.output
    except (AttributeError, ValueError):
        outputs = list(model.outputs)
        return outputs[0] if len(outputs) == 1 else outputs


class LayerStatistics:
    """The selected Dense / Conv2D layers of a Keras model, and their statistics for a batch."""

    def __init__(
        self, model: Any, names: Sequence[str], variables: Sequence[Any], output: Any = None
    ) -> None:
        self.output = output  # which of the model's outputs the loss reads (select_output)
        by_variable = {id(_unwrapped(v)): n for n, v in zip(names, variables, strict=True)}
        self.model = model
        self.keras_layers: list[Any] = []
        found = []
        for layer in _flat_layers(model):
            kind = _kind(layer)
            kernel = by_variable.get(id(_unwrapped(layer.kernel))) if kind else None
            if kernel is None:
                continue
            bias = None
            if getattr(layer, "use_bias", False):
                bias = by_variable.get(id(_unwrapped(layer.bias)))
            shape = tuple(int(s) for s in layer.kernel.shape)
            inputs = 1
            for s in shape[:-1]:
                inputs *= s
            found.append(Layer(kernel.rpartition("/")[0], kind, kernel, bias, inputs, shape[-1]))
            self.keras_layers.append(layer)
        self.layers = tuple(found)
        self._aux: Any = None

    def _auxiliary(self) -> Any:
        if self._aux is None:
            keras = importlib.import_module(type(self.model).__module__.split(".")[0])
            try:
                self._aux = keras.Model(
                    self.model.inputs,
                    [layer.input for layer in self.keras_layers]
                    + [layer.output for layer in self.keras_layers]
                    + [_output_structure(self.model)],
                )
            except (AttributeError, ValueError, TypeError) as error:
                raise ValueError(
                    "layer-wise statistics need the layers' inputs: build the model with "
                    f"keras.Input (Sequential or functional), not by subclassing ({error})"
                ) from error
        return self._aux

    def __call__(self, loss_fn: Any, inputs: Any, targets: Any) -> dict[str, tuple[Any, Any]]:
        count = len(self.keras_layers)
        with tf.GradientTape() as tape:
            results = self._auxiliary()(inputs, training=False)
            layer_inputs, layer_outputs = results[:count], results[count : 2 * count]
            tape.watch(layer_outputs)
            losses = loss_fn(targets, select_output(results[-1], self.output))
            total = tf.reduce_sum(losses)
        output_grads = tape.gradient(total, layer_outputs)
        out = {}
        for layer, spec, a, d_out in zip(
            self.keras_layers, self.layers, layer_inputs, output_grads, strict=True
        ):
            if d_out is None:  # the loss does not depend on this layer
                d_out = tf.zeros_like(layer_outputs[self.keras_layers.index(layer)])
            z, patches = self._pre_activation(layer, spec, a)
            with tf.GradientTape() as inner:
                inner.watch(z)
                activated = layer.activation(z)
            g = inner.gradient(activated, z, output_gradients=d_out)
            b = tf.shape(a)[0]
            out[spec.name] = (
                tf.reshape(patches, [b, -1, spec.inputs]),
                tf.reshape(g, [b, -1, spec.outputs]),
            )
        return out

    @staticmethod
    def _pre_activation(layer: Any, spec: Layer, a: Any) -> tuple[Any, Any]:
        """(z, the input as patches): z = a W + b, recomputed from the captured input."""
        kernel = layer.kernel
        if spec.kind == "dense":
            z = tf.tensordot(a, kernel, axes=[[a.shape.rank - 1], [0]])
            patches = a
        else:
            kh, kw = layer.kernel_size
            sh, sw = layer.strides
            dh, dw = layer.dilation_rate
            padding = layer.padding.upper()
            z = tf.nn.conv2d(a, kernel, [1, sh, sw, 1], padding, dilations=[1, dh, dw, 1])
            patches = tf.image.extract_patches(
                a, [1, kh, kw, 1], [1, sh, sw, 1], [1, dh, dw, 1], padding
            )
        if getattr(layer, "use_bias", False):
            z = z + layer.bias
        return z, patches
