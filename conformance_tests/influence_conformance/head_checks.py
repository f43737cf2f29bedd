"""Conformance checks of the optional capabilities: checkpoints and the last linear layer."""

from __future__ import annotations

import numpy as np
import pytest

from influence_core import InfluenceModel, logit

from . import numpy_reference as ref
from .cases import Case, assert_close, optional
from .reference_specs import SPECS

ALL_SPECS = list(SPECS)


class HeadChecks:
    """``save_state``/``load_checkpoint`` and the features → last layer split, against NumPy."""

    def build_case(self, spec_name: str, dtype: str) -> Case:  # provided by BackendConformance
        raise NotImplementedError

    @pytest.mark.parametrize("spec_name", ALL_SPECS)
    @pytest.mark.parametrize("dtype", ["float64", "float32"])
    @optional
    def test_last_layer_features_and_outputs(self, spec_name: str, dtype: str) -> None:
        case = self.build_case(spec_name, dtype)
        kernels, host = case.model.kernels, case.model.to_numpy
        X = kernels.as_native(case.X)
        last = kernels.last_layer()
        exact = 0.0 if dtype == "float64" else case.rtol  # float32 rounds the weights
        assert_close(host(last.weight), case.weights[-2], exact, "last-layer kernel (p, c)")
        assert_close(host(last.bias), case.weights[-1], exact, "last-layer bias")
        features = ref.penultimate_features(case.spec, case.weights, case.X)
        assert_close(kernels.penultimate_features(X), features, case.rtol, "penultimate features")
        outputs = features @ case.weights[-2] + case.weights[-1]
        assert_close(kernels.outputs(X), outputs, case.rtol, "model outputs")
        losses, grads = kernels.output_loss_grads(kernels.outputs(X), kernels.as_native(case.y))
        expected_loss = ref.per_sample_loss(case.spec, case.weights, case.X, case.y)
        assert_close(losses, expected_loss, case.rtol, "loss at the outputs")
        assert_close(grads, ref.output_loss_grads(case.spec, outputs, case.y), case.rtol, "∂ℓ/∂Φ")
        hessians = kernels.output_loss_hessians(kernels.outputs(X), kernels.as_native(case.y))
        assert_close(hessians, ref.output_loss_hessians(case.spec, outputs), case.rtol, "∂²ℓ/∂Φ²")
        # The layer name selects exactly the last layer's parameters.
        head = InfluenceModel(case.reference.model, case.reference.loss_fn, parameters=last.name)
        assert head.num_parameters == case.weights[-2].size + case.weights[-1].size

    @pytest.mark.parametrize("spec_name", ALL_SPECS)
    @optional
    def test_a_named_last_layer_gives_the_features_and_output_derivatives(
        self, spec_name: str
    ) -> None:
        """``last_layer=`` (the representers on a backend with no ``last_layer()``), against NumPy.

        The core reads W and b from the named parameters and f(x) from
        ∂Φ_0/∂W[:, 0]; the backend supplies only outputs, measurement gradients
        and the loss's derivatives at the outputs, all checked here.
        """
        from influence_core.estimators.representer import (
            features_of_named_layer,
            named_linear_layer,
        )

        from .selection_checks import last_layer_names

        case = self.build_case(spec_name, "float64")
        kernels, names = case.model.kernels, last_layer_names(case)
        head = case.model.with_parameters(names)
        layer = named_linear_layer(head, names)
        assert_close(layer.weight, case.weights[-2], 0.0, "named last-layer kernel (p, c)")
        assert_close(layer.bias, case.weights[-1], 0.0, "named last-layer bias")
        X = kernels.as_native(case.X)
        features = ref.penultimate_features(case.spec, case.weights, case.X)
        got = features_of_named_layer(head, layer, X)
        assert_close(got, features, 1e-10, "features as ∂Φ_0/∂W[:, 0]")
        outputs = features @ case.weights[-2] + case.weights[-1]
        native = kernels.as_native(outputs)
        losses, grads = kernels.output_loss_grads(native, kernels.as_native(case.y))
        expected_loss = ref.per_sample_loss(case.spec, case.weights, case.X, case.y)
        assert_close(losses, expected_loss, 1e-10, "loss at the outputs")
        assert_close(grads, ref.output_loss_grads(case.spec, outputs, case.y), 1e-10, "∂ℓ/∂Φ")
        hessians = kernels.output_loss_hessians(native, kernels.as_native(case.y))
        assert_close(hessians, ref.output_loss_hessians(case.spec, outputs), 1e-10, "∂²ℓ/∂Φ²")

    @pytest.mark.parametrize("spec_name", ALL_SPECS)
    @optional
    def test_output_grads_of_the_last_layer(self, spec_name: str) -> None:
        """∇_(W,b) Φ_k(x) = (f(x) ⊗ e_k, e_k), in the backend's own layout."""
        case = self.build_case(spec_name, "float64")
        kernels = case.model.kernels
        last = kernels.last_layer()
        head = InfluenceModel(case.reference.model, case.reference.loss_fn, parameters=last.name)
        c = case.weights[-1].size
        components = np.arange(len(case.y)) % c
        # The kernel differentiates the loss-like −Φ_k (a proponent raises Φ_k): negate it.
        got = -head.to_numpy(
            head.kernels.per_sample_measurement_grads(
                kernels.as_native(case.X), kernels.as_native(components), logit().loss_like(head.xp)
            )
        )
        features = ref.penultimate_features(case.spec, case.weights, case.X)
        onehot = np.eye(c)[components]
        kernel_part = (features[:, :, None] * onehot[:, None, :]).reshape(len(case.y), -1)
        expected_canonical = np.concatenate([kernel_part, onehot], axis=1)
        # The backend's flat order of (W, b), found by matching its θ to the canonical weights.
        probe = head.to_numpy(head.get_parameters())
        expected_probe = np.concatenate([case.weights[-2].ravel(), case.weights[-1]])
        order = _layout(probe, expected_probe)
        assert_close(got, expected_canonical[:, order], 1e-10, "∇θ Φ_k on the last layer")

    @pytest.mark.parametrize("spec_name", ["mlp_tanh", "convnet"])
    @optional
    def test_checkpoints_round_trip_and_restore(self, spec_name: str) -> None:
        case = self.build_case(spec_name, "float64")
        model, host = case.model, case.model.to_numpy
        theta = host(model.get_parameters())
        state = model.kernels.save_state()
        with model.parameters_set_to(theta + 1.0):
            other = model.kernels.save_state()
        assert_close(model.get_parameters(), theta, 0.0, "θ after parameters_set_to")
        with model.checkpoint_loaded(other):
            assert_close(model.get_parameters(), theta + 1.0, 0.0, "θ inside checkpoint_loaded")
        assert_close(model.get_parameters(), theta, 0.0, "θ restored after checkpoint_loaded")
        with model.checkpoint_loaded(other), model.checkpoint_loaded(state):
            assert_close(model.get_parameters(), theta, 0.0, "θ of its own state, nested")

    @optional
    def test_checkpoint_files_round_trip(self, tmp_path) -> None:
        case = self.build_case("mlp_tanh", "float64")
        model, host = case.model, case.model.to_numpy
        theta = host(model.get_parameters())
        path = str(tmp_path / f"checkpoint{model.kernels.checkpoint_suffix}")
        with model.parameters_set_to(theta * 2.0):
            model.kernels.save_checkpoint(path)
        with model.checkpoint_loaded(path):
            assert_close(model.get_parameters(), theta * 2.0, 0.0, "θ loaded from the file")
        assert_close(model.get_parameters(), theta, 0.0, "θ restored")


def _layout(backend_flat: np.ndarray, canonical_flat: np.ndarray) -> np.ndarray:
    """Positions: backend entry i is canonical entry order[i] (weights drawn continuous, so unique)."""
    lookup = {value: i for i, value in enumerate(canonical_flat.tolist())}
    return np.array([lookup[value] for value in backend_flat.tolist()])
