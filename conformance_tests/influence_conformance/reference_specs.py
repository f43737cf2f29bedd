"""The conformance suite's reference models and their data."""

from __future__ import annotations

import numpy as np

from .specs import Conv2D, Dense, Flatten, ModelSpec

__all__ = ["SPECS", "make_data"]

SPECS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("linear_regression", (5,), (Dense(1),), "mse", "closed_form"),
        ModelSpec("logistic_regression", (5,), (Dense(3),), "cross_entropy", "closed_form"),
        ModelSpec(
            "mlp_tanh", (4,), (Dense(8, "tanh"), Dense(3)), "cross_entropy", "finite_differences"
        ),
        ModelSpec(
            "mlp_relu", (4,), (Dense(8, "relu"), Dense(3)), "cross_entropy", "finite_differences"
        ),
        ModelSpec(
            "convnet",
            (6, 6, 2),
            (Conv2D(3, 3, "relu"), Flatten(), Dense(3)),
            "cross_entropy",
            "finite_differences",
        ),
    )
}


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
