"""Conformance checks of the first-order influence calculator, against NumPy by hand."""

from __future__ import annotations

import numpy as np
import pytest

from influence_core import ConjugateGradientIHVP, ExactIHVP, FirstOrderInfluenceCalculator

from .cases import Case, assert_close, optional
from .ihvp_checks import DAMPING, closed_form
from .measurement_checks import expected_gradients

solvers = pytest.mark.parametrize("solver", ["exact", "cg"])


def make_solver(case: Case, name: str):
    if name == "exact":
        return ExactIHVP(damping=DAMPING)
    return ConjugateGradientIHVP(damping=DAMPING, tol=1e-13, maxiter=200)


def by_hand(case: Case) -> dict[str, np.ndarray]:
    """Canonical per-sample gradients, A = H + λI, and the score matrix gₜᵀ A⁻¹ gᵢ."""
    r = case.reference
    G = r.to_canonical(case.model.to_numpy(case.model.per_sample_grads(case.data)), axis=1)
    A = closed_form(case)
    solved = np.linalg.solve(A, G.T)  # (d, n)
    return {"G": G, "A": A, "solved": solved, "scores": G[:5] @ solved}


class InfluenceChecks:
    """FirstOrderInfluenceCalculator on softmax regression: every output against its definition."""

    def build_case(self, spec_name: str, dtype: str) -> Case:  # provided by BackendConformance
        raise NotImplementedError

    def _calculator(
        self, solver: str, *, normalize: bool = False
    ) -> tuple[Case, FirstOrderInfluenceCalculator]:
        case = self.build_case("logistic_regression", "float64")
        ihvp = make_solver(case, solver)
        return case, FirstOrderInfluenceCalculator(
            case.model, ihvp, normalize=normalize, batch_size=4
        ).fit(case.data)

    def _test_data(self, case: Case) -> tuple[np.ndarray, np.ndarray]:
        return case.X[:5], case.y[:5]

    @solvers
    def test_scores_and_self_influence_match_the_definition(self, solver: str) -> None:
        case, calc = self._calculator(solver)
        ref = by_hand(case)
        scores = case.model.to_numpy(calc.influence(self._test_data(case)))
        assert scores.shape == (5, len(case.y))
        assert_close(scores, ref["scores"], 1e-8, "influence scores")
        self_inf = case.model.to_numpy(calc.self_influence())
        assert_close(
            self_inf, np.einsum("nd,dn->n", ref["G"], ref["solved"]), 1e-8, "self-influence"
        )
        assert np.all(self_inf > 0)
        both = calc.influence_and_self_influence(self._test_data(case))
        assert_close(both[0], ref["scores"], 1e-8, "influence_and_self_influence scores")
        assert_close(
            both[1], np.einsum("nd,dn->n", ref["G"], ref["solved"]), 1e-8, "... self-influence"
        )

    @pytest.mark.parametrize("name", ["logit", "probability", "margin"])
    @optional
    def test_measurement_scores_match_the_definition(self, name: str) -> None:
        """score = (−∇f(z_test))ᵀ (H + λI)⁻¹ g(z_train): positive raises f at z_test."""
        case = self.build_case("logistic_regression", "float64")
        calc = FirstOrderInfluenceCalculator(
            case.model, make_solver(case, "exact"), measurement=name, batch_size=4
        ).fit(case.data)
        ref = by_hand(case)
        expected = expected_gradients("logistic_regression", name)[:5] @ ref["solved"]
        got = case.model.to_numpy(calc.influence(self._test_data(case)))
        assert_close(got, expected, 1e-8, f"scores of the {name}")
        # Self-influence stays that of the training loss, whatever the test side explains.
        assert_close(
            calc.self_influence(), np.einsum("nd,dn->n", ref["G"], ref["solved"]), 1e-8, "self"
        )

    def test_relatif_divides_by_the_norm_of_the_solved_gradient(self) -> None:
        case, calc = self._calculator("exact", normalize=True)
        ref = by_hand(case)
        norms = np.linalg.norm(ref["solved"], axis=0)
        scores = case.model.to_numpy(calc.influence(self._test_data(case)))
        assert_close(scores, ref["scores"] / norms[None, :], 1e-8, "RelatIF scores")
        expected_self = np.einsum("nd,dn->n", ref["G"], ref["solved"]) / norms
        assert_close(calc.self_influence(), expected_self, 1e-8, "RelatIF self-influence")
        both = calc.influence_and_self_influence(self._test_data(case))
        assert_close(both[0], ref["scores"] / norms[None, :], 1e-8, "RelatIF, both at once")
        assert_close(both[1], expected_self, 1e-8, "RelatIF self-influence, both at once")

    def test_group_influence_is_the_sum_over_the_group(self) -> None:
        case, calc = self._calculator("exact")
        ref = by_hand(case)
        group = [1, 4, 6, 7, 11]
        got = case.model.to_numpy(
            calc.group_influence(self._test_data(case), (case.X[group], case.y[group]))
        )
        assert_close(got, ref["scores"][:, group].sum(axis=1), 1e-8, "group influence")

    def test_influence_vector_is_minus_the_solved_gradient(self) -> None:
        case, calc = self._calculator("exact")
        ref = by_hand(case)
        vectors = case.reference.to_canonical(
            case.model.to_numpy(calc.influence_vector(case.data)), axis=1
        )
        assert_close(vectors, -ref["solved"].T, 1e-8, "influence vectors")

    @pytest.mark.parametrize("k", [1, 3, 13, 20])
    def test_top_k_equals_a_full_stable_sort(self, k: int) -> None:
        case, calc = self._calculator("exact")
        scores = case.model.to_numpy(calc.influence(self._test_data(case)))
        top = calc.top_k(self._test_data(case), k=k)
        kk = min(k, scores.shape[1])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
        np.testing.assert_array_equal(case.model.to_numpy(top.proponents), order)
        assert_close(
            top.proponent_scores, np.take_along_axis(scores, order, axis=1), 1e-12, "proponents"
        )
        order = np.argsort(scores, axis=1, kind="stable")[:, :kk]
        np.testing.assert_array_equal(case.model.to_numpy(top.opponents), order)
        assert_close(
            top.opponent_scores, np.take_along_axis(scores, order, axis=1), 1e-12, "opponents"
        )
