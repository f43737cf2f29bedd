"""JAX kernels of the autodiff protocol: ``jit(vmap(grad))`` per-sample gradients, forward-over-reverse HVPs.

The backend is **functional** (``functional = True``): the core never writes
into the user's model. Other weights (``InfluenceModel.parameters_set_to``,
``checkpoint_loaded``, TracIn's checkpoints) are new kernels holding those
weights as values (:meth:`JaxKernels.with_parameters`,
:meth:`JaxKernels.with_checkpoint`), sharing the compiled functions. Kernels
not bound to other weights read the model **live** on every call (the current
values of the module's own ``nnx.Variable`` objects, or the ``params`` of a
:class:`Functional`), never captured when they are built: an optimizer step
that updates an nnx module in place is seen at once. An ``nnx`` module is always called in inference mode: the
kernels use the graph of an ``eval()``-mode clone (dropout off, batch norm on
its running statistics) with the module's live state, and the user's module
keeps its own mode. (Replacing a layer *object* of an nnx module after
wrapping it is not seen: wrap the model again.)

Each kernel is one ``jax.jit``-compiled function, traced once per input shape.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from influence_core.plugin import (
    LastLayer,
    Layer,
    ModelKernels,
    OutputSelector,
    ParameterLayout,
    check_output_selector,
    select_output,
    select_parameters,
)

from .layers import conv2d_map, layer_gaps, patches, recording_graph, statistics_function

__all__ = ["Functional", "JaxKernels"]


@dataclass(frozen=True)
class Functional:
    """A pure JAX model: ``apply_fn(params, inputs) -> outputs`` and its ``params`` pytree.

    Immutable, as JAX values are: the weights of an ``InfluenceModel`` built on
    it are ``params``; other weights (``parameters_set_to``, checkpoints,
    TracIn) are bound as values inside the core and never written here. After
    training further, wrap ``Functional(apply_fn, new_params)``.
    """

    apply_fn: Callable[[Any, Any], Any]
    params: Any


def _key_name(key: Any) -> str | None:
    for attribute in ("key", "idx", "name"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def _path_name(path: Sequence[Any]) -> str:
    parts = [_key_name(k) for k in path]
    if len(parts) > 1 and parts[-1] == "value":  # an nnx Variable's array
        parts = parts[:-1]
    return "/".join(p for p in parts if p)


def _natural(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


_ARRAY = type(jnp.zeros(()))


def _read(variable: Any, plain: bool) -> Any:
    """The current value of an nnx ``Variable``: its raw array when that is all it is.

    ``get_value()`` copies through ``tree_map`` and checks for references and
    hooks (about 40 µs per variable here); the raw value of a hook-free variable
    holding a plain array is the same array.
    """
    if plain:
        raw = variable.get_raw_value()
        if type(raw) is _ARRAY:
            return raw
    return variable.get_value()


def _canonical_order(names: Sequence[str]) -> tuple[int, ...]:
    """Layers in (natural) name order, each layer's kernel before its bias."""

    def key(i: int) -> tuple[Any, ...]:
        layer, _, leaf = names[i].rpartition("/")
        return (_natural(layer), 0 if leaf in ("kernel", "embedding") else 1, leaf)

    return tuple(sorted(range(len(names)), key=key))


class JaxKernels(ModelKernels):
    """Kernels for a ``flax.nnx.Module`` or a :class:`Functional`, loss ``loss_fn(outputs, targets)``."""

    backend_name = "jax"
    functional = True
    checkpoint_suffix = ".npz"

    def __init__(
        self,
        model: Any,
        loss_fn: Any,
        parameters: str | Sequence[str] | None,
        *,
        call_kwargs: dict[str, Any] | None = None,
        output: OutputSelector = None,
    ) -> None:
        """``call_kwargs`` (an ``InfluenceModel(options=)`` entry): keywords for every model call.

        For example ``{"deterministic": True}`` for a module that takes it. ``output``
        (``InfluenceModel(output=)``): which of the model's outputs (a tuple or dict)
        the loss reads (:func:`~influence_core.plugin.select_output`).
        """
        self.model = model
        self.loss_fn = loss_fn
        self._call_kwargs = dict(call_kwargs or {})
        self._output = check_output_selector(output)
        self._bound: tuple[Any, Any] | None = None  # (params, rest) as values, or None: live
        self._layer_kernels: tuple[tuple[Layer, ...], Any, dict] | None = None
        self._functional = isinstance(model, Functional)
        if not self._functional:
            from flax import nnx

            if not isinstance(model, nnx.Module):
                raise TypeError(
                    f"the jax backend needs a flax.nnx.Module or influence_jax.Functional, got "
                    f"{type(model).__name__}"
                )
            inference = nnx.clone(model)
            inference.eval()  # static flags (dropout, batch norm) live in the graph definition
            self._graphdef = nnx.split(inference, nnx.Param, ...)[0]
            self._inference = inference
            # The module's own Variable objects, in the order of its state's leaves: reading
            # their values at each call is live (nnx.update writes into them) and about 5x
            # cheaper than nnx.split.
            _, params, rest = nnx.split(model, nnx.Param, ...)
            variables = {
                tuple(path): node
                for path, node in nnx.iter_graph(model)
                if isinstance(node, nnx.Variable)
            }

            def in_order(state: Any) -> tuple[list[Any], Any]:
                flat, treedef = jax.tree_util.tree_flatten_with_path(state)
                keys = [
                    tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path[:-1])
                    for path, _ in flat
                ]
                # (variable, whether its raw value may be read directly: no get hooks)
                chosen = [variables[key] for key in keys]
                return [(v, v.get_metadata("on_get_value", None) is None) for v in chosen], treedef

            self._param_variables, self._param_treedef = in_order(params)
            self._rest_variables, self._rest_treedef = in_order(rest)
            params = jax.tree_util.tree_unflatten(
                self._param_treedef, [_read(v, plain) for v, plain in self._param_variables]
            )
        else:
            params = model.params
        flat, self._treedef = jax.tree_util.tree_flatten_with_path(params)
        if not flat:
            raise ValueError("the model has no parameters")
        self._all_names = tuple(_path_name(path) for path, _ in flat)
        if len(set(self._all_names)) != len(self._all_names):
            raise ValueError(f"parameter names are not unique: {self._all_names}")
        self._selected = select_parameters(self._all_names, parameters, "/")
        leaves = [leaf for _, leaf in flat]
        chosen = [leaves[i] for i in self._selected]
        dtypes = {jnp.dtype(leaf.dtype) for leaf in chosen}
        if len(dtypes) != 1 or not jnp.issubdtype(next(iter(dtypes)), jnp.floating):
            raise TypeError(
                f"the selected parameters must share one floating dtype, got {sorted(map(str, dtypes))}"
            )
        names = tuple(self._all_names[i] for i in self._selected)
        self._layout = ParameterLayout(
            names,
            tuple(tuple(int(s) for s in leaf.shape) for leaf in chosen),
            next(iter(dtypes)),
            canonical_order=_canonical_order(names),
        )
        self._dtype, self._shapes = self._layout.dtype, self._layout.shapes
        self._sizes = list(self._layout.sizes)
        self._build()

    # -- the live parameters ----------------------------------------------------------
    def _live(self) -> tuple[list[Any], list[Any]]:
        """(the parameter leaves, the leaves of the rest of the state): bound, or read now.

        Leaves, not pytrees: the compiled functions rebuild the pytrees at trace
        time, so a call flattens plain lists (an nnx ``State`` flattens in Python).
        """
        if self._bound is not None:
            return self._bound
        if self._functional:
            return jax.tree_util.tree_leaves(self.model.params), []
        return (
            [_read(v, plain) for v, plain in self._param_variables],
            [_read(v, plain) for v, plain in self._rest_variables],
        )

    def _params(self, leaves: list[Any]) -> Any:
        return jax.tree_util.tree_unflatten(self._treedef, leaves)

    def _bind(self, leaves: list[Any]) -> JaxKernels:
        """These kernels (sharing the compiled functions) at the parameter ``leaves``, as values."""
        bound = copy.copy(self)
        bound._bound = (list(leaves), self._live()[1])
        return bound

    def _apply(self, params: Any, rest: list[Any], inputs: Any) -> Any:
        """Φ(x): the model's output the loss reads (``output=``, :func:`select_output`)."""
        if self._functional:
            return select_output(
                self.model.apply_fn(params, inputs, **self._call_kwargs), self._output
            )
        from flax import nnx

        state = jax.tree_util.tree_unflatten(self._rest_treedef, rest)
        outputs = nnx.merge(self._graphdef, params, state)(inputs, **self._call_kwargs)
        return select_output(outputs, self._output)

    # -- the compiled kernels ------------------------------------------------------------
    def _build(self) -> None:
        selected, treedef = self._selected, self._treedef

        def full(theta: list[Any], leaves: list[Any]) -> Any:
            leaves = list(leaves)
            for i, value in zip(selected, theta, strict=True):
                leaves[i] = value
            return jax.tree_util.tree_unflatten(treedef, leaves)

        def losses(theta, leaves, rest, x, y):
            return self.loss_fn(self._apply(full(theta, leaves), rest, x), y)

        def one(x: Any) -> Any:
            return jax.tree_util.tree_map(lambda t: t[None], x)

        def mean_loss(theta, leaves, rest, x, y):
            return jnp.mean(losses(theta, leaves, rest, x, y))

        def sample_loss(theta, leaves, rest, x, y):
            return jnp.sum(losses(theta, leaves, rest, one(x), one(y)))

        def flatten(grads: list[Any], leading: tuple[int, ...] = ()) -> Any:
            return jnp.concatenate([g.reshape(*leading, -1) for g in grads], axis=len(leading))

        def unflatten(flat: Any) -> list[Any]:
            pieces = jnp.split(flat, np.cumsum(self._sizes)[:-1])
            return [p.reshape(s) for p, s in zip(pieces, self._shapes, strict=True)]

        def per_sample_grads(theta, leaves, rest, x, y):
            grads = jax.vmap(jax.grad(sample_loss), in_axes=(None, None, None, 0, 0))(
                theta, leaves, rest, x, y
            )
            return flatten(grads, (jax.tree_util.tree_leaves(y)[0].shape[0],))

        def mean_loss_grad(theta, leaves, rest, x, y):
            return flatten(jax.grad(mean_loss)(theta, leaves, rest, x, y))

        def hvp(theta, leaves, rest, x, y, vectors):
            flat = flatten(theta)

            def gradient(f: Any) -> Any:
                return flatten(jax.grad(mean_loss)(unflatten(f), leaves, rest, x, y))

            def column(v: Any) -> Any:
                return jax.jvp(gradient, (flat,), (v,))[1]

            return jax.vmap(column, in_axes=1, out_axes=1)(vectors)

        def ggn(theta, leaves, rest, x, y, vectors):
            flat = flatten(theta)

            def outputs_of(f: Any) -> Any:
                return self._apply(full(unflatten(f), leaves), rest, x)

            outputs, vjp_fn = jax.vjp(outputs_of, flat)
            b = outputs.shape[0]
            # H_out (J v) as a jvp of ∂ℓ/∂Φ: the summed loss's Hessian in Φ is block-diagonal
            # over samples, and no (b, c, c) Hessian is formed.
            output_grad = jax.grad(lambda o: jnp.sum(self.loss_fn(o, y)))

            def column(v: Any) -> Any:
                jv = jax.jvp(outputs_of, (flat,), (v,))[1]
                return vjp_fn(jax.jvp(output_grad, (outputs,), (jv,))[1] / b)[0]

            return jax.vmap(column, in_axes=1, out_axes=1)(vectors)

        def loss_jvp(theta, leaves, rest, x, y, vectors):
            flat = flatten(theta)

            def column(v: Any) -> Any:  # forward mode through the per-sample losses
                return jax.jvp(lambda f: losses(unflatten(f), leaves, rest, x, y), (flat,), (v,))[1]

            return jax.vmap(column, in_axes=1, out_axes=1)(vectors)

        self._ggn = jax.jit(ggn)
        self._loss_jvp = jax.jit(loss_jvp)
        self._losses = jax.jit(losses)
        # The NaN check stays the core's one reduction: folded into this jit (sums of the
        # per-parameter gradients) it made XLA's CPU float64 kernel 4x slower
        # (docs/benchmarks.md, "What the numbers led to").
        self._per_sample_grads = jax.jit(per_sample_grads)
        self._mean_loss_grad = jax.jit(mean_loss_grad)
        self._hvp = jax.jit(hvp)
        self._outputs = jax.jit(lambda leaves, rest, x: self._apply(self._params(leaves), rest, x))

        def output_loss(o: Any, y: Any) -> Any:  # ℓ of one sample at the outputs o
            return jnp.sum(self.loss_fn(o[None], y[None]))

        self._output_grads = jax.jit(jax.vmap(jax.value_and_grad(output_loss)))
        self._output_hessians = jax.jit(jax.vmap(jax.hessian(output_loss)))
        self._flatten, self._one = flatten, one
        self._sample_full = full
        self._measurement_fns: dict[int, tuple[Any, Any]] = {}

    def _state(self) -> tuple[list[Any], list[Any], list[Any]]:
        """(θ as leaves, every parameter leaf, the leaves of the rest of the state)."""
        leaves, rest = self._live()
        return [leaves[i] for i in self._selected], list(leaves), rest

    # -- description ---------------------------------------------------------------------
    @property
    def xp(self) -> Any:
        return jnp

    @property
    def layout(self) -> ParameterLayout:
        return self._layout

    # -- θ -------------------------------------------------------------------------------
    def get_flat_parameters(self) -> Any:
        theta, _, _ = self._state()
        return jnp.concatenate([t.reshape(-1) for t in theta])

    def with_parameters(self, flat: Any) -> JaxKernels:
        _, leaves, _ = self._state()
        pieces = jnp.split(jnp.asarray(flat, self._dtype), np.cumsum(self._sizes)[:-1])
        for i, piece, shape in zip(self._selected, pieces, self._shapes, strict=True):
            leaves[i] = piece.reshape(shape)
        return self._bind(leaves)

    # -- kernels on one batch --------------------------------------------------------------
    def per_sample_loss(self, inputs: Any, targets: Any) -> Any:
        theta, leaves, rest = self._state()
        return self._losses(theta, leaves, rest, inputs, targets)

    def mean_loss_grad(self, inputs: Any, targets: Any) -> Any:
        theta, leaves, rest = self._state()
        return self._mean_loss_grad(theta, leaves, rest, inputs, targets)

    def per_sample_grads(self, inputs: Any, targets: Any) -> Any:
        theta, leaves, rest = self._state()
        return self._per_sample_grads(theta, leaves, rest, inputs, targets)

    def mean_loss_hvp(self, inputs: Any, targets: Any, vectors: Any) -> Any:
        theta, leaves, rest = self._state()
        return self._hvp(theta, leaves, rest, inputs, targets, vectors)

    # -- layer-wise statistics (K-FAC, EK-FAC) ---------------------------------------------
    def _layer_statistics_kernel(
        self, measurement: Any = None, *, defer: bool = False
    ) -> tuple[tuple[Layer, ...], Any]:
        """(layers, jitted statistics function) for the loss or one measurement, built once each
        (and once more with convolutions deferred, ``defer``)."""
        if self._layer_kernels is None:
            if self._functional:
                raise self._unsupported(
                    "layers for a Functional model, which has no layer objects to record "
                    "(use a flax.nnx module)"
                )
            from flax import nnx

            layers, graphdef, modules = recording_graph(self._inference, self.layout.names)
            covered = {layer.kernel for layer in layers} | {layer.bias for layer in layers}
            # Every other selected parameter (used directly, or of a module of no kind the
            # recording knows): a "parameter" layer, its per-sample gradients vmapped.
            layers += tuple(
                Layer(name, "parameter", name, None, 1, size)
                for name, size in zip(self.layout.names, self._sizes, strict=True)
                if name not in covered
            )

            def apply(leaves: Any, rest: Any, x: Any) -> Any:
                state = jax.tree_util.tree_unflatten(self._rest_treedef, rest)
                outputs = nnx.merge(graphdef, self._params(leaves), state)(x, **self._call_kwargs)
                return select_output(outputs, self._output)

            self._layer_kernels = (layers, (modules, apply), {})
        layers, (modules, apply), functions = self._layer_kernels
        key = (None if measurement is None else id(measurement), defer)
        if key not in functions:
            target = self.loss_fn if measurement is None else measurement
            hooked = [layer for layer in layers if layer.kind != "parameter"]
            generic = [layer for layer in layers if layer.kind == "parameter"]
            recorded = (
                statistics_function(hooked, modules, apply, target, defer=defer) if hooked else None
            )
            direct = self._parameter_statistics(generic, apply, target) if generic else None

            def both(leaves: Any, rest: Any, x: Any, y: Any) -> dict[str, tuple[Any, Any]]:
                out = {} if recorded is None else recorded(leaves, rest, x, y)
                return out if direct is None else {**out, **direct(leaves, rest, x, y)}

            # The measurement object is kept with its function, so its id stays its own.
            functions[key] = (measurement, jax.jit(both))
        return layers, functions[key][1]

    def _parameter_statistics(self, generic: list[Layer], apply: Any, target: Any) -> Any:
        """``f(leaves, rest, x, y)``: (ones, g) per ``"parameter"`` layer, g = ∇ of each sample (b, 1, p)."""
        index = dict(zip(self.layout.names, self._selected, strict=True))
        positions = [index[layer.kernel] for layer in generic]
        one = self._one

        def sample(values: list[Any], leaves: list[Any], rest: Any, x: Any, y: Any) -> Any:
            leaves = list(leaves)
            for i, value in zip(positions, values, strict=True):
                leaves[i] = value
            return jnp.sum(target(apply(leaves, rest, one(x)), one(y)))

        def stats(leaves: Any, rest: Any, x: Any, y: Any) -> dict[str, tuple[Any, Any]]:
            values = [leaves[i] for i in positions]
            grads = jax.vmap(jax.grad(sample), in_axes=(None, None, None, 0, 0))(
                values, leaves, rest, x, y
            )
            out = {}
            for layer, g in zip(generic, grads, strict=True):
                g = g.reshape(g.shape[0], 1, -1)
                out[layer.name] = (jnp.ones_like(g), g)
            return out

        return stats

    def layers(self) -> tuple[Layer, ...]:
        return self._layer_statistics_kernel()[0]

    def layer_gaps(self) -> dict[str, str]:
        if self._functional:
            return {}
        return layer_gaps(self._inference, self.layout.names, self.layers())

    def segment_sum(self, values: Any, segments: Any, count: int) -> Any:
        return jax.ops.segment_sum(values, jnp.asarray(segments), num_segments=count)

    def layer_statistics(
        self, inputs: Any, targets: Any, measurement: Any = None
    ) -> dict[str, tuple[Any, Any]]:
        _, function = self._layer_statistics_kernel(measurement)
        _, leaves, rest = self._state()
        return function(leaves, rest, inputs, targets)

    def layer_statistics_deferred(
        self, inputs: Any, targets: Any, measurement: Any = None
    ) -> dict[str, tuple[Any, Any]]:
        _, function = self._layer_statistics_kernel(measurement, defer=True)
        _, leaves, rest = self._state()
        return function(leaves, rest, inputs, targets)

    def conv2d_patches(self, layer: Layer, x: Any) -> Any:
        return patches(self._conv(layer), x)

    def conv2d_map(self, layer: Layer, x: Any, kernels: Any) -> Any:
        return conv2d_map(self._conv(layer), x, kernels)

    def _conv(self, layer: Layer) -> Any:
        """The nnx.Conv of a ``"conv2d"`` layer, as the recording found it."""
        self._layer_statistics_kernel()  # the recording, built once
        modules = self._layer_kernels[1][0]
        if layer.kind != "conv2d" or layer.name not in modules:
            raise ValueError(f"layer {layer.name!r} is a {layer.kind} layer, not a conv2d one")
        return modules[layer.name]

    def per_sample_loss_jvp(self, inputs: Any, targets: Any, vectors: Any) -> Any:
        theta, leaves, rest = self._state()
        return self._loss_jvp(theta, leaves, rest, inputs, targets, vectors)

    def mean_loss_ggn_vp(self, inputs: Any, targets: Any, vectors: Any) -> Any:
        theta, leaves, rest = self._state()
        return self._ggn(theta, leaves, rest, inputs, targets, vectors)

    def per_sample_measurement_grads(self, inputs: Any, targets: Any, measurement: Any) -> Any:
        key = id(measurement)
        if key not in self._measurement_fns:
            full, one, flatten = self._sample_full, self._one, self._flatten

            def sample(theta, leaves, rest, x, y):
                outputs = self._apply(full(theta, leaves), rest, one(x))
                return jnp.sum(measurement(outputs, one(y)))

            def grads(theta, leaves, rest, x, y):
                g = jax.vmap(jax.grad(sample), in_axes=(None, None, None, 0, 0))(
                    theta, leaves, rest, x, y
                )
                return flatten(g, (jax.tree_util.tree_leaves(y)[0].shape[0],))

            self._measurement_fns[key] = (measurement, jax.jit(grads))
        theta, leaves, rest = self._state()
        return self._measurement_fns[key][1](theta, leaves, rest, inputs, targets)

    def outputs(self, inputs: Any) -> Any:
        _, leaves, rest = self._state()
        return self._outputs(leaves, rest, inputs)

    # -- data ----------------------------------------------------------------------------
    def as_native(self, array: Any, *, floating: bool | None = None) -> Any:
        if type(array) is _ARRAY:  # already native and immutable: no copy (asarray costs 80 µs)
            if array.dtype == self._dtype or floating is False:
                return array
            if floating is None and array.dtype.kind != "f":
                return array  # integer targets keep their dtype
        value = jnp.asarray(array)
        wants_float = floating or (floating is None and jnp.issubdtype(value.dtype, jnp.floating))
        if wants_float and value.dtype != self._dtype:
            value = value.astype(self._dtype)
        return value

    def to_numpy(self, array: Any) -> Any:
        return np.asarray(array)

    def native_batches(self, data: Any, batch_size: int) -> Iterator[Any] | None:
        return None  # JAX has no dataset type: arrays, lists of batches, any iterable

    # -- checkpoints ---------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        leaves, _ = self._live()  # arrays are immutable: a copy
        return dict(zip(self._all_names, leaves, strict=True))

    def save_checkpoint(self, path: str) -> None:
        with open(os.fspath(path), "wb") as handle:
            np.savez(handle, **{k: np.asarray(v) for k, v in self.save_state().items()})

    def _checkpoint_leaves(self, checkpoint: Any) -> list[Any]:
        """The parameter leaves of a :meth:`save_state` dict, a ``.npz`` file of it, or a pytree."""
        if isinstance(checkpoint, str | os.PathLike):
            with np.load(os.fspath(checkpoint), allow_pickle=False) as stored:
                checkpoint = {name: stored[name] for name in stored.files}
        if isinstance(checkpoint, dict) and set(checkpoint) == set(self._all_names):
            leaves = [jnp.asarray(checkpoint[name]) for name in self._all_names]
        else:
            leaves = jax.tree_util.tree_leaves(checkpoint)
            if len(leaves) != len(self._all_names):
                raise TypeError(
                    "a JAX checkpoint is a save_state() dict (names "
                    f"{list(self._all_names)}), a .npz of it, or a parameters pytree"
                )
        current = self._live()[0]
        for name, new, old in zip(self._all_names, leaves, current, strict=True):
            if tuple(new.shape) != tuple(old.shape):
                raise ValueError(
                    f"checkpoint array of shape {tuple(new.shape)} for {name} of shape "
                    f"{tuple(old.shape)}"
                )
        return [jnp.asarray(new, old.dtype) for new, old in zip(leaves, current, strict=True)]

    def with_checkpoint(self, checkpoint: Any) -> JaxKernels:
        """A :meth:`save_state` dict, a ``.npz`` file of it, or a parameters pytree of the model's structure."""
        return self._bind(self._checkpoint_leaves(checkpoint))

    def load_checkpoint(self, checkpoint: Any) -> None:
        """Write a checkpoint into an nnx module, in place (``nnx.update``); the core never calls it.

        A :class:`Functional` is immutable: use ``InfluenceModel.checkpoint_loaded``.
        """
        if self._functional:
            raise self._unsupported(
                "load_checkpoint for a Functional model, which is immutable (checkpoint_loaded "
                "computes at a checkpoint without writing it)"
            )
        from flax import nnx

        params = self._params(self._checkpoint_leaves(checkpoint))
        nnx.update(self.model, params)

    # -- the head (representer points, with last_layer= given to the estimator) ----------
    def output_loss_grads(self, outputs: Any, targets: Any) -> tuple[Any, Any]:
        return self._output_grads(outputs, targets)

    def output_loss_hessians(self, outputs: Any, targets: Any) -> Any:
        return self._output_hessians(outputs, targets)

    def last_layer(self) -> LastLayer:
        raise self._unsupported(
            "last_layer (representer points): the layer order of an nnx module is not its "
            "call order; name the layer, e.g. RepresenterPointL2(model, last_layer='head')"
        )
