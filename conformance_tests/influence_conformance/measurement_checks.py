"""Conformance checks of test-side measurements: ∇θ of a logit, a probability, a margin, a user function.

Every measurement reaches a backend through one kernel,
``per_sample_measurement_grads``; these checks compare it, through
:class:`~influence_core.InfluenceModel` (batches of 4 of 13, so a partial last
batch is crossed), with 5-point finite differences of the NumPy forward pass.
What the kernel returns is the gradient of the loss-like form m = −f (a
proponent raises f), so the expected value is −∇f.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest

from influence_core import logit, margin, probability
from influence_core.measurements import resolve_measurement

from . import numpy_reference as ref
from .cases import Case, assert_close, optional, to_numpy
from .reference_specs import SPECS, make_data
from .specs import make_weights


def _product_of_the_first_two_outputs(outputs, targets):
    """A user's measurement: a plain callable on native tensors (not a Measurement)."""
    return outputs[:, 0] * outputs[:, 1]


MEASUREMENTS = {
    "logit": logit,
    "logit[0]": lambda: logit(0),
    "probability": probability,
    "margin": margin,
    "product of the first two outputs": lambda: _product_of_the_first_two_outputs,
}
CLASSIFIERS = [s for s in SPECS if SPECS[s].loss == "cross_entropy"]
CASES = [(s, m) for s in CLASSIFIERS for m in MEASUREMENTS] + [("linear_regression", "logit[0]")]


@cache
def expected_gradients(spec_name: str, name: str) -> np.ndarray:
    """−∇θ f(z_i) in canonical order, by finite differences of the NumPy forward pass."""
    spec = SPECS[spec_name]
    weights = make_weights(spec)
    X, y = make_data(spec, weights)
    return -ref.finite_differences(
        spec, weights, lambda w: ref.measurement(name, ref.outputs(spec, w, X), y)
    )


class MeasurementChecks:
    """``per_sample_measurement_grads`` for every built-in measurement and a user callable."""

    def build_case(self, spec_name: str, dtype: str) -> Case:  # provided by BackendConformance
        raise NotImplementedError

    @pytest.mark.parametrize(("spec_name", "name"), CASES)
    @pytest.mark.parametrize("dtype", ["float64", "float32"])
    @optional
    def test_measurement_gradients_match_finite_differences(
        self, spec_name: str, name: str, dtype: str
    ) -> None:
        case = self.build_case(spec_name, dtype)
        measurement = resolve_measurement(MEASUREMENTS[name]())
        parts = [to_numpy(g) for _, g in case.model.iter_measurement_grads(case.data, measurement)]
        got = case.reference.to_canonical(np.concatenate(parts), axis=1)
        assert_close(got, expected_gradients(spec_name, name), case.rtol, f"∇θ of the {name}")

    @optional
    def test_loss_measurement_is_the_training_loss_gradient(self) -> None:
        case = self.build_case("mlp_tanh", "float64")
        got = np.concatenate(
            [
                to_numpy(g)
                for _, g in case.model.iter_measurement_grads(
                    case.data, resolve_measurement("loss")
                )
            ]
        )
        assert_close(
            got, to_numpy(case.model.per_sample_grads(case.data)), 1e-14, "loss measurement"
        )
