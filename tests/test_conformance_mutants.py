"""The new conformance checks must fail on a broken backend: mutants of the torch kernels.

Each mutant breaks one thing a plugin author could get wrong; the check that
guards it is run against the mutant and must turn red.
"""

from __future__ import annotations

import dataclasses

import pytest

from influence_conformance.cases import build_case, registered_builder
from influence_conformance.measurement_checks import MeasurementChecks
from influence_conformance.suite import BackendConformance
from influence_core import InfluenceModel
from influence_torch.model import TorchKernels


class SignFlipped(TorchKernels):
    """Returns ∇f instead of the loss-like −∇f (the sign convention missed)."""

    def per_sample_measurement_grads(self, inputs, targets, measurement):
        return -super().per_sample_measurement_grads(inputs, targets, measurement)


class LossInstead(TorchKernels):
    """Ignores the measurement and returns the loss gradients."""

    def per_sample_measurement_grads(self, inputs, targets, measurement):
        return self.per_sample_grads(inputs, targets)


class BatchMeanTargets(TorchKernels):
    """Hands every sample the first sample's target (a broadcasting slip)."""

    def per_sample_measurement_grads(self, inputs, targets, measurement):
        return super().per_sample_measurement_grads(
            inputs, targets[:1].expand_as(targets), measurement
        )


class NativeLayouts(TorchKernels):
    """Claims the native layout is canonical (forgets that Linear.weight is (out, in))."""

    def canonical_layouts(self):
        return (None,) * len(self.parameter_names)


def checks_on(mutant: type[TorchKernels], base: type = MeasurementChecks):
    class OnMutant(base):
        backend = "torch"

        def build_case(self, spec_name: str, dtype: str):
            case = build_case("torch", spec_name, dtype, registered_builder("torch"))
            model = InfluenceModel(case.reference.model, case.reference.loss_fn, batch_size=4)
            model.kernels = mutant(case.reference.model, case.reference.loss_fn, None)
            return dataclasses.replace(case, model=model)

    return OnMutant()


@pytest.mark.parametrize("mutant", [SignFlipped, LossInstead, BatchMeanTargets])
@pytest.mark.parametrize("name", ["logit", "margin"])
def test_the_measurement_check_catches_a_broken_kernel(mutant, name: str) -> None:
    checks = checks_on(mutant)
    with pytest.raises(AssertionError, match=f"of the {name}"):
        checks.test_measurement_gradients_match_finite_differences("mlp_tanh", name, "float64")


def test_the_measurement_check_passes_the_real_kernel() -> None:
    checks_on(TorchKernels).test_measurement_gradients_match_finite_differences(
        "mlp_tanh", "margin", "float64"
    )


def test_the_layout_check_catches_a_wrong_canonical_layout() -> None:
    checks = checks_on(NativeLayouts, BackendConformance)
    with pytest.raises(AssertionError, match="to_canonical"):
        checks.test_canonical_layouts_map_theta_to_the_canonical_weights("mlp_tanh")
    checks_on(
        TorchKernels, BackendConformance
    ).test_canonical_layouts_map_theta_to_the_canonical_weights("mlp_tanh")
