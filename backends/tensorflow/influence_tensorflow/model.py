"""TensorFlow kernels of the autodiff protocol, each traced once in a ``tf.function``.

* per-sample gradients: ``tf.vectorized_map`` of a one-example ``GradientTape``
  inside a ``tf.function`` that is reused across calls (eager ``vectorized_map``
  re-traces on every call: 50x slower, the figure in the project brief). Each kernel keeps exact-shape
  traces for its first four input shapes and one shape-relaxed trace for any
  other (:class:`ShapeSpecializedFunction`);
* HVPs: reverse-over-reverse; for a block V the outer tape takes the Jacobian
  of the k-vector gᵀV, which ``pfor`` vectorises over the k columns.

Works with Keras 3 models and layers (called with ``training=False``), Keras 2
(``tf_keras``) models and plain ``tf.Module`` s. Checkpoints (TracIn) are
weight lists (``model.get_weights()``) or files ``model.load_weights`` reads;
the last linear layer (representer points) is the last ``Dense`` of a Keras
model whose inputs are known (Sequential with an ``Input``, or functional). The loss follows Keras'
argument order, ``loss_fn(y_true, y_pred)``, and returns one value per sample.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import tensorflow as tf

from influence_core.plugin import (
    LastLayer,
    Layer,
    ModelKernels,
    NonFiniteGradientError,
    OutputSelector,
    ParameterLayout,
    check_output_selector,
    select_output,
    select_parameters,
)

from .data import native_batch_count, native_batches
from .layers import LayerStatistics
from .namespace import namespace


def _is_keras(model: Any) -> bool:
    return any(c.__module__.split(".")[0] in {"keras", "tf_keras"} for c in type(model).__mro__)


def trainable_variables_with_names(model: Any) -> tuple[list[tf.Variable], list[str]]:
    """The model's trainable variables and a unique '/'-separated name for each.

    Keras 3 variables carry a ``path`` (``"sequential/dense/kernel"``); Keras 2
    variables a scoped ``name`` (``"dense/kernel:0"``); a plain ``tf.Module`` is
    named by attribute path (``"encoder/layers/0/w"``).
    """
    if _is_keras(model):
        variables = list(model.trainable_variables)
        names = [getattr(v, "path", None) or v.name.split(":")[0] for v in variables]
    elif isinstance(model, tf.Module):
        found = list(
            model._flatten(
                predicate=lambda v: isinstance(v, tf.Variable) and v.trainable, with_path=True
            )
        )
        variables = [v for _, v in found]
        names = ["/".join(map(str, path)) for path, _ in found]
    else:
        raise TypeError(
            f"the tensorflow backend needs a Keras model/layer or a tf.Module, got {type(model).__name__}"
        )
    if len(set(names)) != len(names):  # make duplicates unique, keep order
        names = [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
    return variables, names


def frozen_names(model: Any) -> list[str]:
    """The names of the model's non-trainable variables (frozen layers, batch-norm statistics)."""
    if _is_keras(model):
        return [
            getattr(v, "path", None) or v.name.split(":")[0] for v in model.non_trainable_variables
        ]
    found = model._flatten(
        predicate=lambda v: isinstance(v, tf.Variable) and not v.trainable, with_path=True
    )
    return ["/".join(map(str, path)) for path, _ in found]


class ShapeSpecializedFunction:
    """A ``tf.function`` with exact-shape traces for the first few shapes, then one relaxed trace.

    A graph traced for exact shapes runs faster than a shape-relaxed one
    (``docs/benchmarks.md``, "What the numbers led to"), so the first
    ``max_exact`` distinct input shapes (typically the full batch, the partial
    last batch, and a few HVP block widths) each get their own trace; any
    further shape goes to a single shape-relaxed trace. At most
    ``max_exact + 1`` traces, whatever the number of shapes.
    """

    def __init__(self, fn: Callable[..., Any], max_exact: int = 4):
        self._exact = tf.function(fn)
        self._relaxed = tf.function(fn, reduce_retracing=True)
        self._relaxed_traced = False
        self._shapes: set[tuple[Any, ...]] = set()
        self._max_exact = max_exact

    def __call__(self, *args: Any) -> Any:
        key = tuple(tuple(t.shape) for t in tf.nest.flatten(args))
        if key in self._shapes or len(self._shapes) < self._max_exact:
            self._shapes.add(key)
            return self._exact(*args)
        if not self._relaxed_traced:  # trace once with every dimension unknown
            specs = tf.nest.map_structure(
                lambda t: tf.TensorSpec([None] * t.shape.rank, t.dtype), args
            )
            self._relaxed.get_concrete_function(*specs)
            self._relaxed_traced = True
        return self._relaxed(*args)

    def tracing_count(self) -> int:
        return sum(f.experimental_get_tracing_count() for f in (self._exact, self._relaxed))


class TensorFlowKernels(ModelKernels):
    """Kernels for a Keras model / ``tf.Module`` and a per-sample loss ``loss_fn(y_true, y_pred)``."""

    backend_name = "tensorflow"

    def __init__(
        self,
        model: Any,
        loss_fn: Callable[..., Any],
        parameters: str | Sequence[str] | None,
        *,
        call_kwargs: Mapping[str, Any] | None = None,
        output: OutputSelector = None,
    ):
        """``call_kwargs`` (an ``InfluenceModel(options=)`` entry): keywords for every model call.

        Keras models are called with ``training=False`` unless ``call_kwargs`` says otherwise.
        ``output`` (``InfluenceModel(output=)``): which of the model's outputs
        (a multi-output model's list or dict) the loss reads
        (:func:`~influence_core.plugin.select_output`).
        """
        variables, names = trainable_variables_with_names(model)
        if not variables:
            raise ValueError(
                "the model has no trainable variables; build it first (call it on a batch, "
                "or give keras.Input a shape)"
            )
        self._all_names = tuple(names)
        chosen = select_parameters(self._all_names, parameters, "/", frozen=frozen_names(model))
        self._names = tuple(self._all_names[i] for i in chosen)
        # Keras 3 wraps each tf.Variable; tapes need the tf.Variable itself.
        self._vars = [
            v if isinstance(v, tf.Variable) else v.value for v in (variables[i] for i in chosen)
        ]
        dtypes = {tf.as_dtype(v.dtype) for v in self._vars}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating:
            raise TypeError(
                f"the selected variables must share one floating dtype, got {sorted(map(str, dtypes))}; "
                "build the model with dtype='float64' (or 'float32') on every layer"
            )
        self._dtype = next(iter(dtypes))
        self._layout = ParameterLayout(
            self._names, tuple(tuple(int(s) for s in v.shape) for v in self._vars), self._dtype
        )
        self._shapes, self._sizes = self._layout.shapes, list(self._layout.sizes)
        self.model = model
        self.loss_fn = loss_fn
        self._keras = _is_keras(model)
        self._call_kwargs = {**({"training": False} if self._keras else {}), **(call_kwargs or {})}
        self._output = check_output_selector(output)
        self._grad_fn = ShapeSpecializedFunction(self._grad_graph)
        self._per_sample_grads_fn = ShapeSpecializedFunction(self._per_sample_grads_graph)
        self._per_sample_grads_and_finite_fn = ShapeSpecializedFunction(
            self._per_sample_grads_and_finite_graph
        )
        self._hvp_fn = ShapeSpecializedFunction(self._hvp_graph)
        self._ggn_fn = ShapeSpecializedFunction(self._ggn_graph)
        self._loss_jvp_fn = ShapeSpecializedFunction(self._loss_jvp_graph)
        self._measurement_fns: dict[int, tuple[Any, ShapeSpecializedFunction]] = {}
        self._all_variables = variables
        self._head: tuple[str, Any, Any] | None = None
        self._layer_stats: LayerStatistics | None = None

    # -- description --------------------------------------------------------------
    @property
    def xp(self) -> Any:
        return namespace

    @property
    def layout(self) -> ParameterLayout:
        return self._layout

    # -- θ ------------------------------------------------------------------------
    def get_flat_parameters(self) -> tf.Tensor:
        return tf.concat([tf.reshape(v, [-1]) for v in self._vars], axis=0)

    def set_flat_parameters(self, flat: tf.Tensor) -> None:
        for v, chunk, shape in zip(
            self._vars, tf.split(flat, self._sizes), self._shapes, strict=True
        ):
            v.assign(tf.reshape(chunk, shape))

    # -- traced functions ---------------------------------------------------------
    def _call(self, inputs: Any) -> Any:
        return select_output(self.model(inputs, **self._call_kwargs), self._output)

    def _flat(self, grads: Sequence[tf.Tensor | None], leading: Any = None) -> tf.Tensor:
        """Concatenate per-variable results (optionally with a leading axis) into one flat axis.

        A selected variable the loss does not depend on has gradient ``None``;
        it becomes zeros here, at trace time, which is cheaper than asking the
        tape for ``unconnected_gradients="zero"``.
        """
        prefix = [] if leading is None else [leading]
        parts = [
            tf.reshape(
                tf.zeros([*prefix, *v.shape], self._dtype) if g is None else g, [*prefix, -1]
            )
            for g, v in zip(grads, self._vars, strict=True)
        ]
        return tf.concat(parts, axis=len(prefix))

    def _grad_graph(self, inputs: Any, targets: Any) -> tf.Tensor:
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(self._vars)
            loss = tf.reduce_mean(self.loss_fn(targets, self._call(inputs)))
        return self._flat(tape.gradient(loss, self._vars))

    def _per_sample_grads_graph(self, inputs: Any, targets: Any) -> tf.Tensor:
        def one_sample(sample: Any) -> tf.Tensor:
            x, y = sample
            x = tf.nest.map_structure(lambda t: t[tf.newaxis], x)
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(self._vars)
                loss = tf.reduce_sum(self.loss_fn(y[tf.newaxis], self._call(x)))
            return self._flat(tape.gradient(loss, self._vars))

        return tf.vectorized_map(one_sample, (inputs, targets))

    def _per_sample_grads_and_finite_graph(self, inputs: Any, targets: Any) -> Any:
        # The check in the same graph: no eager dispatch of a separate reduction.
        grads = self._per_sample_grads_graph(inputs, targets)
        return grads, tf.math.is_finite(tf.reduce_sum(grads))

    def _hvp_graph(self, inputs: Any, targets: Any, vectors: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape(watch_accessed_variables=False) as outer:
            outer.watch(self._vars)
            with tf.GradientTape(watch_accessed_variables=False) as inner:
                inner.watch(self._vars)
                loss = tf.reduce_mean(self.loss_fn(targets, self._call(inputs)))
            g = self._flat(inner.gradient(loss, self._vars))
            projections = tf.linalg.matvec(vectors, g, transpose_a=True)  # (k,) = Vᵀ g
        jacobians = outer.jacobian(projections, self._vars)  # each (k, *shape)
        return tf.transpose(self._flat(jacobians, leading=tf.shape(vectors)[1]))

    def _loss_jvp_graph(self, inputs: Any, targets: Any, vectors: tf.Tensor) -> tf.Tensor:
        # J V for J = ∂ℓ/∂θ (b, d) by the double-vjp identity J v = ∂/∂u ⟨Jᵀu, v⟩ (u a dummy
        # cotangent over the b losses): no (b, d) block, pfor over the k projections.
        with tf.GradientTape() as outer:
            with tf.GradientTape(watch_accessed_variables=False) as inner:
                inner.watch(self._vars)
                losses = self.loss_fn(targets, self._call(inputs))
            dummy = tf.zeros_like(losses)
            outer.watch(dummy)
            pulled = self._flat(inner.gradient(losses, self._vars, output_gradients=dummy))
            projections = tf.linalg.matvec(vectors, pulled, transpose_a=True)  # (k,)
        return tf.transpose(outer.jacobian(projections, dummy))  # (b, k)

    def _ggn_graph(self, inputs: Any, targets: Any, vectors: tf.Tensor) -> tf.Tensor:
        # J V by the double-vjp identity J v = ∂/∂u ⟨Jᵀu, v⟩ (u a dummy cotangent, pfor over
        # the k columns), H_out (J v) below, then Jᵀ(H J v) as the Jacobian of k projections.
        outputs = self._call(inputs)
        b = tf.shape(outputs)[0]
        with tf.GradientTape() as outer:
            dummy = tf.zeros_like(outputs)
            outer.watch(dummy)
            with tf.GradientTape(watch_accessed_variables=False) as inner:
                inner.watch(self._vars)
                again = self._call(inputs)
            pulled = self._flat(inner.gradient(again, self._vars, output_gradients=dummy))
            projections = tf.linalg.matvec(vectors, pulled, transpose_a=True)  # (k,)
        jv = tf.stop_gradient(outer.jacobian(projections, dummy))  # (k, *outputs.shape)
        k = tf.shape(vectors)[1]
        # H_out (J v) by reverse over reverse on the summed loss: its Hessian in Φ is
        # symmetric and block-diagonal over samples, and no (b, c, c) Hessian is formed.
        held = tf.stop_gradient(outputs)
        with tf.GradientTape() as second:
            second.watch(held)
            with tf.GradientTape() as first:
                first.watch(held)
                total = tf.reduce_sum(self.loss_fn(targets, held))
            along = tf.reduce_sum(
                tf.reshape(first.gradient(total, held)[tf.newaxis] * jv, [k, -1]), 1
            )
        hjv = tf.stop_gradient(second.jacobian(along, held) / tf.cast(b, self._dtype))
        with tf.GradientTape(watch_accessed_variables=False) as last:
            last.watch(self._vars)
            final = self._call(inputs)
            weighted = tf.reduce_sum(
                tf.reshape(final[tf.newaxis] * hjv, [tf.shape(vectors)[1], -1]), axis=1
            )  # (k,): ⟨Φ, H J v_k⟩
        jacobians = last.jacobian(weighted, self._vars)  # each (k, *shape)
        return tf.transpose(self._flat(jacobians, leading=tf.shape(vectors)[1]))

    # -- kernels ------------------------------------------------------------------
    def per_sample_loss(self, inputs: Any, targets: Any) -> tf.Tensor:
        return self.loss_fn(targets, self._call(inputs))

    def mean_loss_grad(self, inputs: Any, targets: Any) -> tf.Tensor:
        return self._grad_fn(inputs, targets)

    def per_sample_grads(self, inputs: Any, targets: Any) -> tf.Tensor:
        return self._per_sample_grads_fn(inputs, targets)

    def per_sample_grads_and_finite(self, inputs: Any, targets: Any) -> tuple[tf.Tensor, bool]:
        grads, finite = self._per_sample_grads_and_finite_fn(inputs, targets)
        return grads, bool(finite)

    def mean_loss_hvp(self, inputs: Any, targets: Any, vectors: tf.Tensor) -> tf.Tensor:
        return self._hvp_fn(inputs, targets, vectors)

    def mean_loss_ggn_vp(self, inputs: Any, targets: Any, vectors: tf.Tensor) -> tf.Tensor:
        return self._ggn_fn(inputs, targets, vectors)

    def per_sample_loss_jvp(self, inputs: Any, targets: Any, vectors: tf.Tensor) -> tf.Tensor:
        return self._loss_jvp_fn(inputs, targets, vectors)

    # -- data ---------------------------------------------------------------------
    def as_native(self, array: Any, *, floating: bool | None = None) -> tf.Tensor:
        tensor = (
            array.read_value() if isinstance(array, tf.Variable) else tf.convert_to_tensor(array)
        )
        if floating or (floating is None and tensor.dtype.is_floating):
            tensor = tf.cast(tensor, self._dtype)
        return tensor

    def to_numpy(self, array: tf.Tensor) -> Any:
        return array.numpy()

    def native_batches(self, data: Any, batch_size: int) -> Iterator[Any] | None:
        return native_batches(data, batch_size)

    def native_batch_count(self, data: Any, batch_size: int) -> int | None:
        return native_batch_count(data, batch_size)

    # -- checkpoints --------------------------------------------------------------
    def _weights(self) -> list[Any]:
        return list(self.model.weights) if self._keras else list(self.model.variables)

    def save_state(self) -> list[Any]:
        return [v.numpy() for v in self._weights()]

    checkpoint_suffix = ".weights.h5"

    def save_checkpoint(self, path: str) -> None:
        if not self._keras:
            raise TypeError(
                "saving a tf.Module checkpoint to a file is not supported; use save_state"
            )
        self.model.save_weights(os.fspath(path))

    def load_checkpoint(self, checkpoint: Any) -> None:
        """A list of arrays (``model.get_weights()`` order), or a file ``model.load_weights`` reads."""
        if isinstance(checkpoint, str | os.PathLike):
            if not self._keras:
                raise TypeError("a tf.Module checkpoint must be a list of arrays, one per variable")
            self.model.load_weights(os.fspath(checkpoint))
            return
        weights = self._weights()
        if not isinstance(checkpoint, list | tuple) or len(checkpoint) != len(weights):
            raise TypeError(
                f"a TensorFlow checkpoint is a list of {len(weights)} arrays (model.get_weights()) "
                f"or a weights file path, got {type(checkpoint).__name__}"
            )
        for variable, value in zip(weights, checkpoint, strict=True):
            if tuple(variable.shape) != tuple(value.shape):
                raise ValueError(
                    f"checkpoint array of shape {tuple(value.shape)} for variable "
                    f"{getattr(variable, 'path', variable.name)} of shape {tuple(variable.shape)}"
                )
            variable.assign(value)

    # -- layer-wise statistics ----------------------------------------------------
    def _layer_statistics_of(self) -> LayerStatistics:
        if self._layer_stats is None:
            if not self._keras:
                raise self._unsupported("layers for a plain tf.Module (Keras models only)")
            self._layer_stats = LayerStatistics(self.model, self._names, self._vars, self._output)
        return self._layer_stats

    def layers(self) -> tuple[Layer, ...]:
        return self._layer_statistics_of().layers

    def layer_gaps(self) -> dict[str, str]:
        return self._layer_statistics_of().gaps if self._keras else {}

    def host_threads(self) -> int | None:
        threads = tf.config.threading.get_intra_op_parallelism_threads()
        return threads or None  # 0: TensorFlow's default, all cores

    def segment_sum(self, values: Any, segments: Any, count: int) -> Any:
        return tf.math.unsorted_segment_sum(values, tf.convert_to_tensor(segments), count)

    def layer_statistics(
        self, inputs: Any, targets: Any, measurement: Any = None
    ) -> dict[str, tuple[Any, Any]]:
        if measurement is None:
            return self._layer_statistics_of()(self.loss_fn, inputs, targets)
        # Keras losses take (targets, outputs); a measurement takes (outputs, targets).
        return self._layer_statistics_of()(
            lambda y, outputs: measurement(outputs, y), inputs, targets
        )

    def layer_statistics_deferred(
        self, inputs: Any, targets: Any, measurement: Any = None
    ) -> dict[str, tuple[Any, Any]]:
        statistics = self._layer_statistics_of()
        if measurement is None:
            return statistics(self.loss_fn, inputs, targets, defer=True)
        return statistics(lambda y, outputs: measurement(outputs, y), inputs, targets, defer=True)

    def conv2d_patches(self, layer: Layer, x: Any) -> Any:
        return self._layer_statistics_of().conv2d_patches(layer, x)

    def conv2d_map(self, layer: Layer, x: Any, kernels: Any) -> Any:
        return self._layer_statistics_of().conv2d_map(layer, x, kernels)

    # -- the last linear layer ----------------------------------------------------
    def _flat_layers(self, layer: Any) -> Iterator[Any]:
        for child in getattr(layer, "layers", []):
            if getattr(child, "layers", None):
                yield from self._flat_layers(child)
            else:
                yield child

    def _last_dense(self) -> tuple[str, Any, Any]:
        """(selector, Dense layer, feature extractor), found once."""
        if self._head is not None:
            return self._head
        if not self._keras:
            raise ValueError("representer points need a Keras model; got a plain tf.Module")
        layers = [
            layer
            for layer in self._flat_layers(self.model)
            if any(c.__name__ == "Dense" for c in type(layer).__mro__)
        ]
        if not layers:
            raise ValueError("representer points need a Keras model ending in a Dense layer")
        dense = layers[-1]
        activation = getattr(dense.activation, "__name__", str(dense.activation))
        if activation != "linear":
            raise ValueError(
                f"the last Dense layer '{dense.name}' applies '{activation}'; representer points "
                "need linear outputs (activation=None, with from_logits=True in the loss)"
            )
        kernel = dense.kernel.value if hasattr(dense.kernel, "value") else dense.kernel
        index = next(
            i
            for i, v in enumerate(self._all_variables)
            if (v.value if hasattr(v, "value") else v) is kernel
        )
        selector = self._all_names[index].rpartition("/")[0]
        keras = importlib.import_module(type(self.model).__module__.split(".")[0])
        try:
            extractor = keras.Model(self.model.inputs, dense.input)
        except (AttributeError, ValueError, TypeError) as error:
            raise ValueError(
                "cannot reach the input of the last Dense layer: build the model with "
                f"keras.Input (Sequential or functional), not by subclassing ({error})"
            ) from error
        self._head = (selector, dense, extractor)
        return self._head

    def last_layer(self) -> LastLayer:
        selector, dense, _ = self._last_dense()
        bias = tf.identity(dense.bias) if dense.use_bias else None
        return LastLayer(selector, tf.identity(dense.kernel), bias)

    def penultimate_features(self, inputs: Any) -> tf.Tensor:
        _, dense, extractor = self._last_dense()
        features = extractor(inputs, training=False)
        outputs = self._call(inputs)
        finite = tf.reduce_all(
            tf.math.is_finite(tf.reshape(outputs, [tf.shape(outputs)[0], -1])), 1
        )
        if not bool(tf.reduce_all(finite)):
            bad = tf.reshape(tf.where(tf.logical_not(finite)), [-1]).numpy().tolist()
            raise NonFiniteGradientError("model outputs", bad, outputs=True)
        if features.shape.rank != 2:
            raise ValueError(
                f"the last Dense layer '{dense.name}' sees inputs of shape {features.shape}; "
                "representer points need one feature vector per sample, shape (b, p)"
            )
        head = tf.matmul(features, dense.kernel)
        if dense.use_bias:
            head = head + dense.bias
        scale = 1.0 + tf.reduce_max(tf.abs(outputs))
        if head.shape != outputs.shape or float(tf.reduce_max(tf.abs(head - outputs))) > (
            1e-5 * float(scale)
        ):
            raise ValueError(
                f"the model's outputs are not those of its last Dense layer '{dense.name}': "
                "representer points need Φ(x) = f(x) W + b as the model's output (no layer "
                "after it)"
            )
        return features

    def outputs(self, inputs: Any) -> tf.Tensor:
        return self._call(inputs)

    def output_loss_grads(self, outputs: Any, targets: Any) -> tuple[tf.Tensor, tf.Tensor]:
        outputs = tf.convert_to_tensor(outputs)
        with tf.GradientTape() as tape:
            tape.watch(outputs)
            losses = self.loss_fn(targets, outputs)
            total = tf.reduce_sum(losses)
        # Per-sample losses are separable, so one gradient of their sum gives every row.
        return losses, tape.gradient(total, outputs)

    def output_loss_hessians(self, outputs: Any, targets: Any) -> tf.Tensor:
        outputs = tf.convert_to_tensor(outputs)
        with tf.GradientTape() as outer:
            outer.watch(outputs)
            with tf.GradientTape() as inner:
                inner.watch(outputs)
                total = tf.reduce_sum(self.loss_fn(targets, outputs))
            grads = inner.gradient(total, outputs)
        # Row i of the gradient depends on row i of the outputs only.
        return outer.batch_jacobian(grads, outputs)

    def _measurement_graph(self, measurement: Callable[[Any, Any], Any]) -> Callable[..., Any]:
        def per_sample(inputs: Any, targets: Any) -> tf.Tensor:
            def one_sample(sample: Any) -> tf.Tensor:
                x, y = sample
                x = tf.nest.map_structure(lambda t: t[tf.newaxis], x)
                with tf.GradientTape(watch_accessed_variables=False) as tape:
                    tape.watch(self._vars)
                    value = tf.reduce_sum(measurement(self._call(x), y[tf.newaxis]))
                return self._flat(tape.gradient(value, self._vars))

            return tf.vectorized_map(one_sample, (inputs, targets))

        return per_sample

    def per_sample_measurement_grads(
        self, inputs: Any, targets: Any, measurement: Callable[[Any, Any], Any]
    ) -> tf.Tensor:
        # One reused tf.function per measurement function (the core passes the same object).
        key = id(measurement)
        if key not in self._measurement_fns:
            self._measurement_fns[key] = (
                measurement,
                ShapeSpecializedFunction(self._measurement_graph(measurement)),
            )
        return self._measurement_fns[key][1](inputs, targets)
