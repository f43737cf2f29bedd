"""NumPy references for the conformance suite (float64).

Forward passes of the specs, closed-form per-sample gradients and Hessians
for linear and multinomial logistic regression, and 5-point central finite
differences for everything else.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .specs import Conv2D, Dense, GlobalAveragePool, ModelSpec

__all__ = [
    "closed_form_hessian",
    "closed_form_per_sample_grads",
    "finite_difference_per_sample_grads",
    "finite_differences",
    "flatten_weights",
    "measurement",
    "output_loss_grads",
    "output_loss_hessians",
    "outputs",
    "penultimate_features",
    "per_sample_loss",
    "pre_activations",
    "unflatten_weights",
]


def flatten_weights(weights: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([w.ravel() for w in weights])


def unflatten_weights(spec: ModelSpec, flat: np.ndarray) -> list[np.ndarray]:
    out, start = [], 0
    for kernel_shape, bias_shape in spec.parameter_shapes():
        for shape in (kernel_shape, bias_shape):
            size = int(np.prod(shape))
            out.append(flat[start : start + size].reshape(shape))
            start += size
    return out


def _activate(a: np.ndarray, activation: str | None) -> np.ndarray:
    if activation == "tanh":
        return np.tanh(a)
    if activation == "relu":
        return np.maximum(a, 0.0)
    return a


def _forward(spec: ModelSpec, weights: list[np.ndarray], X: np.ndarray, record: str | None = None):
    h, w_iter, recorded = X, iter(weights), []
    for layer in spec.layers:
        if isinstance(layer, Dense):
            kernel, bias = next(w_iter), next(w_iter)
            a = h @ kernel + bias
        elif isinstance(layer, Conv2D):
            kernel, bias = next(w_iter), next(w_iter)
            k = layer.kernel_size
            windows = sliding_window_view(h, (k, k), axis=(1, 2))  # (n, H', W', C, k, k)
            a = np.einsum("nhwcij,ijco->nhwo", windows, kernel) + bias
        elif isinstance(layer, GlobalAveragePool):
            h = h.mean(axis=(1, 2))
            continue
        else:
            h = h.reshape(h.shape[0], -1)
            continue
        if record is not None and layer.activation == record:
            recorded.append(a)
        h = _activate(a, layer.activation)
    return h, recorded


def pre_activations(
    spec: ModelSpec, weights: list[np.ndarray], X: np.ndarray, only: str
) -> list[np.ndarray]:
    """Pre-activations of the layers whose activation is ``only``."""
    return _forward(spec, weights, X, record=only)[1]


def per_sample_loss(
    spec: ModelSpec, weights: list[np.ndarray], X: np.ndarray, y: np.ndarray
) -> np.ndarray:
    out, _ = _forward(spec, weights, X)
    if spec.loss == "mse":
        return np.mean((out - y) ** 2, axis=-1)
    shifted = out - out.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1))
    return log_z - shifted[np.arange(len(y)), y]


def finite_difference_per_sample_grads(
    spec: ModelSpec, weights: list[np.ndarray], X: np.ndarray, y: np.ndarray, step: float = 1e-3
) -> np.ndarray:
    """(n, d) per-sample loss gradients by the 5-point stencil, error O(step⁴)."""
    return finite_differences(spec, weights, lambda w: per_sample_loss(spec, w, X, y), step)


def finite_differences(
    spec: ModelSpec, weights: list[np.ndarray], values: Any, step: float = 1e-3
) -> np.ndarray:
    """(n, d): ∂ values(weights)_i / ∂θ_j by the 5-point central stencil, error O(step⁴)."""
    theta = flatten_weights(weights)
    columns = []
    for j in range(theta.size):

        def at(offset: float, j: int = j) -> np.ndarray:
            t = theta.copy()
            t[j] += offset
            return values(unflatten_weights(spec, t))

        columns.append((-at(2 * step) + 8 * at(step) - 8 * at(-step) + at(-2 * step)) / (12 * step))
    return np.stack(columns, axis=1)


def outputs(spec: ModelSpec, weights: list[np.ndarray], X: np.ndarray) -> np.ndarray:
    """Φ(x), the network's outputs (b, c)."""
    return _forward(spec, weights, X)[0]


def measurement(name: str, out: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The built-in measurements of :mod:`influence_core.measurements`, by hand: shape (n,)."""
    rows = np.arange(len(out))
    if name == "logit":
        return out[rows, y]
    if name == "logit[0]":
        return out[:, 0]
    if name == "probability":
        return _softmax(out)[rows, y]
    if name == "margin":
        others = np.where(np.eye(out.shape[1], dtype=bool)[y], -np.inf, out)
        top = others.max(axis=1, keepdims=True)
        return out[rows, y] - (np.log(np.exp(others - top).sum(axis=1)) + top[:, 0])
    if name == "product of the first two outputs":
        return out[:, 0] * out[:, 1]
    raise KeyError(name)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def closed_form_per_sample_grads(
    spec: ModelSpec, weights: list[np.ndarray], X: np.ndarray, y: np.ndarray
) -> np.ndarray:
    """(n, d) for the one-layer specs: MSE linear regression and softmax regression.

    Linear, ℓ = mean_o (xᵀW + b − y)²: ∇_W = (2/O) x rᵀ, ∇_b = (2/O) r.
    Softmax, ℓ = −log p_y: ∇_W = x (p − e_y)ᵀ, ∇_b = p − e_y.
    """
    kernel, bias = weights
    out = X @ kernel + bias
    if spec.loss == "mse":
        delta = 2.0 * (out - y) / out.shape[1]
    else:
        delta = _softmax(out)
        delta[np.arange(len(y)), y] -= 1.0
    grad_kernel = np.einsum("ni,no->nio", X, delta).reshape(len(X), -1)
    return np.concatenate([grad_kernel, delta], axis=1)


def closed_form_hessian(
    spec: ModelSpec, weights: list[np.ndarray], X: np.ndarray, y: np.ndarray
) -> np.ndarray:
    """(d, d) Hessian of the mean loss for the one-layer specs.

    With x̃ = [x, 1]: linear, H = (2/(nO)) Σ x̃x̃ᵀ ⊗ I_O; softmax,
    H = (1/n) Σ x̃x̃ᵀ ⊗ (diag p − ppᵀ). The canonical order (kernel raveled
    input-major, then bias) is exactly the Kronecker order.
    """
    kernel, bias = weights
    n = len(X)
    x_tilde = np.concatenate([X, np.ones((n, 1))], axis=1)
    outer = np.einsum("ni,nj->nij", x_tilde, x_tilde)
    out = X @ kernel + bias
    n_out = out.shape[1]
    if spec.loss == "mse":
        curvature = np.broadcast_to(2.0 / n_out * np.eye(n_out), (n, n_out, n_out))
    else:
        p = _softmax(out)
        curvature = np.einsum("nc,cd->ncd", p, np.eye(n_out)) - np.einsum("nc,nd->ncd", p, p)
    H = np.einsum("nij,ncd->icjd", outer, curvature) / n
    d = x_tilde.shape[1] * n_out
    return H.reshape(d, d)


def penultimate_features(spec: ModelSpec, weights: list[np.ndarray], X: np.ndarray) -> np.ndarray:
    """The input of the last (Dense) layer, shape (n, p)."""
    head = ModelSpec(spec.name, spec.input_shape, spec.layers[:-1], spec.loss, spec.reference)
    features, _ = _forward(head, weights[:-2], X)
    return features.reshape(len(X), -1)


def output_loss_grads(spec: ModelSpec, outputs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """∂ℓ/∂Φ per sample: (Φ − y)·2/c for the mean squared error, softmax − one-hot otherwise."""
    if spec.loss == "mse":
        return 2.0 * (outputs - y) / outputs.shape[1]
    p = _softmax(outputs)
    p[np.arange(len(y)), y] -= 1.0
    return p


def output_loss_hessians(spec: ModelSpec, outputs: np.ndarray) -> np.ndarray:
    """∂²ℓ/∂Φ² per sample: 2/c·I for the mean squared error, diag(p) − ppᵀ otherwise."""
    n, c = outputs.shape
    if spec.loss == "mse":
        return np.broadcast_to(2.0 / c * np.eye(c), (n, c, c)).copy()
    p = _softmax(outputs)
    return np.einsum("nk,kl->nkl", p, np.eye(c)) - np.einsum("nk,nl->nkl", p, p)
