"""Influence against reality: leave-one-out retraining of softmax regression on digits.

The problem (``digits_problem``) is trained to convergence with L2 μ, so the
solvers run with damping μ.
For 3 test points and the 20 training points with the largest |score| each,
the predicted change of the test loss when removing z, score/n, is compared
with the change after actually retraining without z.
"""

from __future__ import annotations

import numpy as np
import pytest
from digits_problem import MU, N_TRAIN, actual_change, digits_model, problem
from scipy.stats import pearsonr

from influence_core import ConjugateGradientIHVP, ExactIHVP, FirstOrderInfluenceCalculator


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_predicted_loss_change_matches_leave_one_out(backend: str, solver: str) -> None:
    p = problem()
    model = digits_model(backend)
    train = (p["X"], p["y"])
    ihvp = (
        ExactIHVP(damping=MU).fit(model, train)
        if solver == "exact"
        else ConjugateGradientIHVP(damping=MU, tol=1e-10, maxiter=300).fit(model, train)
    )
    scores = model.to_numpy(
        FirstOrderInfluenceCalculator(model, ihvp).fit(train).influence((p["X_test"], p["y_test"]))
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
