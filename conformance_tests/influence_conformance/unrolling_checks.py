"""Conformance check of a replayed training run's metagradient (influence_core.unrolling).

The metagradient reads the backend's per-sample gradients and Hessian-vector
products at every replayed θ_t; finite differences of the replayed run in a
sample's weight read only its mean-loss gradients. Agreement to 1e-6 says
the two kernels are consistent along a whole training trajectory, not only
at the trained weights.
"""

from __future__ import annotations

import numpy as np
import pytest

from influence_core.unrolling import SGD, Adam, ReplayedTraining

from .cases import Case, assert_close, optional, to_numpy
from .reference_specs import SPECS


class UnrollingChecks:
    """``ReplayedTraining.metagradient_scores`` against central differences of the run (SGD, Adam)."""

    def build_case(self, spec_name: str, dtype: str) -> Case:  # provided by BackendConformance
        raise NotImplementedError

    @pytest.mark.parametrize("spec_name", list(SPECS))
    @optional
    def test_per_sample_loss_jvps_are_the_per_sample_gradients_times_the_vectors(
        self, spec_name: str
    ) -> None:
        case = self.build_case(spec_name, "float64")
        model, kernels = case.model, case.model.kernels
        V = np.random.default_rng(11).normal(size=(model.num_parameters, 3))
        native = model.from_canonical(V)
        inputs, targets = kernels.as_native(case.X), kernels.as_native(case.y)
        got = to_numpy(kernels.per_sample_loss_jvp(inputs, targets, native))
        expected = to_numpy(kernels.per_sample_grads(inputs, targets)) @ to_numpy(native)
        assert_close(got, expected, 1e-10, "per-sample loss jvps against per-sample gradients @ V")
        one = to_numpy(kernels.per_sample_loss_jvp(inputs, targets, native[:, :1]))
        assert_close(one, expected[:, :1], 1e-10, "one column")

    @pytest.mark.parametrize(
        "optimizer",
        [SGD(lr=0.3, momentum=0.9, weight_decay=1e-2), Adam(lr=0.05, weight_decay=1e-2)],
        ids=["sgd", "adam"],
    )
    def test_metagradients_match_finite_differences_of_the_replayed_run(self, optimizer) -> None:
        case = self.build_case("mlp_tanh", "float64")
        model, (X, y) = case.model, case.data
        run = ReplayedTraining(model, (X, y), optimizer, epochs=2, batch_size=4, seed=1)
        test = (X[:3], y[:3])
        scores = to_numpy(run.metagradient_scores(test))
        eps = 1e-5

        def test_loss(w: np.ndarray) -> np.ndarray:
            with model.parameters_set_to(run.train(w)):
                return to_numpy(model.per_sample_loss(test))

        for i in (0, 5, 12):
            up, down = np.ones(run.n), np.ones(run.n)
            up[i], down[i] = 1 + eps, 1 - eps
            expected = -(test_loss(up) - test_loss(down)) / (2 * eps)
            assert np.abs(expected).max() > 1e-4  # the weight matters: the check can tell
            assert_close(scores[:, i], expected, 1e-6, f"metagradient of sample {i}")
