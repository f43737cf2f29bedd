"""Influence against reality: leave-one-out retraining of softmax regression on digits.

The model is trained (in NumPy) to convergence on L(θ) + (μ/2)‖θ‖², so the
Hessian of the training objective is H + μI: the solvers run with damping μ.
For 3 test points and the 20 training points with the largest |score| each,
the predicted change of the test loss when removing z, score/n, is compared
with the change after actually retraining without z.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.stats import pearsonr
from sklearn.datasets import load_digits

from influence_core import (
    ConjugateGradientIHVP,
    ExactIHVP,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
    get_registry,
)
from influence_core.specs import Dense, ModelSpec

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
def actual_change(i: int) -> np.ndarray:
    """Test-loss change (3 test points) after retraining without training point i."""
    p = problem()
    keep = np.arange(N_TRAIN) != i
    theta = fit(p["X"][keep], p["y"][keep], p["theta"])
    return loss_at(theta, p["X_test"], p["y_test"]) - loss_at(p["theta"], p["X_test"], p["y_test"])


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_predicted_loss_change_matches_leave_one_out(backend: str, solver: str) -> None:
    p = problem()
    weights = [p["theta"][:640].reshape(64, 10), p["theta"][640:]]
    reference = get_registry().by_name(backend).load_reference_models()(SPEC, weights, "float64")

    model = InfluenceModel(reference.model, reference.loss_fn, batch_size=250)
    train = (p["X"], p["y"])
    ihvp = (
        ExactIHVP(model, train, damping=MU)
        if solver == "exact"
        else ConjugateGradientIHVP(model, train, damping=MU, tol=1e-10, maxiter=300)
    )
    scores = model.to_numpy(
        FirstOrderInfluenceCalculator(model, train, ihvp).influence((p["X_test"], p["y_test"]))
    )
    predicted, actual = [], []
    for t in range(3):
        for i in np.argsort(-np.abs(scores[t]), kind="stable")[:20]:
            predicted.append(scores[t, i] / N_TRAIN)
            actual.append(actual_change(int(i))[t])
    predicted, actual = np.array(predicted), np.array(actual)
    r = pearsonr(predicted, actual).statistic
    print(f"{backend} {solver}: Pearson {r:.5f} over {len(actual)} removals")
    assert r >= 0.99, f"Pearson {r:.4f}"
    assert np.all(np.sign(predicted) == np.sign(actual)), (
        "proponents must raise the test loss when removed"
    )
