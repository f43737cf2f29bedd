"""Measurements against reality: the margin's change under leave-one-out retraining.

With ``measurement="margin"`` a positive score means z_train raises the test
point's margin, so removing it should lower the margin by about score/n.
Checked on the converged digits softmax regression (``digits_problem``) for 3
test points and, for each, the 20 training points with the largest |score|.
"""

from __future__ import annotations

import numpy as np
import pytest
from digits_problem import MU, N_TRAIN, digits_model, margin_at, problem, refit_without
from scipy.stats import pearsonr

from influence_core import ExactIHVP, FirstOrderInfluenceCalculator


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_margin_scores_predict_the_leave_one_out_margin_change(backend: str) -> None:
    p = problem()
    model = digits_model(backend)
    test = (p["X_test"], p["y_test"])
    calc = FirstOrderInfluenceCalculator(model, ExactIHVP(damping=MU), measurement="margin")
    scores = model.to_numpy(calc.fit((p["X"], p["y"])).influence(test))
    before = margin_at(p["theta"], *test)
    predicted, actual = [], []
    for t in range(3):
        for i in np.argsort(-np.abs(scores[t]), kind="stable")[:20]:
            predicted.append(-scores[t, i] / N_TRAIN)  # a proponent's removal lowers the margin
            actual.append((margin_at(refit_without(int(i)), *test) - before)[t])
    predicted, actual = np.array(predicted), np.array(actual)
    r = pearsonr(predicted, actual).statistic
    print(f"{backend}: margin Pearson {r:.5f} over {len(actual)} removals")
    assert r >= 0.99, f"Pearson {r:.4f}"
    assert np.all(np.sign(predicted) == np.sign(actual))
