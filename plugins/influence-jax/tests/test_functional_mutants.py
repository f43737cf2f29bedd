"""The checks of a functional backend must fail on a broken one: mutants of the JAX kernels.

Each mutant gets one thing about "the core owns θ" wrong; the check that guards
it is run against the mutant and must turn red, and passes on the real kernels.
"""

from __future__ import annotations

import dataclasses

import jax

jax.config.update("jax_enable_x64", True)

import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from influence_conformance.cases import build_case  # noqa: E402
from influence_conformance.selection_checks import SelectionChecks  # noqa: E402
from influence_conformance.suite import BackendConformance  # noqa: E402
from influence_core import InfluenceModel  # noqa: E402
from influence_core.plugin import ModelKernels  # noqa: E402
from influence_jax.model import JaxKernels  # noqa: E402
from influence_jax.reference_models import build, build_functional  # noqa: E402


class WritesIntoTheModel(JaxKernels):
    """Declares ``functional = True`` but writes θ into the user's nnx module (never restored)."""

    def with_parameters(self, flat):
        nnx.update(self.model, self._params(super().with_parameters(flat)._live()[0]))
        return self


class CheckpointKeepsTheOtherWeights(JaxKernels):
    """``with_checkpoint`` takes only θ from the checkpoint: the unselected weights stay stale."""

    def with_checkpoint(self, checkpoint):
        return self.with_parameters(super().with_checkpoint(checkpoint).get_flat_parameters())


def on(mutant: type[JaxKernels], base: type, builder):
    class OnMutant(base):
        backend = "jax"

        def reference_builder(self):
            return builder

        def build_case(self, spec_name: str, dtype: str):
            case = build_case("jax", spec_name, dtype, builder)
            model = InfluenceModel(case.reference.model, case.reference.loss_fn, batch_size=4)
            model.kernels = mutant(case.reference.model, case.reference.loss_fn, None)
            return dataclasses.replace(case, model=model)

        def head_model(self, case, names):
            model = InfluenceModel(case.reference.model, case.reference.loss_fn, parameters=names)
            model.kernels = mutant(case.reference.model, case.reference.loss_fn, names)
            return model

    return OnMutant()


def test_writing_into_the_model_is_caught() -> None:
    checks = on(WritesIntoTheModel, BackendConformance, build)
    with pytest.raises(AssertionError, match="untouched by a functional backend"):
        checks.test_other_weights_are_where_the_backend_declares()
    on(JaxKernels, BackendConformance, build).test_other_weights_are_where_the_backend_declares()


def test_a_checkpoint_that_keeps_the_unselected_weights_is_caught() -> None:
    # A Functional cannot change in place, so only the checkpoint half of the check runs.
    checks = on(CheckpointKeepsTheOtherWeights, SelectionChecks, build_functional)
    with pytest.raises(AssertionError, match="inside a checkpoint of every weight"):
        checks.test_a_sub_selection_sees_the_other_weights_change("mlp_tanh")
    with pytest.raises(AssertionError, match="TracIn over checkpoints of every weight"):
        checks.test_tracin_on_a_sub_selection_follows_checkpoints_of_every_weight("mlp_tanh")
    real = on(JaxKernels, SelectionChecks, build_functional)
    with pytest.raises(
        pytest.skip.Exception,
        match=r"in-place half not run: the model cannot change .* checkpoint half passed",
    ):
        real.test_a_sub_selection_sees_the_other_weights_change("mlp_tanh")
    real.test_tracin_on_a_sub_selection_follows_checkpoints_of_every_weight("mlp_tanh")


class CapturesTheOtherWeights(JaxKernels):
    """Reads θ live but keeps the *unselected* weights it saw when it was built (stale after training)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._captured = JaxKernels._live(self)[0]

    def _live(self):
        if self._bound is not None:
            return self._bound
        live, rest = JaxKernels._live(self)
        chosen = set(self._selected)
        return [v if i in chosen else self._captured[i] for i, v in enumerate(live)], rest


class CapturesWithoutLoadCheckpoint(CapturesTheOtherWeights):
    """The same bug in a functional backend that implements no load_checkpoint (fault 12)."""

    load_checkpoint = ModelKernels.load_checkpoint


def test_weights_captured_at_construction_are_caught_on_a_functional_backend() -> None:
    # Issue 26, fault 12: without load_checkpoint, this half of the check was dropped without
    # a skip and the whole suite passed. It now fails, naming what to implement ...
    checks = on(CapturesWithoutLoadCheckpoint, SelectionChecks, build)
    try:
        checks.test_a_sub_selection_sees_the_other_weights_change("mlp_tanh")
    except pytest.fail.Exception as failure:
        assert "does not implement load_checkpoint" in str(failure)
    except pytest.skip.Exception as skip:  # a skip would pass the suite: the fault itself
        pytest.fail(f"the check skipped instead of failing: {skip}")
    else:
        pytest.fail("the check passed a functional backend that captured the other weights")
    # ... and with load_checkpoint implemented, the stale weights themselves show.
    checks = on(CapturesTheOtherWeights, SelectionChecks, build)
    with pytest.raises(AssertionError, match="after the model's first layer changed"):
        checks.test_a_sub_selection_sees_the_other_weights_change("mlp_tanh")
    on(JaxKernels, SelectionChecks, build).test_a_sub_selection_sees_the_other_weights_change(
        "mlp_tanh"
    )


def test_a_functional_model_is_never_written() -> None:
    """Inside parameters_set_to and checkpoint_loaded the Functional's params are the same object."""
    case = build_case("jax", "mlp_tanh", "float64", build_functional)
    model, functional = case.model, case.reference.model
    params = functional.params
    theta = model.to_numpy(model.get_parameters())
    with model.parameters_set_to(theta * 2.0):
        state = model.kernels.save_state()
        assert functional.params is params
    with model.checkpoint_loaded(state):
        assert functional.params is params
        assert abs(model.to_numpy(model.get_parameters()) - theta * 2.0).max() == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        functional.params = None
