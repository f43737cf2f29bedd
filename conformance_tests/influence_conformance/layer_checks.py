"""Conformance checks of the optional layer-wise statistics (K-FAC, EK-FAC), against NumPy.

For every reference model (dense and convolutional): the last layer's inputs
equal the NumPy penultimate features and its output gradients equal ∂ℓ/∂Φ;
the per-sample gradients rebuilt from every layer's statistics equal the
backend's flat per-sample gradients (which the rest of the suite checks
against NumPy), of the loss and of a measurement; the optional deferred
convolutions (a convolution's input in place of its patches, which
``conv2d_patches`` and ``conv2d_map`` read) give the same patches and
patches @ K; and EK-FAC is exact where the factorisation is (a linear model
whose empirical Fisher is its Hessian is not among the specs, so the suite
checks the solver on the statistics instead: its damped curvature applied to
a vector equals the Kronecker formula built from NumPy).
"""

from __future__ import annotations

import numpy as np
import pytest

from influence_core.layerwise import covering_layers, per_sample_grads_from_layers
from influence_core.measurements import logit, margin

from . import numpy_reference as ref
from .cases import Case, assert_close, optional, to_numpy
from .reference_specs import SPECS

ALL_SPECS = list(SPECS)


class LayerChecks:
    """``layers`` / ``layer_statistics``: the statistics and the gradients rebuilt from them."""

    def build_case(self, spec_name: str, dtype: str) -> Case:  # provided by BackendConformance
        raise NotImplementedError

    @pytest.mark.parametrize("spec_name", ALL_SPECS)
    @pytest.mark.parametrize("dtype", ["float64", "float32"])
    @optional
    def test_layer_statistics_rebuild_the_per_sample_gradients(
        self, spec_name: str, dtype: str
    ) -> None:
        case = self.build_case(spec_name, dtype)
        model = case.model
        blocks = covering_layers(model)
        assert len(blocks) == len(case.spec.parameter_shapes()), "one layer per spec layer"
        rebuilt = per_sample_grads_from_layers(model, case.data)
        assert_close(rebuilt, model.per_sample_grads(case.data), case.rtol, "Σ_t aᵀg = ∇ℓ")

    @pytest.mark.parametrize("spec_name", ["mlp_tanh", "convnet"])
    @optional
    def test_layer_statistics_of_a_measurement_rebuild_its_gradients(self, spec_name: str) -> None:
        """With ``measurement=``, g is ∂m/∂z of that function (the Kronecker projection's input)."""
        case = self.build_case(spec_name, "float64")
        model = case.model
        batch = next(iter(model.batches(case.data, len(case.y))))
        for measurement in (margin(), logit(1)):
            rebuilt = per_sample_grads_from_layers(model, case.data, measurement)
            expected = model.batch_per_sample_grads(batch, measurement)
            assert_close(
                rebuilt, to_numpy(expected), case.rtol, f"Σ_t aᵀg of the {measurement.name}"
            )

    @pytest.mark.parametrize("spec_name", ALL_SPECS)
    @optional
    def test_the_last_layer_s_statistics_match_numpy(self, spec_name: str) -> None:
        case = self.build_case(spec_name, "float64")
        model = case.model
        last = covering_layers(model)[-1].layer
        X, y = model.kernels.as_native(case.X), model.kernels.as_native(case.y)
        a, g = model.kernels.layer_statistics(X, y)[last.name]
        features = ref.penultimate_features(case.spec, case.weights, case.X)
        outputs = features @ case.weights[-2] + case.weights[-1]
        assert tuple(a.shape) == (len(case.y), 1, features.shape[1]), "a: (b, T = 1, p_in)"
        assert_close(to_numpy(a)[:, 0, :], features, 1e-10, "the last layer's inputs a")
        expected = ref.output_loss_grads(case.spec, outputs, case.y)
        assert_close(to_numpy(g)[:, 0, :], expected, 1e-10, "∂ℓ/∂z at the last layer")
        assert (last.inputs, last.outputs) == case.weights[-2].shape
        assert last.kind == "dense"

    @optional
    def test_deferred_convolutions_give_their_patches_and_their_map(self) -> None:
        """``layer_statistics_deferred``, ``conv2d_patches`` and ``conv2d_map``, where a backend has them.

        The deferred statistics equal :meth:`layer_statistics` but for each
        convolution's first entry (its input, opaque); from that input
        ``conv2d_patches`` gives the statistics' patches and ``conv2d_map(x, K)``
        gives patches @ K without them. A backend without them is skipped.
        """
        case = self.build_case("convnet", "float64")
        kernels = case.model.kernels
        X, y = kernels.as_native(case.X), kernels.as_native(case.y)
        deferred = kernels.layer_statistics_deferred(X, y)
        plain = kernels.layer_statistics(X, y)
        rng = np.random.default_rng(2)
        convolutions = 0
        for layer in kernels.layers():
            a, g = (to_numpy(array) for array in plain[layer.name])
            x, g_deferred = deferred[layer.name]
            assert_close(g_deferred, g, 1e-12, f"g of layer {layer.name!r}, deferred")
            if layer.kind != "conv2d":
                assert_close(x, a, 1e-12, f"a of layer {layer.name!r}, deferred")
                continue
            convolutions += 1
            patches = kernels.conv2d_patches(layer, x)
            assert_close(patches, a, 1e-12, "conv2d_patches of the deferred input")
            K = rng.standard_normal((layer.inputs, 5))
            mapped = kernels.conv2d_map(layer, x, kernels.as_native(K, floating=True))
            assert_close(mapped, a @ K, 1e-10, "conv2d_map(x, K) = patches @ K")
        assert convolutions, "the reference convnet has a conv2d layer"
