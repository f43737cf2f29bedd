"""One contract, every calculator: shapes, top-k, the fused call, the prepared path, resumable runs.

Whatever an estimator computes, its calculator must keep the same promises:
``influence`` is (n_test, n_train) and ``self_influence`` (n_train,);
``influence_and_self_influence`` equals the two calls; scoring from
``prepare_test`` equals ``influence``; ``top_k`` equals a stable full sort of
the scores; and the chunked, resumable runs (run again on the same
directory, they read their chunks back) equal the direct results. Checked on
softmax regression for every calculator the backend supports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from influence_core import (
    ArnoldiIHVP,
    ArnoldiInfluenceCalculator,
    ConjugateGradientIHVP,
    ExactIHVP,
    FirstOrderInfluenceCalculator,
    RepresenterPointL2,
    RepresenterPointLJE,
    SecondOrderInfluenceCalculator,
    TracIn,
    run_influence,
    run_self_influence,
    run_top_k,
)

from .cases import Case, assert_close, optional, to_numpy

DAMPING = 1e-2

#: name → ``(model) -> unfitted calculator``; a plugin's tests may add its own.
CALCULATORS: dict[str, Any] = {
    "first order, exact": lambda m: FirstOrderInfluenceCalculator(m, ExactIHVP(damping=DAMPING)),
    "first order, CG": lambda m: FirstOrderInfluenceCalculator(
        m, ConjugateGradientIHVP(damping=DAMPING, tol=1e-12, maxiter=200)
    ),
    "RelatIF": lambda m: FirstOrderInfluenceCalculator(
        m, ExactIHVP(damping=DAMPING), normalize=True
    ),
    "first order, margin": lambda m: FirstOrderInfluenceCalculator(
        m, ExactIHVP(damping=DAMPING), measurement="margin"
    ),
    "second order": lambda m: SecondOrderInfluenceCalculator(m, ExactIHVP(damping=DAMPING)),
    "Arnoldi": lambda m: ArnoldiInfluenceCalculator(
        m, ArnoldiIHVP(rank=6, iterations=12, damping=DAMPING)
    ),
    "TracIn": lambda m: TracIn(m, [m.kernels.save_state()], 0.1),
    "representer points, L2": lambda m: RepresenterPointL2(m, l2=1e-2),
    "representer points, LJE": lambda m: RepresenterPointLJE(m, ExactIHVP(damping=DAMPING)),
    # The contract runs on logistic regression, whose one layer is the last: name it.
    "representer points, L2, named layer": lambda m: RepresenterPointL2(
        m, l2=1e-2, last_layer=list(m.parameter_names)
    ),
    "representer points, LJE, named layer": lambda m: RepresenterPointLJE(
        m, ExactIHVP(damping=DAMPING), last_layer=list(m.parameter_names)
    ),
}


class CalculatorChecks:
    """The calculator contract, for every calculator in :data:`CALCULATORS`."""

    calculators = CALCULATORS

    def build_case(self, spec_name: str, dtype: str) -> Case:  # provided by BackendConformance
        raise NotImplementedError

    @pytest.mark.parametrize("name", list(CALCULATORS))
    @optional
    def test_every_calculator_keeps_its_contract(self, name: str, tmp_path: Path) -> None:
        case = self.build_case("logistic_regression", "float64")
        calc = self.calculators[name](case.model).fit(case.data)
        test, n = (case.X[:5], case.y[:5]), len(case.y)
        scores = to_numpy(calc.influence(test))
        values = to_numpy(calc.self_influence())
        assert scores.shape == (5, n) and values.shape == (n,), f"{name}: shapes"
        both = calc.influence_and_self_influence(test)
        assert_close(both[0], scores, 1e-10, f"{name}: influence_and_self_influence scores")
        assert_close(both[1], values, 1e-10, f"{name}: influence_and_self_influence self")
        prepared = calc.influence_from_prepared(calc.prepare_test(test))
        assert_close(prepared, scores, 1e-12, f"{name}: the prepared path")
        top = calc.top_k(test, k=4)
        for kind, order in (
            ("proponents", np.argsort(-scores, axis=1, kind="stable")[:, :4]),
            ("opponents", np.argsort(scores, axis=1, kind="stable")[:, :4]),
        ):
            np.testing.assert_array_equal(to_numpy(getattr(top, kind)), order, f"{name}: {kind}")
        for again in (False, True):  # the second call resumes from the chunks on disk
            run = to_numpy(run_influence(calc, tmp_path / "influence", test, chunk_size=4))
            assert_close(run, scores, 1e-12, f"{name}: run_influence (resumed={again})")
        assert_close(
            run_self_influence(calc, tmp_path / "self", chunk_size=4), values, 1e-12, f"{name}: run"
        )
        chunked = run_top_k(calc, tmp_path / "top", test, k=4, chunk_size=4)
        np.testing.assert_array_equal(to_numpy(chunked.proponents), to_numpy(top.proponents))
