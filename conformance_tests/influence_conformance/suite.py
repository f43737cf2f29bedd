"""The conformance checks a backend runs, as pytest base classes.

Subclass and name your backend (the fsspec ``tests/abstract`` pattern)::

    # tests/test_conformance.py of your plugin
    from influence_conformance import BackendConformance

    class TestMyBackend(BackendConformance):
        backend = "mybackend"     # the BackendSpec name your plugin registers

The suite needs a *reference builder*, ``build(spec, weights, dtype) ->
ReferenceModel``, which turns each framework-neutral
:class:`~influence_conformance.specs.ModelSpec` into a native model with the given
canonical weights. By default it is the one your
:class:`~influence_core.BackendSpec` names in ``reference_models``; override
:meth:`BackendConformance.reference_builder` to supply another. Or, with no
test file at all::

    python -m influence_conformance --backend mybackend
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

from influence_core import (
    DatasetFormatError,
    ExactIHVP,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
    NonFiniteGradientError,
    PerSampleLossError,
    UnknownParameterError,
    get_registry,
)

from . import numpy_reference as ref
from .calculator_checks import CalculatorChecks
from .cases import (
    BATCH_SIZE,
    RTOL,
    Case,
    ReferenceBuilder,
    assert_close,
    build_case,
    numpy_gradients,
    registered_builder,
    to_numpy,
)
from .ggn_checks import GGNChecks
from .head_checks import HeadChecks
from .ihvp_checks import IHVPChecks
from .influence_checks import InfluenceChecks
from .layer_checks import LayerChecks
from .layer_kind_checks import LayerKindChecks
from .measurement_checks import MeasurementChecks
from .reference_specs import SPECS
from .selection_checks import SelectionChecks
from .unrolling_checks import UnrollingChecks

ALL_SPECS = list(SPECS)
CLOSED_FORM = [s for s in SPECS if SPECS[s].reference == "closed_form"]
NONLINEAR = [s for s in SPECS if SPECS[s].reference == "finite_differences"]
DTYPES = list(RTOL)

spec_names = pytest.mark.parametrize("spec_name", ALL_SPECS)
dtypes = pytest.mark.parametrize("dtype", DTYPES)


class BackendConformance(
    IHVPChecks,
    InfluenceChecks,
    HeadChecks,
    MeasurementChecks,
    SelectionChecks,
    CalculatorChecks,
    LayerChecks,
    LayerKindChecks,
    GGNChecks,
    UnrollingChecks,
):
    """Numerical and behavioural checks of one backend: its kernels, and the solvers on them."""

    #: The registered name of the backend under test.
    backend: str = ""

    def reference_builder(self) -> ReferenceBuilder:
        """``build(spec, weights, dtype) -> ReferenceModel``; by default the registered one."""
        return registered_builder(self.backend)

    def segment_sum_model(self) -> Any:
        return self.build_case("mlp_tanh", "float64").model

    def build_case(self, spec_name: str, dtype: str) -> Case:
        if not self.backend:
            raise TypeError(f"{type(self).__name__} must set the class attribute 'backend'")
        return build_case(self.backend, spec_name, dtype, self.reference_builder())

    # -- layout -------------------------------------------------------------------
    @spec_names
    def test_flat_parameters_are_the_canonical_weights(self, spec_name: str) -> None:
        case = self.build_case(spec_name, "float64")
        flat = case.reference.to_canonical(case.model.to_numpy(case.model.get_parameters()))
        assert_close(flat, ref.flatten_weights(case.weights), 0.0, "θ in canonical order")
        assert case.model.num_parameters == case.spec.num_parameters

    @spec_names
    def test_canonical_layouts_map_theta_to_the_canonical_weights(self, spec_name: str) -> None:
        """``InfluenceModel.to_canonical`` (the backend's ``ParameterLayout``) is the canonical θ."""
        case = self.build_case(spec_name, "float64")
        model, host = case.model, case.model.to_numpy
        canonical = ref.flatten_weights(case.weights)
        assert_close(model.to_canonical(model.get_parameters()), canonical, 0.0, "to_canonical(θ)")
        assert_close(model.from_canonical(canonical), host(model.get_parameters()), 0.0, "back")
        block = np.stack([canonical, 2 * canonical], axis=1)  # a (d, k) block, column by column
        assert_close(model.to_canonical(model.from_canonical(block)), block, 0.0, "round trip")

    # -- first order --------------------------------------------------------------
    @spec_names
    @dtypes
    def test_per_sample_loss_matches_reference(self, spec_name: str, dtype: str) -> None:
        case = self.build_case(spec_name, dtype)
        expected = ref.per_sample_loss(case.spec, case.weights, case.X, case.y)
        assert_close(case.model.per_sample_loss(case.data), expected, case.rtol, "per-sample loss")

    @pytest.mark.parametrize("spec_name", CLOSED_FORM)
    @dtypes
    def test_per_sample_grads_match_closed_form(self, spec_name: str, dtype: str) -> None:
        self._check_per_sample_grads(spec_name, dtype)

    @pytest.mark.parametrize("spec_name", NONLINEAR)
    @dtypes
    def test_per_sample_grads_match_finite_differences(self, spec_name: str, dtype: str) -> None:
        self._check_per_sample_grads(spec_name, dtype)

    def _check_per_sample_grads(self, spec_name: str, dtype: str) -> None:
        case = self.build_case(spec_name, dtype)
        grads = to_numpy(case.model.per_sample_grads(case.data))
        assert grads.shape == (len(case.X), case.spec.num_parameters)
        expected = numpy_gradients(spec_name)
        assert_close(
            case.reference.to_canonical(grads, axis=1), expected, case.rtol, "per-sample grads"
        )

    @spec_names
    @dtypes
    def test_loss_grad_weights_the_partial_last_batch(self, spec_name: str, dtype: str) -> None:
        case = self.build_case(spec_name, dtype)
        grad = case.reference.to_canonical(to_numpy(case.model.loss_grad(case.data)))
        assert_close(grad, numpy_gradients(spec_name).mean(axis=0), case.rtol, "mean-loss gradient")

    # -- second order -------------------------------------------------------------
    @pytest.mark.parametrize("spec_name", CLOSED_FORM)
    @dtypes
    def test_hessian_matches_closed_form(self, spec_name: str, dtype: str) -> None:
        case = self.build_case(spec_name, dtype)
        H = to_numpy(case.model.hessian(case.data))
        H = case.reference.to_canonical(case.reference.to_canonical(H, axis=0), axis=1)
        expected = ref.closed_form_hessian(case.spec, case.weights, case.X, case.y)
        assert_close(H, expected, case.rtol, "Hessian")

    @spec_names
    @dtypes
    def test_hessian_is_symmetric(self, spec_name: str, dtype: str) -> None:
        case = self.build_case(spec_name, dtype)
        H = to_numpy(case.model.hessian(case.data))
        assert_close(H, H.T, case.rtol, "Hessian symmetry")
        assert np.abs(H).max() > 0, "Hessian is identically zero"

    @spec_names
    @dtypes
    def test_hvp_block_matches_full_hessian(self, spec_name: str, dtype: str) -> None:
        case = self.build_case(spec_name, dtype)
        V = np.random.default_rng(2).normal(size=(case.model.num_parameters, 3))
        H = to_numpy(case.model.hessian(case.data, block_size=7))
        assert_close(case.model.hvp(case.data, V), H @ V, case.rtol, "HVP vs Hessian")

    @spec_names
    @dtypes
    def test_block_hvp_equals_single_hvps(self, spec_name: str, dtype: str) -> None:
        case = self.build_case(spec_name, dtype)
        V = np.random.default_rng(3).normal(size=(case.model.num_parameters, 4))
        block = to_numpy(case.model.hvp(case.data, V))
        singles = np.stack([to_numpy(case.model.hvp(case.data, V[:, j])) for j in range(4)], axis=1)
        assert_close(block, singles, case.rtol, "block HVP vs single HVPs")

    @spec_names
    def test_hvp_matches_finite_differences_of_gradients(self, spec_name: str) -> None:
        case = self.build_case(spec_name, "float64")
        model, theta = case.model, to_numpy(case.model.get_parameters())
        v = np.random.default_rng(4).normal(size=theta.shape)
        v /= np.linalg.norm(v)
        step = 1e-3

        def grad_at(offset: float) -> np.ndarray:
            with model.parameters_set_to(theta + offset * v):
                return to_numpy(model.loss_grad(case.data))

        fd = (-grad_at(2 * step) + 8 * grad_at(step) - 8 * grad_at(-step) + grad_at(-2 * step)) / (
            12 * step
        )
        assert_close(model.hvp(case.data, v), fd, 1e-8, "HVP vs finite differences of gradients")

    # -- parameters ---------------------------------------------------------------
    @spec_names
    def test_parameters_set_to_round_trips_and_restores(self, spec_name: str) -> None:
        case = self.build_case(spec_name, "float64")
        model = case.model
        theta = to_numpy(model.get_parameters())
        before = to_numpy(model.per_sample_loss(case.data))
        shifted = theta + 0.1
        with model.parameters_set_to(shifted):
            assert_close(model.get_parameters(), shifted, 0.0, "θ inside the with block")
            expected = ref.per_sample_loss(
                case.spec,
                ref.unflatten_weights(case.spec, case.reference.to_canonical(shifted)),
                case.X,
                case.y,
            )
            assert_close(model.per_sample_loss(case.data), expected, 1e-8, "loss at shifted θ")
        assert_close(model.get_parameters(), theta, 0.0, "θ restored after the with block")
        assert_close(model.per_sample_loss(case.data), before, 0.0, "loss restored")
        with pytest.raises(RuntimeError), model.parameters_set_to(shifted):
            raise RuntimeError("boom")
        assert_close(model.get_parameters(), theta, 0.0, "θ restored after an exception")

    def test_other_weights_are_where_the_backend_declares(self) -> None:
        """A functional backend never writes into the model; an in-place one does, then restores.

        Inside ``parameters_set_to``, a second ``InfluenceModel`` built on the same
        user model sees the original θ when ``functional = True`` (nothing was
        written) and the new θ otherwise (it was written in place). A view made
        with ``with_parameters`` inside the block computes at the new weights either way.
        """
        case = self.build_case("mlp_tanh", "float64")
        model = case.model
        theta = to_numpy(model.get_parameters())
        shifted = theta + 0.25
        functional = bool(model.kernels.functional)
        with model.parameters_set_to(shifted):
            fresh = InfluenceModel(
                case.reference.model, case.reference.loss_fn, backend=self.backend
            )
            seen = to_numpy(fresh.get_parameters())
            expected = theta if functional else shifted
            what = "untouched by a functional backend" if functional else "written in place"
            assert_close(seen, expected, 0.0, f"the user's model inside the block: {what}")
            view = model.with_parameters(None)
            assert_close(view.get_parameters(), shifted, 0.0, "a view made inside the block")
        assert_close(model.get_parameters(), theta, 0.0, "θ after the block")

    @pytest.mark.parametrize("spec_name", ["mlp_tanh", "convnet"])
    def test_last_layer_selection_is_a_slice_of_the_full_gradient(self, spec_name: str) -> None:
        case = self.build_case(spec_name, "float64")
        last = case.reference.layer_names[-1]
        sub = InfluenceModel(
            case.reference.model, case.reference.loss_fn, parameters=[last], backend=self.backend
        )
        kernel_shape, bias_shape = case.spec.parameter_shapes()[-1]
        d_last = int(np.prod(kernel_shape)) + int(np.prod(bias_shape))
        assert sub.num_parameters == d_last
        full = case.reference.to_canonical(to_numpy(case.model.loss_grad(case.data)))
        positions = case.reference.canonical_positions[-d_last:] - (
            case.spec.num_parameters - d_last
        )
        sub_grad = np.empty(d_last)
        sub_grad[positions] = to_numpy(sub.loss_grad(case.data))
        assert_close(sub_grad, full[-d_last:], 1e-12, "last-layer gradient")

    # -- data ---------------------------------------------------------------------
    @pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
    def test_native_dataset_covers_every_sample_once(self, batched: bool) -> None:
        case = self.build_case("logistic_regression", "float64")
        if case.reference.native_dataset is None:
            pytest.skip(f"the {self.backend} backend has no native dataset type")
        native = case.reference.native_dataset(case.X, case.y, BATCH_SIZE if batched else None)
        batches = list(case.model.batches(native, batch_size=BATCH_SIZE))
        assert [b.size for b in batches] == [4, 4, 4, 1]
        assert [b.start for b in batches] == [0, 4, 8, 12]
        targets = np.concatenate([to_numpy(b.targets) for b in batches])
        np.testing.assert_array_equal(targets, case.y)
        assert_close(
            case.model.loss_grad(native),
            to_numpy(case.model.loss_grad(case.data)),
            1e-12,
            "gradient over the native dataset",
        )

    def test_array_pairs_are_cut_with_a_partial_last_batch(self) -> None:
        case = self.build_case("logistic_regression", "float64")
        sizes = [b.size for b in case.model.batches(case.data, batch_size=5)]
        assert sizes == [5, 5, 3]

    # -- bad input ----------------------------------------------------------------
    def test_scalar_loss_is_rejected_with_advice(self) -> None:
        case = self.build_case("logistic_regression", "float64")
        bad = InfluenceModel(
            case.reference.model, case.reference.scalar_loss_fn, backend=self.backend
        )
        with pytest.raises(PerSampleLossError, match="one value per sample"):
            bad.loss_grad(case.data)

    def test_unknown_parameter_name_lists_the_real_ones(self) -> None:
        case = self.build_case("mlp_tanh", "float64")
        with pytest.raises(UnknownParameterError) as info:
            InfluenceModel(
                case.reference.model,
                case.reference.loss_fn,
                parameters=["no_such_layer"],
                backend=self.backend,
            )
        message = str(info.value)
        assert "no_such_layer" in message
        for layer in case.reference.layer_names:
            assert layer in message

    def test_non_finite_gradients_name_the_samples(self) -> None:
        case = self.build_case("mlp_tanh", "float64")
        X = case.X.copy()
        X[[2, 9]] = np.nan
        with pytest.raises(NonFiniteGradientError) as info:
            case.model.per_sample_grads((X, case.y))
        assert info.value.sample_indices == (2, 9)
        with pytest.raises(NonFiniteGradientError) as info:
            case.model.loss_grad((X, case.y))
        assert info.value.sample_indices == (2, 9)  # across batches [0-3] and [8-11]
        assert "[2, 9]" in str(info.value)

    def test_dataset_yielding_non_pairs_is_rejected(self) -> None:
        case = self.build_case("logistic_regression", "float64")
        triples = [(case.X[:4], case.y[:4], case.y[:4])]
        with pytest.raises(DatasetFormatError, match=r"\(inputs, targets\) pair"):
            case.model.loss_grad(triples)

    def test_model_type_selects_this_backend(self) -> None:
        case = self.build_case("linear_regression", "float64")
        assert get_registry().for_model(case.reference.model).name == self.backend
        assert InfluenceModel(case.reference.model, case.reference.loss_fn).backend == self.backend

    def test_float64_loss_precision(self) -> None:
        """A float64 model with its float64 loss raises no precision warning."""
        case = self.build_case("logistic_regression", "float64")
        fresh = InfluenceModel(case.reference.model, case.reference.loss_fn, backend=self.backend)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fresh.per_sample_loss(case.data)


class CrossBackendConformance:
    """The same spec and weights through several backends give the same numbers."""

    #: Backends to compare; by default every installed one with a reference builder.
    backends: tuple[str, ...] = ()

    def _backends(self) -> list[str]:
        """The named (or all) backends that can run here; absent frameworks are skipped."""
        registry = get_registry()
        installed = [n for n in registry.names() if registry.by_name(n).reference_models]
        names = [n for n in self.backends if n in installed] if self.backends else installed
        if len(names) < 2:
            missing = sorted(set(self.backends) - set(installed))
            pytest.skip(
                f"cross-backend checks need two installed backends, found {names}"
                + (
                    f" ({', '.join(missing)} not installed: {registry.unavailable()})"
                    if missing
                    else ""
                )
            )
        return names

    @spec_names
    @dtypes
    def test_backends_agree(self, spec_name: str, dtype: str) -> None:
        names = self._backends()
        cases = [build_case(name, spec_name, dtype) for name in names]
        rtol = RTOL[dtype]
        V = np.random.default_rng(5).normal(size=(cases[0].spec.num_parameters, 3))

        def quantities(case: Case) -> dict[str, np.ndarray]:
            r, m = case.reference, case.model
            H = to_numpy(m.hessian(case.data))
            return {
                "per-sample losses": to_numpy(m.per_sample_loss(case.data)),
                "per-sample grads": r.to_canonical(to_numpy(m.per_sample_grads(case.data)), axis=1),
                "mean-loss gradient": r.to_canonical(to_numpy(m.loss_grad(case.data))),
                "HVP block": r.to_canonical(to_numpy(m.hvp(case.data, r.from_canonical(V)))),
                "Hessian": r.to_canonical(r.to_canonical(H, axis=0), axis=1),
            }

        if spec_name == "logistic_regression":
            base = quantities

            def quantities(case: Case) -> dict[str, np.ndarray]:
                out = base(case)
                calc = FirstOrderInfluenceCalculator(case.model, ExactIHVP(damping=1e-2)).fit(
                    case.data
                )
                test = (case.X[:5], case.y[:5])
                out["influence scores"] = to_numpy(calc.influence(test))
                out["self-influence"] = to_numpy(calc.self_influence())
                out["top-k proponents"] = to_numpy(calc.top_k(test, k=4).proponents).astype(float)
                return out

        first = quantities(cases[0])
        for name, case in zip(names[1:], cases[1:], strict=True):
            other = quantities(case)
            for key, value in first.items():
                assert_close(other[key], value, rtol, f"{key}: {name} vs {names[0]}")
