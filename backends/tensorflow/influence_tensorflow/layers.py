"""Layer-wise statistics for Keras: each layer's inputs and output gradients, from recorded calls.

Keras has no forward hooks, so for one forward pass the ``call`` of each
selected layer is replaced (on the instance, restored afterwards) by one that
records its input and output; one tape then gives ∂ℓ/∂(layer output) for
every sample at once (samples are independent with ``training=False``).
Recording calls, rather than reading a functional graph, reaches layers
nested inside others (``MultiHeadAttention``'s ``EinsumDense`` projections,
sublayers of a custom layer) and works for subclassed models too.

Kinds (:class:`~influence_core.plugin.Layer`):

* ``Dense`` and ``EinsumDense`` whose equation contracts the input's
  trailing axes with the kernel's leading ones (``"abc,cde->abde"``,
  attention's query/key/value and output projections): dense over positions,
  p_in and p_out the products of the contracted and kernel-only axes.
  Keras fuses a layer's activation into its call, so z = a W + b is
  recomputed from the captured input (one small product per layer) and
  g = ∂ℓ/∂z is the vector-Jacobian product of the activation at z.
* ``Conv2D`` (channels last, one group): patches from
  ``tf.image.extract_patches``, already in the canonical ``(kh, kw, in)`` order.
* ``Embedding``: the integer ids and ∂ℓ/∂(looked-up rows).
* ``LayerNormalization``, ``RMSNormalization`` and ``BatchNormalization``
  (inference mode: moving statistics), normalising the last axis: the
  normalised input x̂, recomputed from the captured input, and ∂ℓ/∂(output).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
    if "EinsumDense" in names:
        return "dense" if _einsum_axes(layer) is not None else None
    if "Dense" in names:
        return "dense"
    if "Conv2D" in names and getattr(layer, "groups", 1) == 1:
        if getattr(layer, "data_format", "channels_last") == "channels_last":
            return "conv2d"
    if "Embedding" in names and hasattr(layer, "embeddings"):
        return "embedding"
    if names & {"LayerNormalization", "RMSNormalization", "BatchNormalization"}:
        return "elementwise" if _normalises_last_axis(layer) else None
    return None


def _einsum_axes(layer: Any) -> tuple[str, str] | None:
    """(contracted, kernel-only) axes of an EinsumDense that is a dense layer over positions.

    The input's trailing axes are contracted with the kernel's leading ones,
    the output is the input's other axes followed by the kernel's others, and
    a bias (if any) spans all of those: then W is the kernel reshaped to
    (p_in, p_out). Anything else (a transposed output, a broadcast kernel) is None.
    """
    equation = str(getattr(layer, "equation", "")).replace(" ", "")
    try:
        operands, out = equation.split("->")
        lhs, kernel = operands.split(",")
    except ValueError:
        return None
    contracted = "".join(c for c in kernel if c in lhs and c not in out)
    free = "".join(c for c in kernel if c not in lhs)
    kept = lhs[: len(lhs) - len(contracted)]
    if "." in equation or not contracted or kernel != contracted + free:
        return None
    if not lhs.endswith(contracted) or out != kept + free or not kept:
        return None
    bias_axes = getattr(layer, "bias_axes", None)
    if bias_axes and bias_axes != free:
        return None
    return contracted, free


def _normalises_last_axis(layer: Any) -> bool:
    """One normalised axis, with a scale (the kernel of its block); that it is the last is
    checked on the inputs (:func:`_normalised`)."""
    axis = getattr(layer, "axis", -1)
    axes = list(axis) if isinstance(axis, list | tuple) else [axis]
    if len(axes) != 1:
        return False
    if "BatchNormalization" in {c.__name__ for c in type(layer).__mro__}:
        return bool(getattr(layer, "scale", False)) and hasattr(layer, "moving_mean")
    return _scale_variable(layer) is not None


def _scale_variable(layer: Any) -> Any:
    """γ of a normalisation layer (``gamma``, or RMSNormalization's ``scale``), or None."""
    gamma = getattr(layer, "gamma", None)
    if gamma is not None:
        return gamma
    scale = getattr(layer, "scale", None)
    return scale if hasattr(scale, "shape") else None


def _kernel_and_bias(layer: Any, kind: str) -> tuple[Any, Any]:
    if kind == "embedding":
        return layer.embeddings, None
    if kind == "elementwise":
        center = getattr(layer, "center", True) and not getattr(layer, "rms_scaling", False)
        return _scale_variable(layer), getattr(layer, "beta", None) if center else None
    return layer.kernel, getattr(layer, "bias", None)  # None without one (Dense, EinsumDense)


def _unwrapped(variable: Any) -> Any:
    return (
        variable.value
        if hasattr(variable, "value") and not isinstance(variable, tf.Variable)
        else variable
    )


class LayerStatistics:
    """The selected layers of a Keras model (see the module docstring), and their statistics."""

    def __init__(
        self, model: Any, names: Sequence[str], variables: Sequence[Any], output: Any = None
    ) -> None:
        self.output = output  # which of the model's outputs the loss reads (select_output)
        by_variable = {id(_unwrapped(v)): n for n, v in zip(names, variables, strict=True)}
        self.model = model
        self.keras_layers: list[Any] = []
        found = []
        seen = set()
        for layer in _all_layers(model):
            kind = _kind(layer)
            if kind is None or id(layer) in seen:
                continue
            seen.add(id(layer))
            kernel_variable, bias_variable = _kernel_and_bias(layer, kind)
            kernel = by_variable.get(id(_unwrapped(kernel_variable)))
            if kernel is None:
                continue
            bias = None if bias_variable is None else by_variable.get(id(_unwrapped(bias_variable)))
            shape = tuple(int(s) for s in kernel_variable.shape)
            if kind == "elementwise":
                inputs, outputs = 1, shape[-1]
            elif kind == "dense" and _einsum_axes(layer) is not None:
                contracted, _ = _einsum_axes(layer)
                inputs = _product(shape[: len(contracted)])
                outputs = _product(shape[len(contracted) :])
            else:
                inputs, outputs = _product(shape[:-1]), shape[-1]
            found.append(Layer(kernel.rpartition("/")[0], kind, kernel, bias, inputs, outputs))
            self.keras_layers.append(layer)
        self.recorded = tuple(found)
        covered = {layer.kernel for layer in found} | {layer.bias for layer in found}
        # Every other selected variable (a weight used directly, a layer of no kind above):
        # a "parameter" layer, its per-sample gradients from a vectorised one-sample tape.
        self.variables = {n: v for n, v in zip(names, variables, strict=True) if n not in covered}
        self.generic = tuple(
            Layer(n, "parameter", n, None, 1, _product(v.shape)) for n, v in self.variables.items()
        )
        self.layers = self.recorded + self.generic
        self.gaps = _gaps(model, by_variable, self.layers)

    def __call__(
        self, loss_fn: Any, inputs: Any, targets: Any, *, defer: bool = False
    ) -> dict[str, tuple[Any, Any]]:
        """``{name: (a, g)}``; with ``defer``, a convolution's a is its input (NHWC), not patches."""
        out = self._recorded_statistics(loss_fn, inputs, targets, defer) if self.recorded else {}
        if self.generic:
            out.update(self._parameter_statistics(loss_fn, inputs, targets))
        return out

    def _parameter_statistics(
        self, loss_fn: Any, inputs: Any, targets: Any
    ) -> dict[str, tuple[Any, Any]]:
        """(ones, g) per ``"parameter"`` layer: g the per-sample gradient (b, 1, p)."""
        variables = list(self.variables.values())

        def one_sample(sample: Any) -> list[Any]:
            x, y = sample
            x = tf.nest.map_structure(lambda t: t[tf.newaxis], x)
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(variables)
                outputs = select_output(self.model(x, training=False), self.output)
                loss = tf.reduce_sum(loss_fn(y[tf.newaxis], outputs))
            grads = tape.gradient(loss, variables)
            return [
                tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables, strict=True)
            ]

        grads = tf.vectorized_map(one_sample, (inputs, targets))
        out = {}
        for spec, g in zip(self.generic, grads, strict=True):
            g = tf.reshape(g, [tf.shape(g)[0], 1, spec.outputs])
            out[spec.name] = (tf.ones_like(g), g)
        return out

    def conv2d_patches(self, spec: Layer, x: Any) -> Any:
        """(b, T, p_in): the patches of a ``"conv2d"`` layer's input x, as the statistics give them."""
        patches = _patches(self._keras_layer(spec), x)
        return tf.reshape(patches, [tf.shape(patches)[0], -1, spec.inputs])

    def conv2d_map(self, spec: Layer, x: Any, kernels: Any) -> Any:
        """(b, T, m): patches(x) @ kernels as the layer's own convolution (canonical = Keras layout)."""
        layer = self._keras_layer(spec)
        kh, kw = layer.kernel_size
        m = int(kernels.shape[1])
        weight = tf.reshape(kernels, [kh, kw, spec.inputs // (kh * kw), m])
        z = _convolved(layer, x, weight)
        return tf.reshape(z, [tf.shape(z)[0], -1, m])

    def _keras_layer(self, spec: Layer) -> Any:
        for layer, recorded in zip(self.keras_layers, self.recorded, strict=True):
            if recorded.name == spec.name and spec.kind == "conv2d":
                return layer
        raise ValueError(f"layer {spec.name!r} is a {spec.kind} layer, not a conv2d one")

    def _recorded_statistics(
        self, loss_fn: Any, inputs: Any, targets: Any, defer: bool = False
    ) -> dict[str, tuple[Any, Any]]:
        b = int(tf.shape(targets)[0])
        with _recorded_calls(self.keras_layers, self.recorded, b) as records:
            with tf.GradientTape() as tape:
                outputs = self.model(inputs, training=False)
                missing = [spec.name for spec in self.recorded if spec.name not in records]
                recorded = [records[spec.name][1] for spec in self.recorded if spec.name in records]
                losses = loss_fn(targets, select_output(outputs, self.output))
                total = tf.reduce_sum(losses)
        if missing:
            raise ValueError(
                f"layers {missing} were not called in the model's forward pass; leave them "
                "out of parameters="
            )
        output_grads = tape.gradient(total, recorded)
        out = {}
        for layer, spec, d_out in zip(self.keras_layers, self.recorded, output_grads, strict=True):
            a, y = records[spec.name]
            if d_out is None:  # the loss does not depend on this layer
                d_out = tf.zeros_like(y)
            if spec.kind == "embedding":
                out[spec.name] = (tf.reshape(a, [b, -1]), tf.reshape(d_out, [b, -1, spec.outputs]))
                continue
            if spec.kind == "elementwise":
                normalised = tf.cast(_normalised(layer, a), d_out.dtype)  # a mixed-dtype model
                out[spec.name] = (
                    tf.reshape(normalised, [b, -1, spec.outputs]),
                    tf.reshape(d_out, [b, -1, spec.outputs]),
                )
                continue
            deferred = defer and spec.kind == "conv2d"
            z, patches = self._pre_activation(layer, spec, a, patches=not deferred)
            activation = getattr(layer, "activation", None) or (lambda x: x)
            with tf.GradientTape() as inner:
                inner.watch(z)
                activated = activation(z)
            g = inner.gradient(activated, z, output_gradients=d_out)
            out[spec.name] = (
                a if deferred else tf.reshape(patches, [b, -1, spec.inputs]),
                tf.reshape(g, [b, -1, spec.outputs]),
            )
        return out

    @staticmethod
    def _pre_activation(
        layer: Any, spec: Layer, a: Any, *, patches: bool = True
    ) -> tuple[Any, Any]:
        """(z, the input as patches, or None): z = a W + b, recomputed from the captured input."""
        kernel = layer.kernel
        if spec.kind == "dense":
            contracted = len(_einsum_axes(layer)[0]) if _einsum_axes(layer) is not None else 1
            rank = a.shape.rank
            axes = [list(range(rank - contracted, rank)), list(range(contracted))]
            z = tf.tensordot(a, kernel, axes=axes)
            patches = a
        else:
            z = _convolved(layer, a, kernel)
            patches = _patches(layer, a) if patches else None
        bias = getattr(layer, "bias", None)
        if bias is not None:
            z = z + bias
        return z, patches


def _convolved(layer: Any, x: Any, kernel: Any) -> Any:
    """x convolved by ``kernel`` (kh, kw, in, m) at the Keras Conv2D's geometry, no bias."""
    sh, sw = layer.strides
    dh, dw = layer.dilation_rate
    return tf.nn.conv2d(x, kernel, [1, sh, sw, 1], layer.padding.upper(), dilations=[1, dh, dw, 1])


def _patches(layer: Any, x: Any) -> Any:
    """(b, H', W', kh·kw·in): the Keras Conv2D's input patches, canonical (kh, kw, in) order."""
    kh, kw = layer.kernel_size
    sh, sw = layer.strides
    dh, dw = layer.dilation_rate
    return tf.image.extract_patches(
        x, [1, kh, kw, 1], [1, sh, sw, 1], [1, dh, dw, 1], layer.padding.upper()
    )


def _gaps(model: Any, by_variable: dict[int, str], layers: Sequence[Layer]) -> dict[str, str]:
    """Why each selected variable that no layer holds has none (its layer's class, and what it lacks)."""
    covered = {layer.kernel for layer in layers} | {layer.bias for layer in layers}
    gaps: dict[str, str] = {}
    for layer in _all_layers(model):
        for variable in getattr(layer, "_trainable_variables", None) or layer.trainable_weights:
            name = by_variable.get(id(_unwrapped(variable)))
            if name is None or name in covered or name in gaps:
                continue
            kind = type(layer).__name__
            if kind in ("LayerNormalization", "RMSNormalization", "BatchNormalization"):
                gaps[name] = f"a {kind} over an axis other than the last, or without a scale"
            elif kind == "Conv2D":
                gaps[name] = "a Conv2D with groups > 1 or channels_first"
            elif kind == "EinsumDense":
                gaps[name] = f"an EinsumDense whose equation {layer.equation!r} is not dense"
            else:
                gaps[name] = f"{kind} is not a layer kind the tensorflow backend knows"
    return gaps


def _product(shape: Sequence[int]) -> int:
    total = 1
    for s in shape:
        total *= int(s)
    return total


def _all_layers(model: Any) -> Iterator[Any]:
    """Every layer of the model, nested ones included, each once."""
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is not None:  # Keras 3 and tf.keras: includes sublayers of custom layers
        yield from flatten(include_self=False, recursive=True)
    else:  # pragma: no cover - a Keras without _flatten_layers
        yield from _flat_layers(model)


def _normalised(layer: Any, x: Any) -> Any:
    """x̂: the normalisation layer's output before its scale and shift (last axis)."""
    axis = layer.axis[0] if isinstance(layer.axis, list | tuple) else layer.axis
    rank = x.shape.rank
    if int(axis) % rank != rank - 1:
        raise ValueError(
            f"layer {layer.name!r} normalises axis {axis} of inputs of rank {rank}; layer-wise "
            "statistics cover normalisation over the last axis (channels last)"
        )
    epsilon = float(layer.epsilon)
    names = {c.__name__ for c in type(layer).__mro__}
    if "BatchNormalization" in names:
        mean = tf.cast(_unwrapped(layer.moving_mean), x.dtype)
        variance = tf.cast(_unwrapped(layer.moving_variance), x.dtype)
        return (x - mean) * tf.math.rsqrt(variance + epsilon)
    if "RMSNormalization" in names or getattr(layer, "rms_scaling", False):
        return x * tf.math.rsqrt(tf.reduce_mean(tf.square(x), axis=-1, keepdims=True) + epsilon)
    mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
    return (x - mean) * tf.math.rsqrt(variance + epsilon)


@contextmanager
def _recorded_calls(
    layers: Sequence[Any], specs: Sequence[Layer], batch_size: int
) -> Iterator[dict[str, tuple[Any, Any]]]:
    """Inside the block, each call of ``layers`` records ``{name: (input, output)}``.

    An output with a leading axis of 1 (a table looked up once for the batch)
    is broadcast to the batch on its way out, so that its gradient is each
    sample's own; any other leading axis that is not the batch is refused.
    """
    records: dict[str, tuple[Any, Any]] = {}
    for layer, spec in zip(layers, specs, strict=True):
        original = layer.call

        def call(
            *args: Any, _original: Any = original, _name: str = spec.name, **kwargs: Any
        ) -> Any:
            output = _original(*args, **kwargs)
            x = args[0] if args else next(iter(kwargs.values()))
            leading = int(output.shape[0]) if output.shape.rank else None
            if leading not in (1, batch_size):
                raise ValueError(
                    f"layer {_name!r} is called on inputs of shape {tuple(x.shape)} that have no "
                    f"batch axis (the batch has {batch_size} samples): per-sample statistics need "
                    "one; give its inputs a leading batch axis of b or 1 (e.g. positions[None]), "
                    "or leave the layer out of parameters="
                )
            if leading != batch_size:
                output = tf.broadcast_to(output, [batch_size, *output.shape[1:]])
                x = tf.broadcast_to(x, [batch_size, *x.shape[1:]])
            records[_name] = (x, output)
            return output

        layer.call = call
    try:
        yield records
    finally:
        for layer in layers:
            del layer.call  # the class's call again
