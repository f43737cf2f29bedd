"""A new solver and a new calculator are one class each: nothing else in the library changes.

The two classes below live in this one file, as they would in one module of
``influence_core/ihvp/`` or ``influence_core/estimators/`` (plus an export line).
Through the base classes they get fitting, NotFittedError, fingerprint checks,
saving, ``influence``/``top_k``/``influence_and_self_influence`` and the
resumable runs, with no other module touched.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from digits_problem import MU, digits_model, problem

from influence_core import (
    ExactIHVP,
    FirstOrderInfluenceCalculator,
    InfluenceCalculator,
    InverseHessianVectorProduct,
    run_top_k,
)


class EigenIHVP(InverseHessianVectorProduct):
    """(H + λI)⁻¹ from a full eigendecomposition H = Q Λ Qᵀ (a worked example)."""

    def _fit(self, model: Any, data: Any) -> None:
        xp = model.xp
        eigh = xp.linalg.eigh(model.hessian(data, batch_size=self.batch_size))
        self.eigenvalues_, self.eigenvectors_ = eigh.eigenvalues, eigh.eigenvectors

    def _fitted_arrays(self) -> dict[str, Any]:
        return {"eigenvalues_": self.eigenvalues_, "eigenvectors_": self.eigenvectors_}

    def _restore(self, arrays: dict[str, Any]) -> None:
        self.eigenvalues_, self.eigenvectors_ = arrays["eigenvalues_"], arrays["eigenvectors_"]

    def _solve_block(self, vectors: Any) -> Any:
        xp, Q = self.xp, self.eigenvectors_
        scaled = xp.matmul(xp.matrix_transpose(Q), vectors) / xp.reshape(
            self.eigenvalues_ + self.damping, (-1, 1)
        )
        return xp.matmul(Q, scaled)


class GradientDot(InfluenceCalculator):
    """score = g(z_test) · g(z_train), Grad-Dot (a worked example)."""

    def prepare_test(self, test_data: Any) -> Any:
        self._check_fitted()
        return self.xp.matrix_transpose(self._stack(g for _, g in self._test_gradients(test_data)))

    def _scores_from_prepared(self, prepared: Any, train_data: Any) -> Iterator[tuple[int, Any]]:
        for batch, g in self._gradients(train_data):
            yield batch.start, self.xp.matrix_transpose(self.xp.matmul(g, prepared))

    def self_influence(self, train_data: Any = None) -> Any:
        stream = self._gradients(self.training_data(train_data))
        return self._stack(self.xp.sum(g * g, axis=1) for _, g in stream)


def test_a_new_solver_works_everywhere_a_built_in_one_does(tmp_path: Path) -> None:
    p = problem()
    model = digits_model("torch", batch_size=100)
    train, test = (p["X"][:300], p["y"][:300]), (p["X_test"], p["y_test"])
    host = model.to_numpy
    ours = FirstOrderInfluenceCalculator(model, EigenIHVP(damping=MU)).fit(train)
    exact = FirstOrderInfluenceCalculator(model, ExactIHVP(damping=MU)).fit(train)
    np.testing.assert_allclose(host(ours.influence(test)), host(exact.influence(test)), rtol=1e-8)
    ours.ihvp.save(tmp_path / "eigen")
    loaded = FirstOrderInfluenceCalculator(
        model, EigenIHVP.load(tmp_path / "eigen", model, train)
    ).fit(train)
    np.testing.assert_array_equal(host(loaded.self_influence()), host(ours.self_influence()))


def test_a_new_calculator_gets_top_k_and_resumable_runs(tmp_path: Path) -> None:
    p = problem()
    model = digits_model("torch", batch_size=100)
    train, test = (p["X"][:300], p["y"][:300]), (p["X_test"], p["y_test"])
    calc = GradientDot(model, measurement="margin").fit(train)
    G = model.to_numpy(model.per_sample_grads(train))
    T = np.concatenate(
        [model.to_numpy(g) for _, g in model.iter_measurement_grads(test, calc.measurement)]
    )
    np.testing.assert_allclose(model.to_numpy(calc.influence(test)), T @ G.T, rtol=1e-10)
    top = run_top_k(calc, tmp_path / "run", test, k=4, chunk_size=100)
    order = np.argsort(-(T @ G.T), axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(model.to_numpy(top.proponents), order)
