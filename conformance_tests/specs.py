"""Framework-neutral reference models: specs, weights and data, all NumPy.

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
    "SPECS",
    "Conv2D",
    "Dense",
    "Flatten",
    "ModelSpec",
    "ReferenceModel",
    "make_data",
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
class ModelSpec:
    """A sequential reference model, its loss and how its per-sample gradients are checked."""

    name: str
    input_shape: tuple[int, ...]
    layers: tuple[Dense | Conv2D | Flatten, ...]
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
            else:
                shape = (int(np.prod(shape)),)
        return shapes

    @property
    def num_parameters(self) -> int:
        return sum(int(np.prod(k)) + int(np.prod(b)) for k, b in self.parameter_shapes())


SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("linear_regression", (5,), (Dense(1),), "mse", "closed_form"),
        ModelSpec("logistic_regression", (5,), (Dense(3),), "cross_entropy", "closed_form"),
        ModelSpec("mlp_tanh", (4,), (Dense(8, "tanh"), Dense(3)), "cross_entropy", "finite_differences"),
        ModelSpec("mlp_relu", (4,), (Dense(8, "relu"), Dense(3)), "cross_entropy", "finite_differences"),
        ModelSpec(
            "convnet",
            (6, 6, 2),
            (Conv2D(3, 3, "relu"), Flatten(), Dense(3)),
            "cross_entropy",
            "finite_differences",
        ),
    )
}


def make_weights(spec: ModelSpec, seed: int = 0) -> list[np.ndarray]:
    """Random float64 weights, canonical layout: ``[kernel0, bias0, kernel1, bias1, …]``."""
    rng = np.random.default_rng(seed)
    weights = []
    for kernel_shape, bias_shape in spec.parameter_shapes():
        fan_in = int(np.prod(kernel_shape[:-1]))
        weights.append(rng.normal(scale=1.0 / np.sqrt(fan_in), size=kernel_shape))
        weights.append(rng.normal(scale=0.5, size=bias_shape))
    return weights


def make_data(
    spec: ModelSpec,
    weights: list[np.ndarray],
    n: int = 13,
    seed: int = 1,
    relu_margin: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets for ``spec``.

    Each sample is redrawn until every ReLU pre-activation is at least
    ``relu_margin`` away from the kink, so finite differences with steps of
    1e-3 never cross it and stay accurate to ~1e-11.
    """
    from .numpy_reference import pre_activations

    rng = np.random.default_rng(seed)
    X = np.empty((n, *spec.input_shape))
    for i in range(n):
        for _ in range(1000):
            x = rng.normal(size=(1, *spec.input_shape))
            margins = [np.abs(a).min() for a in pre_activations(spec, weights, x, only="relu")]
            if not margins or min(margins) > relu_margin:
                break
        else:  # pragma: no cover - only for pathological specs
            raise RuntimeError(f"could not draw a sample away from ReLU kinks for {spec.name}")
        X[i] = x[0]
    if spec.loss == "mse":
        y = rng.normal(size=(n, spec.num_outputs))
    else:
        y = rng.integers(0, spec.num_outputs, size=n)
    return X, y


@dataclass
class ReferenceModel:
    """What a backend's reference builder returns for one spec, weights and dtype.

    Attributes:
        model: the native model (weights loaded, inference mode).
        loss_fn: its per-sample loss, in the framework's convention.
        canonical_positions: integer array, length d; entry ``i`` of the
            backend's flat θ is entry ``canonical_positions[i]`` of the
            canonical θ.
        layer_names: the backend's name for each parametric layer, in order.
        native_dataset: ``(X, y, batch_size) -> dataset``; a batched native
            dataset for an int, an unbatched one for ``None``.
        scalar_loss_fn: the same loss with mean reduction (for the error check).
    """

    model: Any
    loss_fn: Callable[..., Any]
    canonical_positions: np.ndarray
    layer_names: list[str]
    native_dataset: Callable[[np.ndarray, np.ndarray, int | None], Any]
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
