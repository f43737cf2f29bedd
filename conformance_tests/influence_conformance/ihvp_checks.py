"""Conformance checks of the IHVP solvers, against (H + λI)⁻¹ from the closed-form Hessian."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from influence_core import (
    ArnoldiIHVP,
    ConjugateGradientIHVP,
    ConvergenceWarning,
    ExactIHVP,
    LissaDivergenceError,
    LissaIHVP,
    NotPositiveDefiniteError,
)

from . import numpy_reference as ref
from .cases import Case, assert_close

DAMPING = 1e-2
regressions = pytest.mark.parametrize("spec_name", ["linear_regression", "logistic_regression"])
dtypes = pytest.mark.parametrize("dtype", ["float64", "float32"])


def closed_form(case: Case) -> np.ndarray:
    """H + λI in canonical order, from the closed-form Hessian."""
    H = ref.closed_form_hessian(case.spec, case.weights, case.X, case.y)
    return H + DAMPING * np.eye(len(H))


def solve_canonical(case: Case, solver: object, V: np.ndarray) -> np.ndarray:
    """The solver's (H + λI)⁻¹ V for canonical V, returned in canonical order."""
    r = case.reference
    return r.to_canonical(case.model.to_numpy(solver.solve(r.from_canonical(V))))


class IHVPChecks:
    """Every solver against the exact (H + λI)⁻¹ of linear and softmax regression."""

    def build_case(self, spec_name: str, dtype: str) -> Case:  # provided by BackendConformance
        raise NotImplementedError

    def _rhs(self, case: Case) -> np.ndarray:
        return np.random.default_rng(7).normal(size=(case.spec.num_parameters, 3))

    @regressions
    @dtypes
    def test_exact_ihvp_matches_numpy_solve(self, spec_name: str, dtype: str) -> None:
        case = self.build_case(spec_name, dtype)
        V = self._rhs(case)
        solver = ExactIHVP(damping=DAMPING).fit(case.model, case.data)
        expected = np.linalg.solve(closed_form(case), V)
        assert_close(solve_canonical(case, solver, V), expected, case.rtol, "ExactIHVP")
        G = case.model.per_sample_grads(case.data)
        forms = case.model.to_numpy(solver.quadratic_forms(G))
        G_can = case.reference.to_canonical(case.model.to_numpy(G), axis=1)
        expected_forms = np.einsum("nd,nd->n", G_can, np.linalg.solve(closed_form(case), G_can.T).T)
        assert_close(forms, expected_forms, case.rtol, "ExactIHVP quadratic forms")

    @regressions
    @dtypes
    def test_conjugate_gradient_matches_numpy_solve(self, spec_name: str, dtype: str) -> None:
        case = self.build_case(spec_name, dtype)
        V = self._rhs(case)
        tol = 1e-12 if dtype == "float64" else 1e-6
        solver = ConjugateGradientIHVP(damping=DAMPING, tol=tol, maxiter=200).fit(
            case.model, case.data
        )
        expected = np.linalg.solve(closed_form(case), V)
        assert_close(solve_canonical(case, solver, V), expected, case.rtol, "CG")
        assert float(solver.residuals_.max()) <= tol

    @regressions
    def test_lissa_full_batch_converges_to_the_solve(self, spec_name: str) -> None:
        """Full-batch LiSSA, scale 1.1 λ_max, and the depth at which (1 − λ_min/s)^J < 1e-11."""
        case = self.build_case(spec_name, "float64")
        A = closed_form(case)
        eigenvalues = np.linalg.eigvalsh(A)
        scale = 1.1 * eigenvalues[-1]
        depth = int(np.ceil(np.log(1e-11) / np.log(1 - eigenvalues[0] / scale)))
        solver = LissaIHVP(damping=DAMPING, scale=scale, depth=depth, batch_size=len(case.y)).fit(
            case.model, case.data
        )
        V = self._rhs(case)
        assert_close(solve_canonical(case, solver, V), np.linalg.solve(A, V), 1e-8, "LiSSA")

    @regressions
    def test_lissa_minibatches_are_seeded_and_close(self, spec_name: str) -> None:
        """Mini-batches of 4 of 13, depth 400, 4 repetitions: sampling noise (measured 0.12 / 0.02)."""
        case = self.build_case(spec_name, "float64")
        A = closed_form(case)
        kwargs = dict(
            damping=DAMPING,
            scale=2 * np.linalg.eigvalsh(A)[-1],
            depth=400,
            batch_size=4,
            repetitions=4,
            seed=3,
        )
        V = self._rhs(case)
        solver = LissaIHVP(**kwargs).fit(case.model, case.data)
        with warnings.catch_warnings():  # its residual check rightly reports mini-batch noise
            warnings.simplefilter("ignore", ConvergenceWarning)
            first = solve_canonical(case, solver, V)
            again = solve_canonical(case, LissaIHVP(**kwargs).fit(case.model, case.data), V)
        assert 0.1 < float(solver.residuals_.max()) < 0.5  # it says it is about 10-30 % off
        np.testing.assert_array_equal(first, again)
        assert_close(first, np.linalg.solve(A, V), 0.15, "mini-batch LiSSA")

    @regressions
    @pytest.mark.parametrize("fraction", [1.0, 0.5])
    def test_arnoldi_matches_the_top_eigenspace(self, spec_name: str, fraction: float) -> None:
        case = self.build_case(spec_name, "float64")
        H = closed_form(case) - DAMPING * np.eye(case.spec.num_parameters)
        d = len(H)
        rank = max(1, int(fraction * d))
        values, vectors = np.linalg.eigh(H)
        top = np.argsort(values)[::-1][:rank]
        V = self._rhs(case)
        expected = vectors[:, top] @ ((vectors[:, top].T @ V) / (values[top] + DAMPING)[:, None])
        solver = ArnoldiIHVP(damping=DAMPING, rank=rank, iterations=d).fit(case.model, case.data)
        assert_close(solve_canonical(case, solver, V), expected, 1e-8, f"Arnoldi rank {rank}")
        assert_close(case.model.to_numpy(solver.eigenvalues_), values[top], 1e-8, "eigenvalues")
        if fraction == 1.0:
            assert_close(
                solve_canonical(case, solver, V),
                np.linalg.solve(closed_form(case), V),
                1e-8,
                "full-rank Arnoldi = exact",
            )

    # -- errors -------------------------------------------------------------------
    def test_exact_reports_the_smallest_eigenvalue_when_not_positive_definite(self) -> None:
        case = self.build_case("mlp_tanh", "float64")  # random weights: an indefinite Hessian
        H = case.model.to_numpy(case.model.hessian(case.data))
        smallest = np.linalg.eigvalsh(0.5 * (H + H.T)).min()
        assert smallest < 0
        with pytest.raises(NotPositiveDefiniteError, match="damping=") as info:
            ExactIHVP(damping=0.0).fit(case.model, case.data)
        assert info.value.smallest_eigenvalue == pytest.approx(smallest, rel=1e-6)

    def test_exact_refuses_large_models_with_advice(self) -> None:
        case = self.build_case("convnet", "float64")
        with pytest.raises(ValueError, match="ConjugateGradientIHVP"):
            ExactIHVP(max_parameters=100).fit(case.model, case.data)

    def test_conjugate_gradient_warns_with_its_residual(self) -> None:
        case = self.build_case("logistic_regression", "float64")
        solver = ConjugateGradientIHVP(damping=DAMPING, maxiter=2).fit(case.model, case.data)
        with pytest.warns(ConvergenceWarning, match="relative residual"):
            solver.solve(self._rhs(case))
        assert solver.iterations_ == 2 and float(solver.residuals_.max()) > solver.tol

    def test_lissa_divergence_names_a_scale_that_works(self) -> None:
        case = self.build_case("logistic_regression", "float64")
        largest = np.linalg.eigvalsh(closed_form(case))[-1]
        solver = LissaIHVP(damping=DAMPING, scale=0.2 * largest, depth=500).fit(
            case.model, case.data
        )
        with pytest.raises(LissaDivergenceError) as info:
            solver.solve(self._rhs(case))
        assert info.value.largest_eigenvalue == pytest.approx(largest, rel=0.05)
        assert info.value.scale == pytest.approx(0.2 * largest)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no divergence (the residual check is off: depth 50)
            LissaIHVP(damping=DAMPING, scale=2 * largest, depth=50, tol=None).fit(
                case.model, case.data
            ).solve(self._rhs(case))
