"""The convex digits problem shared by the influence-against-reality tests.

Softmax regression on scikit-learn's digits (n = 1000, pixels / 16), trained in
NumPy with L-BFGS to convergence on L(θ) + (μ/2)‖θ‖², so the Hessian of the
training objective is H + μI: solvers run with damping μ. θ = (W (64×10), b).
"""

from __future__ import annotations

from functools import cache

import numpy as np
from scipy.optimize import minimize
from sklearn.datasets import load_digits

from influence_conformance.specs import Dense, ModelSpec
from influence_core import InfluenceModel, get_registry

MU = 1e-2
N_TRAIN = 1000
SPEC = ModelSpec("digits_softmax", (64,), (Dense(10),), "cross_entropy", "closed_form")


def objective(theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    W, b = theta[:640].reshape(64, 10), theta[640:]
    z = X @ W + b
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    loss = -np.mean(np.log(p[np.arange(len(y)), y]))
    p[np.arange(len(y)), y] -= 1.0
    grad = np.concatenate([(X.T @ p).ravel(), p.sum(axis=0)]) / len(y)
    return loss + 0.5 * MU * theta @ theta, grad + MU * theta


def fit(X: np.ndarray, y: np.ndarray, start: np.ndarray) -> np.ndarray:
    result = minimize(
        objective,
        start,
        args=(X, y),
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": 20000, "ftol": 0.0, "gtol": 1e-12},
    )
    return result.x


def loss_at(theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    z = X @ theta[:640].reshape(64, 10) + theta[640:]
    z = z - z.max(axis=1, keepdims=True)
    return np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]


@cache
def problem() -> dict[str, np.ndarray]:
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    theta = fit(X[:N_TRAIN], y[:N_TRAIN], np.zeros(650))
    return {
        "X": X[:N_TRAIN],
        "y": y[:N_TRAIN],
        "X_test": X[N_TRAIN : N_TRAIN + 3],
        "y_test": y[N_TRAIN : N_TRAIN + 3],
        "theta": theta,
    }


@cache
def refit_without(i: int) -> np.ndarray:
    """θ retrained to convergence without training point i."""
    p = problem()
    keep = np.arange(N_TRAIN) != i
    return fit(p["X"][keep], p["y"][keep], p["theta"])


def actual_change(i: int) -> np.ndarray:
    """Test-loss change (3 test points) after retraining without training point i."""
    p = problem()
    theta = refit_without(i)
    return loss_at(theta, p["X_test"], p["y_test"]) - loss_at(p["theta"], p["X_test"], p["y_test"])


def margin_at(theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """TRAK's margin Φ_y − log Σ_{k≠y} exp Φ_k, by hand."""
    z = X @ theta[:640].reshape(64, 10) + theta[640:]
    others = np.where(np.eye(10, dtype=bool)[y], -np.inf, z)
    return z[np.arange(len(y)), y] - np.log(np.exp(others).sum(axis=1))


def digits_model(backend: str, batch_size: int = 250) -> InfluenceModel:
    """The trained softmax regression as a native float64 model of ``backend``."""
    p = problem()
    weights = [p["theta"][:640].reshape(64, 10), p["theta"][640:]]
    reference = get_registry().by_name(backend).load_reference_models()(SPEC, weights, "float64")
    return InfluenceModel(reference.model, reference.loss_fn, batch_size=batch_size)


@cache
def actual_group_change(group: tuple[int, ...]) -> np.ndarray:
    """Test-loss change (3 test points) after retraining without the training points ``group``."""
    p = problem()
    keep = np.setdiff1d(np.arange(N_TRAIN), np.array(group))
    theta = fit(p["X"][keep], p["y"][keep], p["theta"])
    return loss_at(theta, p["X_test"], p["y_test"]) - loss_at(p["theta"], p["X_test"], p["y_test"])
