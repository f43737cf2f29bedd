"""The new conformance checks must fail on a broken backend: mutants of the torch kernels.

Each mutant breaks one thing a plugin author could get wrong; the check that
guards it is run against the mutant and must turn red.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch

from influence_conformance.calculator_checks import CalculatorChecks
from influence_conformance.cases import build_case, registered_builder
from influence_conformance.measurement_checks import MeasurementChecks
from influence_conformance.selection_checks import SelectionChecks
from influence_conformance.suite import BackendConformance
from influence_core import ExactIHVP, FirstOrderInfluenceCalculator, InfluenceModel
from influence_core.gradient_ranges import GradientRanges
from influence_core.plugin import ModelKernels
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

    @property
    def layout(self):
        return dataclasses.replace(super().layout, canonical_permutations=None)


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


class StaleUnselected(TorchKernels):
    """Captures the unselected weights once, at construction (the common functional-port bug)."""

    def __init__(self, model, loss_fn, parameters):
        super().__init__(model, loss_fn, parameters)
        self._stale = {
            n: p.detach().clone() for n, p in model.named_parameters() if n not in self._names
        }

    def _losses(self, params, inputs, targets):
        return super()._losses({**self._stale, **params}, inputs, targets)


def selection_checks_on(mutant: type[TorchKernels]) -> SelectionChecks:
    class OnMutant(SelectionChecks):
        backend = "torch"

        def build_case(self, spec_name: str, dtype: str):
            return build_case("torch", spec_name, dtype, registered_builder("torch"))

        def head_model(self, case, names):
            model = InfluenceModel(case.reference.model, case.reference.loss_fn, parameters=names)
            model.kernels = mutant(case.reference.model, case.reference.loss_fn, names)
            return model

    return OnMutant()


def test_the_selection_checks_catch_stale_unselected_weights() -> None:
    checks = selection_checks_on(StaleUnselected)
    with pytest.raises(AssertionError, match="first layer changed"):
        checks.test_a_sub_selection_sees_the_other_weights_change("mlp_tanh")
    with pytest.raises(AssertionError, match="TracIn over checkpoints of every weight"):
        checks.test_tracin_on_a_sub_selection_follows_checkpoints_of_every_weight("mlp_tanh")
    real = selection_checks_on(TorchKernels)
    real.test_a_sub_selection_sees_the_other_weights_change("mlp_tanh")
    real.test_tracin_on_a_sub_selection_follows_checkpoints_of_every_weight("mlp_tanh")


class OnlyTheAbstractMembers(TorchKernels):
    """A backend that implements the abstract members and none of the optional capabilities."""


OPTIONAL = (
    "save_state",
    "load_checkpoint",
    "save_checkpoint",
    "last_layer",
    "penultimate_features",
    "outputs",
    "output_loss_grads",
    "output_loss_hessians",
    "per_sample_measurement_grads",
)
for _name in OPTIONAL:  # the protocol's defaults: raise UnsupportedByBackendError
    setattr(OnlyTheAbstractMembers, _name, getattr(ModelKernels, _name))


def test_optional_checks_skip_with_a_reason_instead_of_failing(tmp_path) -> None:
    checks = checks_on(OnlyTheAbstractMembers, BackendConformance)
    optional_checks = [
        lambda: checks.test_last_layer_features_and_outputs("mlp_tanh", "float64"),
        lambda: checks.test_output_grads_of_the_last_layer("mlp_tanh"),
        lambda: checks.test_checkpoints_round_trip_and_restore("mlp_tanh"),
        lambda: checks.test_checkpoint_files_round_trip(tmp_path),
        lambda: checks.test_measurement_gradients_match_finite_differences(
            "mlp_tanh", "margin", "float64"
        ),
        lambda: checks.test_measurement_scores_match_the_definition("margin"),
    ]
    for check in optional_checks:
        with pytest.raises(pytest.skip.Exception, match="optional capability not implemented"):
            check()
    # and a required check still runs (and passes) on the same backend
    checks.test_per_sample_loss_matches_reference("mlp_tanh", "float64")


class FusedDrift(FirstOrderInfluenceCalculator):
    """Its fused call forgets RelatIF-style consistency: the scores come back 1 % off."""

    def influence_and_self_influence(self, test_data, train_data=None):
        scores, values = super().influence_and_self_influence(test_data, train_data)
        return scores * 1.01, values


class UnstableTopK(FirstOrderInfluenceCalculator):
    """Keeps the top-k of each training batch by a reversed order (ties and all)."""

    def top_k_from_prepared(self, prepared, train_data=None, k=5, desc=None):
        top = super().top_k_from_prepared(prepared, train_data, k + 1, desc)
        return type(top)(*(a[:, 1:] for a in top))


@pytest.mark.parametrize("broken", [FusedDrift, UnstableTopK])
def test_the_calculator_contract_catches_a_broken_calculator(broken, tmp_path) -> None:
    class OnBroken(CalculatorChecks):
        calculators: ClassVar = {"broken": lambda m: broken(m, ExactIHVP(damping=1e-2))}

        def build_case(self, spec_name, dtype):
            return build_case("torch", spec_name, dtype, registered_builder("torch"))

    with pytest.raises(AssertionError):
        OnBroken().test_every_calculator_keeps_its_contract("broken", tmp_path)


class OutputGradsOfTheMean(TorchKernels):
    """∂ℓ/∂Φ of the batch *mean* loss (each row 1/b too small): a reduction left on."""

    def output_loss_grads(self, outputs, targets):
        losses, grads = super().output_loss_grads(outputs, targets)
        return losses, grads / outputs.shape[0]


def test_the_named_last_layer_check_catches_output_grads_of_the_mean() -> None:
    checks = checks_on(OutputGradsOfTheMean, BackendConformance)
    with pytest.raises(AssertionError, match="∂ℓ/∂Φ"):
        checks.test_a_named_last_layer_gives_the_features_and_output_derivatives("mlp_tanh")
    checks_on(
        TorchKernels, BackendConformance
    ).test_a_named_last_layer_gives_the_features_and_output_derivatives("mlp_tanh")


class NoWrites(TorchKernels):
    """Neither writes θ in place nor declares itself functional."""

    set_flat_parameters = ModelKernels.set_flat_parameters


class FunctionalWithoutBinding(TorchKernels):
    """Declares functional = True but cannot return kernels at other weights."""

    functional = True


@pytest.mark.parametrize(
    ("kernels", "message"),
    [
        ("NoWrites", "does not implement set_flat_parameters"),
        ("FunctionalWithoutBinding", "does not implement with_parameters"),
    ],
)
def test_a_backend_that_cannot_compute_at_other_weights_is_refused(kernels, message) -> None:
    import torch

    from influence_core.plugin import BackendRegistry, BackendSpec, hookimpl

    class Plugin:
        @hookimpl
        def influence_core_backends(self):
            return [
                BackendSpec(
                    name="mutant",
                    model_types=("torch.nn.modules.module.Module",),
                    array_types=("torch.Tensor",),
                    kernels=f"test_conformance_mutants:{kernels}",
                    namespace="array_api_compat:torch",
                )
            ]

    registry = BackendRegistry(load_entry_points=False)
    registry.register(Plugin(), distribution="mutant-dist")
    model, loss = torch.nn.Linear(2, 2), torch.nn.MSELoss(reduction="none")
    with pytest.raises(TypeError, match=message):
        InfluenceModel(model, loss, backend="mutant", registry=registry)


class ChannelMajorPatches(TorchKernels):
    """Conv patches left in unfold's (in, kh, kw) order instead of the canonical (kh, kw, in)."""

    def layer_statistics(self, inputs, targets):
        stats = super().layer_statistics(inputs, targets)
        for layer in self.layers():
            if layer.kind == "conv2d":
                a, g = stats[layer.name]
                b, t, _ = a.shape
                channels = a.shape[2] // 9  # the reference convnet's 3 x 3 kernel
                a = a.reshape(b, t, 3, 3, channels).permute(0, 1, 4, 2, 3).reshape(b, t, -1)
                stats[layer.name] = (a, g)
        return stats


def test_the_layer_check_catches_patches_in_the_wrong_order() -> None:
    checks = checks_on(ChannelMajorPatches, BackendConformance)
    with pytest.raises(AssertionError, match="Σ_t aᵀg"):
        checks.test_layer_statistics_rebuild_the_per_sample_gradients("convnet", "float64")
    checks_on(
        TorchKernels, BackendConformance
    ).test_layer_statistics_rebuild_the_per_sample_gradients("convnet", "float64")


class MapInChannelMajorOrder(TorchKernels):
    """conv2d_map reading the kernels' rows as (in, kh, kw), not the canonical (kh, kw, in)."""

    def conv2d_map(self, layer, x, kernels):
        module = self._conv(layer)
        kh, kw = module.kernel_size
        m = kernels.shape[1]
        weight = kernels.reshape(module.in_channels, kh, kw, m).permute(3, 0, 1, 2)
        z = torch.nn.functional.conv2d(x, weight, None, module.stride, module.padding)
        return z.reshape(z.shape[0], m, -1).transpose(1, 2)


def test_the_deferred_convolution_check_catches_a_map_in_the_wrong_order() -> None:
    check = "test_deferred_convolutions_give_their_patches_and_their_map"
    with pytest.raises(AssertionError, match=r"conv2d_map\(x, K\) = patches @ K"):
        getattr(checks_on(MapInChannelMajorOrder, BackendConformance), check)()
    getattr(checks_on(TorchKernels, BackendConformance), check)()


class StatisticsOfTheLoss(TorchKernels):
    """Ignores the measurement in the layer statistics (the loss's output gradients instead)."""

    def layer_statistics(self, inputs, targets, measurement=None):
        return super().layer_statistics(inputs, targets)


def test_the_layer_check_catches_statistics_that_ignore_the_measurement() -> None:
    checks = checks_on(StatisticsOfTheLoss, BackendConformance)
    with pytest.raises(AssertionError, match="Σ_t aᵀg of the margin"):
        checks.test_layer_statistics_of_a_measurement_rebuild_its_gradients("convnet")
    checks_on(
        TorchKernels, BackendConformance
    ).test_layer_statistics_of_a_measurement_rebuild_its_gradients("convnet")


class HessianForGaussNewton(TorchKernels):
    """Returns the full Hessian product where the Gauss–Newton one is asked for."""

    def mean_loss_ggn_vp(self, inputs, targets, vectors):
        return self.mean_loss_hvp(inputs, targets, vectors)


def test_the_gauss_newton_check_catches_the_hessian_in_its_place() -> None:
    checks = checks_on(HessianForGaussNewton, BackendConformance)
    with pytest.raises(AssertionError, match="Jᵀ H_out J V"):
        checks.test_gauss_newton_products_match_numpy("mlp_tanh")
    checks.test_gauss_newton_products_match_numpy("logistic_regression")  # there G = H: passes
    checks_on(TorchKernels, BackendConformance).test_gauss_newton_products_match_numpy("mlp_tanh")


# -- issue 26, fault 14: statistics that do not fit their layer ---------------------------
class SwappedStatistics(TorchKernels):
    """Returns (g, a) for every layer: the output gradients where the inputs belong."""

    def layer_statistics(self, inputs, targets, measurement=None):
        stats = super().layer_statistics(inputs, targets, measurement)
        return {name: (g, a) for name, (a, g) in stats.items()}


def test_layer_statistics_of_the_wrong_shape_are_refused_naming_the_layer() -> None:
    import numpy as np
    import torch

    from influence_core import KFACIHVP, TracIn

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(13, 5)).double()
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    data = (np.random.default_rng(0).normal(size=(8, 13)), np.arange(8) % 5)
    model = InfluenceModel(net, loss)
    model.kernels = SwappedStatistics(net, loss, None)
    swapped = r"layer '0' \(dense, p_in=13, p_out=5\).*look swapped"
    with pytest.raises(ValueError, match=swapped):
        FirstOrderInfluenceCalculator(model, KFACIHVP(damping=0.1)).fit(data)
    with pytest.raises(ValueError, match=swapped):  # was silently wrong (Spearman 0.23)
        TracIn(model, [model.save_state()], 0.1).fit(data).self_influence()
    model.kernels = TorchKernels(net, loss, None)
    TracIn(model, [model.save_state()], 0.1).fit(data).self_influence()


# -- issue 26, fault 13: what save_state returns, and who must implement it ------------------
class NestedState(TorchKernels):
    """save_state as a nested dict: it was fingerprinted by object address."""

    def save_state(self):
        return {"layers": super().save_state()}


def test_a_nested_save_state_is_refused_as_not_flat() -> None:
    import torch

    from influence_core.io import weights_fingerprint

    net, loss = torch.nn.Linear(2, 2), torch.nn.MSELoss(reduction="none")
    model = InfluenceModel(net, loss)
    model.kernels = NestedState(net, loss, None)
    with pytest.raises(TypeError, match=r"must be flat .* 'layers' holds a dict"):
        weights_fingerprint(model)
    model.kernels = TorchKernels(net, loss, None)
    assert weights_fingerprint(model) == weights_fingerprint(model)


class FunctionalWithoutState(TorchKernels):
    """Functional, binds θ, but cannot give a state of every weight (views need one)."""

    functional = True

    def with_parameters(self, flat):
        return self


def test_a_functional_backend_without_save_state_and_with_checkpoint_is_refused() -> None:
    import torch

    from influence_core.plugin import ModelKernels

    class NoState(FunctionalWithoutState):
        save_state = ModelKernels.save_state

    net, loss = torch.nn.Linear(2, 2), torch.nn.MSELoss(reduction="none")
    with pytest.raises(TypeError, match="does not implement with_checkpoint, save_state"):
        from influence_core.model import _check_writes_theta

        _check_writes_theta(NoState(net, loss, None))


# -- layer kinds (embedding, elementwise) and segment_sum -------------------------------------
class PaddingRowsGetGradients(TorchKernels):
    """Forgets that torch gives an embedding's padding row no gradient."""

    def layer_statistics(self, inputs, targets, measurement=None):
        tables = [m for m in self.module.modules() if isinstance(m, torch.nn.Embedding)]
        saved = [m.padding_idx for m in tables]
        for table in tables:
            table.padding_idx = None  # the forward values are the same; only the mask is lost
        try:
            return super().layer_statistics(inputs, targets, measurement)
        finally:
            for table, index in zip(tables, saved, strict=True):
                table.padding_idx = index


class RawNormInputs(TorchKernels):
    """Gives a normalisation layer its raw input as a instead of the normalised x̂."""

    def layer_statistics(self, inputs, targets, measurement=None):
        from influence_torch import layers

        original = layers._normalised
        layers._normalised = lambda module, x: x
        try:
            return super().layer_statistics(inputs, targets, measurement)
        finally:
            layers._normalised = original


class ParametersInTheirOwnOrder(TorchKernels):
    """Gives a "parameter" layer its gradient in torch's layout, not the canonical one
    (a Linear subclass with its own forward: (out, in) where the layout says (in, out))."""

    def _parameter_statistics(self, names, inputs, targets, function):
        permutations = self._layout.canonical_permutations
        object.__setattr__(self._layout, "canonical_permutations", (None,) * len(permutations))
        try:
            return super()._parameter_statistics(names, inputs, targets, function)
        finally:
            object.__setattr__(self._layout, "canonical_permutations", permutations)


class LastSegmentDropped(TorchKernels):
    """A scatter that loses the rows of the last segment (an off-by-one in the count)."""

    def segment_sum(self, values, segments, count):
        return super().segment_sum(values * (segments != count - 1)[:, None], segments, count)


class ProductIntoTheWrongBuffer(TorchKernels):
    """Writes the product into a fresh array and returns ``out`` as it was (a lost result)."""

    def matmul_into(self, x1, x2, out):
        torch.matmul(x1, x2)
        return out


def kind_checks_on(mutant: type[TorchKernels]):
    class OnMutant(BackendConformance):
        backend = "torch"

        def layer_kind_case(self, kind):
            model, data = super().layer_kind_case(kind)
            model.kernels = mutant(model.kernels.module, model.kernels.loss_fn, None)
            return model, data

        def segment_sum_model(self):
            model = super().segment_sum_model()
            model.kernels = mutant(model.kernels.module, model.kernels.loss_fn, None)
            return model

    return OnMutant()


@pytest.mark.parametrize(
    ("mutant", "kind"),
    [
        (PaddingRowsGetGradients, "embedding"),
        (RawNormInputs, "elementwise"),
        (ParametersInTheirOwnOrder, "parameter"),
    ],
)
def test_the_layer_kind_checks_catch_a_broken_kind(mutant, kind: str) -> None:
    check = "test_statistics_of_each_layer_kind_rebuild_the_per_sample_gradients"
    with pytest.raises(AssertionError, match=f"from {kind} statistics"):
        getattr(kind_checks_on(mutant), check)(kind)
    getattr(kind_checks_on(TorchKernels), check)(kind)


def test_the_segment_sum_check_catches_a_lost_segment() -> None:
    with pytest.raises(AssertionError, match=r"segment_sum against numpy\.add\.at"):
        kind_checks_on(LastSegmentDropped).test_segment_sum_adds_rows_into_their_segments()
    kind_checks_on(TorchKernels).test_segment_sum_adds_rows_into_their_segments()


def test_the_matmul_into_check_catches_a_lost_product() -> None:
    with pytest.raises(AssertionError, match=r"matmul_into against numpy\.matmul"):
        kind_checks_on(
            ProductIntoTheWrongBuffer
        ).test_matmul_into_writes_the_product_into_the_buffer_given()
    kind_checks_on(TorchKernels).test_matmul_into_writes_the_product_into_the_buffer_given()


# -- issue 28: the metagradient reads HVPs along the whole trajectory -----------------------
class HessianOfTheFirstSample(TorchKernels):
    """A Hessian-vector product of the batch's first sample only (a reduction slip)."""

    def mean_loss_hvp(self, inputs, targets, vectors):
        return super().mean_loss_hvp(inputs[:1], targets[:1], vectors)


def test_the_unrolling_check_catches_a_wrong_hessian_vector_product() -> None:
    from influence_core.unrolling import SGD

    optimizer = SGD(lr=0.3, momentum=0.9, weight_decay=1e-2)
    with pytest.raises(AssertionError, match="metagradient of sample"):
        checks_on(
            HessianOfTheFirstSample, BackendConformance
        ).test_metagradients_match_finite_differences_of_the_replayed_run(optimizer)
    checks_on(
        TorchKernels, BackendConformance
    ).test_metagradients_match_finite_differences_of_the_replayed_run(optimizer)


class ReversedColumns(TorchKernels):
    """A forward-mode product that pairs each column's result with the wrong vector."""

    def per_sample_loss_jvp(self, inputs, targets, vectors):
        return super().per_sample_loss_jvp(inputs, targets, vectors.flip(1))


def test_the_jvp_check_catches_products_with_the_wrong_vectors() -> None:
    check = "test_per_sample_loss_jvps_are_the_per_sample_gradients_times_the_vectors"
    with pytest.raises(AssertionError, match="per-sample gradients @ V"):
        getattr(checks_on(ReversedColumns, BackendConformance), check)("mlp_tanh")
    getattr(checks_on(TorchKernels, BackendConformance), check)("mlp_tanh")


# -- gradient ranges: a redrawn dense projection reads each kind's entries from statistics ------
def embedding_rows_unshifted(self, block, first, last):
    """Places a table's rows as if every range began at token 0 (the offset forgotten)."""
    placed = original_embedding(self, block, 0, last - first)
    return placed


def kernel_read_as_bias(self, block, *, bias):
    """An elementwise kernel's gradient read as Σ_t g (the inputs a forgotten)."""
    return original_small(self, block, bias=True)


def dense_rows_from_the_start(self, piece, lo, hi):
    """A dense kernel's range always formed from input row 0 (the row offset forgotten)."""
    if piece.bias or piece.block.kind != "dense":
        return original_entries(self, piece, lo, hi)
    return original_entries(self, piece, 0, hi - lo)


original_embedding = GradientRanges._embedding
original_small = GradientRanges._small_part
original_entries = GradientRanges.entries


@pytest.mark.parametrize(
    ("attribute", "mutant", "kind"),
    [
        ("_embedding", embedding_rows_unshifted, "embedding"),
        ("_small_part", kernel_read_as_bias, "elementwise"),
        ("entries", dense_rows_from_the_start, "parameter"),
    ],
)
def test_the_range_check_catches_a_wrong_gradient_range(
    monkeypatch, attribute: str, mutant, kind: str
) -> None:
    check = kind_checks_on(TorchKernels)
    check.test_a_redrawn_projection_reads_each_layer_kind_range_by_range(kind)
    monkeypatch.setattr(GradientRanges, attribute, mutant)
    with pytest.raises(AssertionError, match=f"redrawn projection of {kind} gradient ranges"):
        check.test_a_redrawn_projection_reads_each_layer_kind_range_by_range(kind)
