"""Group influence against reality: retraining digits softmax regression without a group.

Groups: two random groups each of 10, 30, 100 and 300 points (1 % to 30 % of
n = 1000) and 60 points of one class (0, 3, 7). For 3 test points, the
predicted test-loss change (group_influence / n) of first and second order is
compared with the change after actually retraining without the group.

Measured (torch and TF alike) over 33 (group, test point) pairs: Pearson
0.644 (first order) vs 0.972 (second order); mean absolute error 0.0203 vs
0.0028; mean ||predicted| − |actual|| 0.0148 vs 0.0028. First order's main
miss is the renormalisation of the remaining data's mean (its q, centred ḡ).
"""

from __future__ import annotations

import numpy as np
import pytest
from digits_problem import MU, N_TRAIN, actual_group_change, digits_model, problem
from scipy.stats import pearsonr

from influence_core import ExactIHVP, FirstOrderInfluenceCalculator, SecondOrderInfluenceCalculator


def groups() -> list[tuple[int, ...]]:
    rng = np.random.default_rng(0)
    p = problem()
    chosen = [
        tuple(sorted(rng.choice(N_TRAIN, size, replace=False).tolist()))
        for size in (10, 30, 100, 300)
        for _ in range(2)
    ]
    chosen += [tuple(np.flatnonzero(p["y"] == c)[:60].tolist()) for c in (0, 3, 7)]
    return chosen


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_second_order_beats_first_order_on_group_removal(backend: str) -> None:
    p = problem()
    model = digits_model(backend, batch_size=1000)
    train, test = (p["X"], p["y"]), (p["X_test"], p["y_test"])
    ihvp = ExactIHVP(damping=MU).fit(model, train)
    first = FirstOrderInfluenceCalculator(model, ihvp).fit(train)
    second = SecondOrderInfluenceCalculator(model, ihvp).fit(train)

    predicted_first, predicted_second, actual = [], [], []
    for group in groups():
        data = (p["X"][list(group)], p["y"][list(group)])
        predicted_first += list(model.to_numpy(first.group_influence(test, data)) / N_TRAIN)
        predicted_second += list(model.to_numpy(second.group_influence(test, data)) / N_TRAIN)
        actual += list(actual_group_change(group))
    f, s, a = map(np.array, (predicted_first, predicted_second, actual))
    r_first, r_second = pearsonr(f, a).statistic, pearsonr(s, a).statistic
    err_first, err_second = np.mean(np.abs(f - a)), np.mean(np.abs(s - a))
    print(
        f"{backend}: Pearson {r_first:.3f} → {r_second:.3f}; MAE {err_first:.4f} → {err_second:.4f}"
    )
    assert r_second >= r_first
    assert r_second >= 0.95
    assert err_second < 0.5 * err_first
    # Magnitude: per pair, second order's |change| is closer to the actual |change|.
    gap_first = np.mean(np.abs(np.abs(f) - np.abs(a)))
    gap_second = np.mean(np.abs(np.abs(s) - np.abs(a)))
    print(f"{backend}: mean ||predicted| - |actual|| {gap_first:.4f} → {gap_second:.4f}")
    assert gap_second < gap_first


def test_second_order_formula_on_a_small_group() -> None:
    """Δθ_U = q H⁻¹ḡ + q² H⁻¹(H_U − H)H⁻¹ḡ, from dense NumPy matrices."""
    p = problem()
    model = digits_model("torch", batch_size=1000)
    train = (p["X"], p["y"])
    ihvp = ExactIHVP(damping=MU).fit(model, train)
    second = SecondOrderInfluenceCalculator(model, ihvp).fit(train)
    group = (p["X"][:40], p["y"][:40])
    host = model.to_numpy
    H = host(model.hessian(train))
    H_group = host(model.hessian(group))
    inverse = np.linalg.inv(H + MU * np.eye(len(H)))
    g = host(model.loss_grad(group)) - host(model.loss_grad(train))
    q = 0.04 / 0.96
    first_term = inverse @ g
    expected = q * first_term + q**2 * inverse @ (H_group - H) @ first_term
    np.testing.assert_allclose(host(second.parameter_change(group)), expected, rtol=1e-8)
    with pytest.raises(ValueError, match="1 to n"):
        second.parameter_change(train)
