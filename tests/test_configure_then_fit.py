"""Configure, then fit: settings-only constructors, NotFittedError, fitted solvers checked, state saved."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from digits_problem import MU, digits_model, problem

from influence_core import (
    ArnoldiIHVP,
    ConjugateGradientIHVP,
    ExactIHVP,
    FingerprintMismatchError,
    FirstOrderInfluenceCalculator,
    LissaIHVP,
    NotFittedError,
    RepresenterPointL2,
    SecondOrderInfluenceCalculator,
    TracIn,
)

SOLVERS = [
    ExactIHVP(damping=MU),
    ConjugateGradientIHVP(damping=MU, maxiter=50, tol=1e-9),
    LissaIHVP(damping=MU, depth=10, scale=50.0),
    ArnoldiIHVP(damping=MU, rank=20),
]


def data(n: int = 200):
    p = problem()
    return (p["X"][:n], p["y"][:n]), (p["X_test"], p["y_test"])


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_constructors_do_no_work_and_unfitted_use_is_refused(solver) -> None:
    settings = solver.get_params()
    rebuilt = type(solver)(**settings)  # the settings are enough to build it again
    assert rebuilt.get_params() == settings and json.dumps(settings)  # and are JSON
    assert not rebuilt.is_fitted
    with pytest.raises(NotFittedError, match=rf"{type(solver).__name__}\(\.\.\.\)\.fit"):
        rebuilt.solve(np.zeros(650))


def test_calculators_refuse_to_score_before_fit() -> None:
    model = digits_model("torch")
    _, test = data()
    for calculator in (
        FirstOrderInfluenceCalculator(model, ExactIHVP(damping=MU)),
        SecondOrderInfluenceCalculator(model),
        TracIn(model, [model.kernels.save_state()], 0.1),
        RepresenterPointL2(model),
    ):
        with pytest.raises(NotFittedError, match="not fitted"):
            calculator.influence(test)
        with pytest.raises(NotFittedError):
            calculator.self_influence()


def test_the_calculator_fits_its_solver_on_its_own_training_data() -> None:
    model = digits_model("torch")
    train, _test = data()
    solver = ExactIHVP(damping=MU)
    calc = FirstOrderInfluenceCalculator(model, solver).fit(train)
    assert solver.is_fitted and solver.data_ is train
    expected = np.linalg.inv(model.to_numpy(model.hessian(train)) + MU * np.eye(650))
    np.testing.assert_allclose(model.to_numpy(calc.ihvp.inverse_), expected, rtol=1e-8, atol=1e-10)
    # The second-order calculator's H and its ∇L come from the same data (the old
    # API could take them from two different datasets).
    second = SecondOrderInfluenceCalculator(model, ExactIHVP(damping=MU)).fit(train)
    assert second.ihvp.data_ is second.train_data_ is train


def test_a_fitted_solver_is_accepted_only_for_its_own_theta_and_data() -> None:
    model = digits_model("torch")
    train, _test = data()
    solver = ExactIHVP(damping=MU).fit(model, train)
    same_values = (train[0].copy(), train[1].copy())  # another object, the same samples
    FirstOrderInfluenceCalculator(model, solver).fit(same_values)
    with pytest.raises(FingerprintMismatchError, match="other training data"):
        FirstOrderInfluenceCalculator(model, solver).fit(data(150)[0])
    with pytest.raises(FingerprintMismatchError, match="other parameter values"):
        with model.parameters_set_to(model.get_parameters() * 1.01):
            FirstOrderInfluenceCalculator(model, solver).fit(train)
    head = model.with_parameters(model.parameter_names[1])
    with pytest.raises(FingerprintMismatchError, match="is for parameters"):
        FirstOrderInfluenceCalculator(head, solver).fit(train)


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_fitted_solver_state_saves_and_loads_through_the_saving_layer(
    backend: str, tmp_path: Path
) -> None:
    model = digits_model(backend)
    train, test = data()
    calc = FirstOrderInfluenceCalculator(model, ExactIHVP(damping=MU)).fit(train)
    calc.ihvp.save(tmp_path / "exact")
    meta = json.loads((tmp_path / "exact" / "metadata.json").read_text())
    assert meta["method"] == "ExactIHVP" and meta["parameters"]["damping"] == MU
    assert meta["data"]["train"]["n"] == 200
    loaded = ExactIHVP.load(tmp_path / "exact", model, train)
    again = FirstOrderInfluenceCalculator(model, loaded).fit(train)
    np.testing.assert_array_equal(
        model.to_numpy(again.influence(test)), model.to_numpy(calc.influence(test))
    )
    with pytest.raises(FingerprintMismatchError, match="'train' data differs"):
        ExactIHVP.load(tmp_path / "exact", model, data(150)[0])
    with pytest.raises(Exception, match="not of 'ArnoldiIHVP'"):
        ArnoldiIHVP.load(tmp_path / "exact", model)


def test_the_data_fingerprint_does_not_depend_on_batching() -> None:
    from influence_core.io import data_fingerprint

    model = digits_model("torch")
    train, _ = data()
    batches = [(train[0][i : i + 64], train[1][i : i + 64]) for i in range(0, 200, 64)]
    assert data_fingerprint(model, train, 50) == data_fingerprint(model, train, 200)
    assert data_fingerprint(model, batches) == data_fingerprint(model, train)
    assert data_fingerprint(model, data(199)[0]) != data_fingerprint(model, train)
