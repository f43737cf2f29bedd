"""Conformance checks of the optional Gauss–Newton-vector product (``curvature="ggn"``), against NumPy.

G = (1/n) Σ_i J_iᵀ (∂²ℓ_i/∂Φ²) J_i with J_i the Jacobian of the outputs,
built in NumPy from finite differences of the reference outputs (O(step⁴)) and
the closed-form output Hessians; for the models linear in θ it is also the
Hessian. CG on the Gauss–Newton matrix then matches the NumPy solve.
"""

from __future__ import annotations

import numpy as np
import pytest

from influence_core import ConjugateGradientIHVP

from . import numpy_reference as ref
from .cases import Case, assert_close, optional, to_numpy
from .reference_specs import SPECS

ALL_SPECS = list(SPECS)
LINEAR = [s for s in SPECS if len(SPECS[s].layers) == 1]


def numpy_ggn(case: Case) -> np.ndarray:
    """(d, d) Gauss–Newton matrix of the mean loss, in the canonical layout."""
    out = ref.outputs(case.spec, case.weights, case.X)
    n, c = out.shape
    J = ref.finite_differences(
        case.spec, case.weights, lambda w: ref.outputs(case.spec, w, case.X).reshape(-1)
    ).reshape(n, c, -1)
    H = ref.output_loss_hessians(case.spec, out)
    return np.einsum("nci,ncd,ndj->ij", J, H, J) / n


class GGNChecks:
    """``mean_loss_ggn_vp`` and the solvers with ``curvature="ggn"``."""

    def build_case(self, spec_name: str, dtype: str) -> Case:  # provided by BackendConformance
        raise NotImplementedError

    @pytest.mark.parametrize("spec_name", ALL_SPECS)
    @optional
    def test_gauss_newton_products_match_numpy(self, spec_name: str) -> None:
        case = self.build_case(spec_name, "float64")
        model = case.model
        V = np.random.default_rng(7).normal(size=(model.num_parameters, 3))
        got = to_numpy(model.to_canonical(model.ggn_vp(case.data, model.from_canonical(V))))
        assert_close(got, numpy_ggn(case) @ V, 1e-8, "G V against Jᵀ H_out J V in NumPy")
        if spec_name in LINEAR:  # linear in θ: the Gauss-Newton matrix is the Hessian
            hvp = to_numpy(model.to_canonical(model.hvp(case.data, model.from_canonical(V))))
            assert_close(got, hvp, 1e-10, "G = H for a model linear in θ")

    @pytest.mark.parametrize("spec_name", ["mlp_tanh", "convnet"])
    @optional
    def test_conjugate_gradient_on_the_gauss_newton_matrix(self, spec_name: str) -> None:
        case = self.build_case(spec_name, "float64")
        model, damping = case.model, 1e-2
        V = np.random.default_rng(8).normal(size=(model.num_parameters, 2))
        solver = ConjugateGradientIHVP(damping=damping, tol=1e-12, maxiter=500, curvature="ggn")
        got = to_numpy(
            model.to_canonical(solver.fit(model, case.data).solve(model.from_canonical(V)))
        )
        G = numpy_ggn(case) + damping * np.eye(model.num_parameters)
        assert_close(got, np.linalg.solve(G, V), 1e-6, "(G + λI)⁻¹ V by CG")
