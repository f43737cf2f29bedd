"""Framework-neutral model specs and canonical weights, all NumPy.

Backends turn a spec into a native model through their ``reference_models``
hook; the conformance suite, the demo and cross-framework comparisons use them.

A :class:`ModelSpec` is a small sequential network. Its weights are NumPy
arrays in the *canonical layout*, which is Keras': a dense kernel is
``(in, out)``, a conv kernel ``(kh, kw, in, out)``, images are NHWC. The
canonical flat vector θ is, layer by layer, the kernel raveled in C order then
the bias. A backend's builder maps this layout to its own and reports where
each of its flat entries sits in the canonical vector.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = [
    "Conv2D",
    "Dense",
    "Flatten",
    "GlobalAveragePool",
    "ModelSpec",
    "ReferenceModel",
    "canonical_offsets",
    "make_weights",
]

Activation = Literal["tanh", "relu"] | None


@dataclass(frozen=True)
class Dense:
    units: int
    activation: Activation = None


@dataclass(frozen=True)
class Conv2D:
    """A 'valid', stride-1 convolution on NHWC images."""

    filters: int
    kernel_size: int
    activation: Activation = None


@dataclass(frozen=True)
class Flatten:
    pass


@dataclass(frozen=True)
class GlobalAveragePool:
    """The mean over an image's positions: (h, w, c) → (c,) (Keras' GlobalAveragePooling2D)."""


@dataclass(frozen=True)
class ModelSpec:
    """A sequential reference model, its loss and how its per-sample gradients are checked."""

    name: str
    input_shape: tuple[int, ...]
    layers: tuple[Dense | Conv2D | Flatten | GlobalAveragePool, ...]
    loss: Literal["mse", "cross_entropy"]
    #: "closed_form" for the regressions, "finite_differences" for the rest.
    reference: Literal["closed_form", "finite_differences"]

    @property
    def num_outputs(self) -> int:
        return next(layer.units for layer in reversed(self.layers) if isinstance(layer, Dense))

    def parameter_shapes(self) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """Canonical (kernel, bias) shapes of each parametric layer."""
        shapes = []
        shape = self.input_shape
        for layer in self.layers:
            if isinstance(layer, Dense):
                shapes.append(((shape[-1], layer.units), (layer.units,)))
                shape = (layer.units,)
            elif isinstance(layer, Conv2D):
                k = layer.kernel_size
                shapes.append(((k, k, shape[-1], layer.filters), (layer.filters,)))
                shape = (shape[0] - k + 1, shape[1] - k + 1, layer.filters)
            elif isinstance(layer, GlobalAveragePool):
                shape = (shape[-1],)
            else:
                shape = (int(np.prod(shape)),)
        return shapes

    @property
    def num_parameters(self) -> int:
        return sum(int(np.prod(k)) + int(np.prod(b)) for k, b in self.parameter_shapes())


def make_weights(spec: ModelSpec, seed: int = 0) -> list[np.ndarray]:
    """Random float64 weights, canonical layout: ``[kernel0, bias0, kernel1, bias1, …]``."""
    rng = np.random.default_rng(seed)
    weights = []
    for kernel_shape, bias_shape in spec.parameter_shapes():
        fan_in = int(np.prod(kernel_shape[:-1]))
        weights.append(rng.normal(scale=1.0 / np.sqrt(fan_in), size=kernel_shape))
        weights.append(rng.normal(scale=0.5, size=bias_shape))
    return weights


@dataclass
class ReferenceModel:
    """What a backend's ``reference_models`` builder returns for one spec, weights and dtype.

    Attributes:
        model: the native model (weights loaded, inference mode).
        loss_fn: its per-sample loss, in the framework's convention.
        canonical_positions: integer array, length d; entry ``i`` of the
            backend's flat θ is entry ``canonical_positions[i]`` of the
            canonical θ.
        layer_names: the backend's name for each parametric layer, in order.
        native_dataset: ``(X, y, batch_size) -> dataset``; a batched native
            dataset for an int, an unbatched one for ``None``; ``None`` for a
            framework without a dataset type (its dataset checks are skipped).
        scalar_loss_fn: the same loss with mean reduction (for error checks).
    """

    model: Any
    loss_fn: Callable[..., Any]
    canonical_positions: np.ndarray
    layer_names: list[str]
    native_dataset: Callable[[np.ndarray, np.ndarray, int | None], Any] | None
    scalar_loss_fn: Callable[..., Any]
    extras: dict[str, Any] = field(default_factory=dict)

    def to_canonical(self, flat: np.ndarray, axis: int = 0) -> np.ndarray:
        """Reorder a backend flat vector (or an axis of stacked ones) to canonical order."""
        out = np.empty_like(flat)
        index = [slice(None)] * flat.ndim
        index[axis] = self.canonical_positions
        out[tuple(index)] = flat
        return out

    def from_canonical(self, flat: np.ndarray, axis: int = 0) -> np.ndarray:
        """Reorder a canonical flat vector (or an axis of stacked ones) to the backend's order."""
        return np.take(flat, self.canonical_positions, axis=axis)


def canonical_offsets(spec: ModelSpec) -> list[int]:
    """Start of each canonical weight array (kernel0, bias0, …) in the canonical θ."""
    offsets, start = [], 0
    for kernel_shape, bias_shape in spec.parameter_shapes():
        offsets.append(start)
        start += int(np.prod(kernel_shape))
        offsets.append(start)
        start += int(np.prod(bias_shape))
    return offsets
