"""Layer-wise statistics for flax ``nnx``: each layer's inputs and output gradients.

JAX has no hooks, so the layers record themselves: the kernels keep a second
graph of the model in which every selected ``nnx.Linear`` / ``nnx.Conv`` is
an instance of a recording subclass (same state, same computation). Its call
stores its input and adds a perturbation ε (zeros) to its output z; the
gradient of the summed per-sample losses with respect to ε is ∂ℓ_i/∂z for
every sample and position at once (samples are independent in inference
mode), and the stored inputs are a. One compiled function per input shape
does the forward and the backward pass. nnx layers apply no activation, so
their output is the pre-activation z. Convolutions are unfolded with
``jax.lax.conv_general_dilated_patches`` and reordered from its
``(in, kh, kw)`` patches to the canonical ``(kh, kw, in)``.

Kinds beyond ``nnx.Linear`` and ``nnx.Conv``: ``nnx.LinearGeneral`` that
contracts the input's trailing axes (``nnx.MultiHeadAttention``'s query, key,
value and output projections) is dense over positions; ``nnx.Embed`` records
its integer ids; ``nnx.LayerNorm``, ``nnx.RMSNorm`` and ``nnx.BatchNorm``
(running averages, as in inference mode) over the last axis record x̂, their
normalised input (recomputed with flax's own variance formula), and the
perturbation of their output. An output whose leading axis is 1 (a table
looked up once for the batch) is broadcast to the batch, so that its
gradient is each sample's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from influence_core.plugin import Layer

__all__ = ["layer_gaps", "recording_graph"]


class _NormsMeta(type):
    def __instancecheck__(cls, node: Any) -> bool:
        return isinstance(node, _norm_classes())


class _NORMS(metaclass=_NormsMeta):
    """``isinstance(node, _NORMS)``: an nnx LayerNorm, RMSNorm or BatchNorm (flax imported late)."""


#: The record of the traced call in progress: {"eps": …, "inputs": {}, "outputs": {}}.
_RECORDS: list[dict[str, Any]] = []
_SUBCLASSES: dict[type, type] = {}


def _recording(cls: type) -> type:
    """``cls`` with a ``__call__`` that records its input and perturbs its output (cached)."""
    if cls not in _SUBCLASSES:

        def __call__(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
            z = cls.__call__(self, x, *args, **kwargs)
            if _RECORDS:
                record = _RECORDS[-1]
                batch = record["batch"]
                if z.shape[0] == 1 and batch != 1:  # looked up once for the whole batch
                    z = jnp.broadcast_to(z, (batch, *z.shape[1:]))
                    x = jnp.broadcast_to(x, (batch, *x.shape[1:]))
                elif z.shape[0] != batch:
                    raise ValueError(
                        f"layer {self.influence_layer_name!r} is called on inputs of shape "
                        f"{tuple(x.shape)} that have no batch axis (the batch has {batch} "
                        "samples): per-sample statistics need one; give its inputs a leading "
                        "batch axis of b or 1 (e.g. positions[None]), or leave the layer out "
                        "of parameters="
                    )
                if isinstance(self, _NORMS):  # x̂ from this call's own state (running averages)
                    x = normalised(self, x)
                record["inputs"][self.influence_layer_name] = x
                record["outputs"][self.influence_layer_name] = z
                if record["eps"] is not None:
                    z = z + record["eps"][self.influence_layer_name]
            return z

        _SUBCLASSES[cls] = type(f"Recorded{cls.__name__}", (cls,), {"__call__": __call__})
    return _SUBCLASSES[cls]


def _layer_of(node: Any, name: str, selected: set[str]) -> Layer | None:
    from flax import nnx

    if isinstance(node, nnx.Embed):
        table = f"{name}/embedding"
        if table not in selected:
            return None
        rows, width = (int(s) for s in node.embedding.shape)
        return Layer(name, "embedding", table, None, rows, width)
    if isinstance(node, _NORMS) and _normalises_last_axis(node):
        scale = f"{name}/scale"
        if scale not in selected:
            return None
        bias = f"{name}/bias" if f"{name}/bias" in selected else None
        return Layer(name, "elementwise", scale, bias, 1, int(node.scale.shape[-1]))
    kernel = f"{name}/kernel"
    if kernel not in selected:
        return None
    bias = f"{name}/bias" if f"{name}/bias" in selected else None
    shape = tuple(int(s) for s in node.kernel.shape)
    if isinstance(node, nnx.Linear) and len(shape) == 2:
        return Layer(name, "dense", kernel, bias, shape[0], shape[1])
    if isinstance(node, nnx.LinearGeneral) and _contracted(node) is not None:
        count = _contracted(node)
        return Layer(name, "dense", kernel, bias, _product(shape[:count]), _product(shape[count:]))
    if (
        isinstance(node, nnx.Conv)
        and len(shape) == 4
        and node.feature_group_count == 1
        and node.input_dilation in (1, None, (1, 1))
        and not (isinstance(node.padding, str) and node.padding not in ("SAME", "VALID"))
    ):
        return Layer(name, "conv2d", kernel, bias, shape[0] * shape[1] * shape[2], shape[3])
    return None


def _product(shape: Sequence[int]) -> int:
    total = 1
    for s in shape:
        total *= int(s)
    return total


def _contracted(node: Any) -> int | None:
    """How many trailing input axes a LinearGeneral contracts, when it is dense over positions."""
    axes = node.axis if isinstance(node.axis, tuple | list) else (node.axis,)
    count = len(axes)
    if node.batch_axis or sorted(axes) != list(range(-count, 0)):
        return None
    return count


def _norm_classes() -> tuple[type, ...]:
    from flax import nnx

    return (nnx.LayerNorm, nnx.RMSNorm, nnx.BatchNorm)


def _normalises_last_axis(node: Any) -> bool:
    """The last axis normalised and scaled; BatchNorm with running averages (inference mode)."""
    from flax import nnx

    if getattr(node, "scale", None) is None:
        return False
    if isinstance(node, nnx.BatchNorm):
        return node.axis in (-1,) and bool(node.use_running_average)
    return node.reduction_axes in (-1, (-1,)) and node.feature_axes in (-1, (-1,))


def normalised(node: Any, x: Any) -> Any:
    """x̂: the normalisation's output before its scale and shift, as flax computes it."""
    from flax import nnx

    if isinstance(node, nnx.BatchNorm):
        mean, variance = (jnp.asarray(v[...], x.dtype) for v in (node.mean, node.var))
        return (x - mean) * jax.lax.rsqrt(variance + node.epsilon)
    mean2 = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    if isinstance(node, nnx.RMSNorm):
        return x * jax.lax.rsqrt(mean2 + node.epsilon)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    if node.use_fast_variance:
        variance = jnp.maximum(0.0, mean2 - jnp.square(mean))
    else:
        variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(variance + node.epsilon)


def recording_graph(inference: Any, selected: Sequence[str]) -> tuple[tuple[Layer, ...], Any, dict]:
    """(the layers, the graph definition of a recording clone, their modules by name)."""
    from flax import nnx

    clone = nnx.clone(inference)
    chosen = set(selected)
    layers, modules = [], {}
    for path, node in nnx.iter_graph(clone):
        if not isinstance(node, nnx.Module) or not path:
            continue
        name = "/".join(str(p) for p in path)
        layer = _layer_of(node, name, chosen)
        if layer is None:
            continue
        node.__class__ = _recording(type(node))
        node.influence_layer_name = name
        layers.append(layer)
        modules[name] = node
    graphdef = nnx.split(clone, nnx.Param, ...)[0]
    return tuple(layers), graphdef, modules


def layer_gaps(inference: Any, selected: Sequence[str], layers: Sequence[Layer]) -> dict[str, str]:
    """Why each selected parameter that no layer of ``layers`` holds has none."""
    from flax import nnx

    covered = {layer.kernel for layer in layers} | {layer.bias for layer in layers}
    chosen = set(selected)
    gaps = {}
    for path, node in nnx.iter_graph(inference):
        if not isinstance(node, nnx.Module):
            continue
        prefix = "/".join(str(p) for p in path)
        for attribute, value in vars(node).items():
            name = f"{prefix}/{attribute}" if prefix else attribute
            if not isinstance(value, nnx.Param) or name not in chosen or name in covered:
                continue
            kind = type(node).__name__
            if not path or attribute not in ("kernel", "bias", "scale", "embedding"):
                gaps[name] = f"a parameter used directly by {kind} {prefix or 'the model'!r}"
            elif isinstance(node, _NORMS):
                gaps[name] = f"a {kind} over an axis other than the last, or without a scale"
            elif isinstance(node, nnx.Conv):
                gaps[name] = "an nnx.Conv with feature groups, input dilation or custom padding"
            else:
                gaps[name] = f"{kind} is not a layer kind the jax backend knows"
    return gaps


def _padding(module: Any) -> Any:
    padding = module.padding
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int):
        return [(padding, padding)] * 2
    return [(p, p) if isinstance(p, int) else tuple(p) for p in padding]


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


def patches(module: Any, x: Any) -> Any:
    """(b, positions, kh·kw·in): the unfolded input of an nnx.Conv, canonical (kh, kw, in) order."""
    kh, kw = module.kernel_size
    cols = jax.lax.conv_general_dilated_patches(
        x,
        (kh, kw),
        _pair(module.strides),
        _padding(module),
        rhs_dilation=_pair(module.kernel_dilation),
        dimension_numbers=("NHWC", "OIHW", "NHWC"),
    )  # (b, H', W', in·kh·kw), channel-major
    b, h, w, features = cols.shape
    channels = features // (kh * kw)
    cols = cols.reshape(b, h * w, channels, kh * kw)
    return jnp.swapaxes(cols, 2, 3).reshape(b, h * w, kh * kw * channels)


def conv2d_map(module: Any, x: Any, kernels: Any) -> Any:
    """(b, T, m): patches(x) @ kernels for canonical kernels (kh·kw·in, m), as one convolution.

    The canonical rows are nnx.Conv's own kernel layout (kh, kw, in, out), so
    the kernels are its weight of m output channels, at its geometry.
    """
    kh, kw = module.kernel_size
    m = kernels.shape[1]
    z = jax.lax.conv_general_dilated(
        x,
        kernels.reshape(kh, kw, x.shape[-1], m),
        _pair(module.strides),
        _padding(module),
        rhs_dilation=_pair(module.kernel_dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return z.reshape(z.shape[0], -1, m)


def statistics_function(
    layers: Sequence[Layer], modules: dict, apply: Any, loss_fn: Any, *, defer: bool = False
) -> Any:
    """``f(params, rest, x, y) -> {name: (a, g)}``, to be jitted; ``apply(params, rest, x)``.

    With ``defer``, a convolution's a is its input (NHWC) instead of its patches.
    """

    def run(params: Any, rest: Any, x: Any, eps: Any) -> tuple[Any, dict]:
        batch = jax.tree_util.tree_leaves(x)[0].shape[0]
        record: dict[str, Any] = {"eps": eps, "inputs": {}, "outputs": {}, "batch": batch}
        _RECORDS.append(record)
        try:
            out = apply(params, rest, x)
        finally:
            _RECORDS.pop()
        return out, record

    def stats(params: Any, rest: Any, x: Any, y: Any) -> dict[str, tuple[Any, Any]]:
        # A first run only for the shapes of the outputs z: XLA drops its unused work.
        zeros = {n: jnp.zeros_like(z) for n, z in run(params, rest, x, None)[1]["outputs"].items()}

        def total(eps: Any) -> tuple[Any, Any]:
            out, record = run(params, rest, x, eps)
            return jnp.sum(loss_fn(out, y)), record["inputs"]

        grads, inputs = jax.grad(total, has_aux=True)(zeros)
        out = {}
        for layer in layers:
            a, g = inputs[layer.name], grads[layer.name]
            b = a.shape[0]
            if layer.kind == "conv2d":
                if defer:
                    out[layer.name] = (a, g.reshape(b, -1, layer.outputs))
                    continue
                a = patches(modules[layer.name], a)
            if layer.kind == "embedding":
                out[layer.name] = (a.reshape(b, -1), g.reshape(b, -1, layer.outputs))
                continue
            a = a.reshape(b, -1, layer.outputs if layer.kind == "elementwise" else layer.inputs)
            out[layer.name] = (a, g.reshape(b, -1, layer.outputs))
        return out

    return stats
