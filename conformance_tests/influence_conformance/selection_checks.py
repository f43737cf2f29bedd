"""Conformance checks of a sub-selection of θ whose *other* weights change after construction.

The commonest backend bug: kernels capture the unselected weights once, when
they are built. θ (here the last layer) then still reads back right, but every
loss, gradient, HVP and TracIn score is computed at stale weights. These
checks build the last-layer model first, then change the first layer (in the
user's model itself, and through a checkpoint) and compare with NumPy at the
new weights. "In the user's model" is another model's ``parameters_set_to``
on an in-place backend, and the backend's own in-place ``load_checkpoint``
(the user's optimizer step) on a functional one; an immutable model (a JAX
``Functional``) cannot change, so that half is skipped for it, visibly, and a
functional backend that implements neither fails the check. The last layer is found from the canonical
layout, not by assuming its parameters come last.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest

from influence_core import InfluenceModel, TracIn, UnsupportedByBackendError
from influence_core.plugin import ModelKernels

from . import numpy_reference as ref
from .cases import BATCH_SIZE, Case, assert_close, optional, to_numpy
from .specs import canonical_offsets

MULTILAYER = ["mlp_tanh", "convnet"]


def last_layer_names(case: Case) -> list[str]:
    """The backend's parameter names that hold the spec's last (kernel, bias), by canonical position."""
    start = canonical_offsets(case.spec)[-2]
    positions, names, offset = case.reference.canonical_positions, [], 0
    for name, shape in zip(case.model.parameter_names, case.model.layout.shapes, strict=True):
        size = int(np.prod(shape))
        if np.all(positions[offset : offset + size] >= start):
            names.append(name)
        offset += size
    return names


def changed_weights(case: Case, scale: float) -> list[np.ndarray]:
    """The canonical weights with every layer but the last changed (and the last a little)."""
    rng = np.random.default_rng(11)
    weights = [w * scale + 0.1 * rng.normal(size=w.shape) for w in case.weights[:-2]]
    return weights + [w * 1.1 for w in case.weights[-2:]]


@contextmanager
def weights_changed_in_the_model(model: InfluenceModel, flat: np.ndarray) -> Iterator[None]:
    """The user's model itself holds θ = ``flat`` inside the block (restored after it).

    In place through ``parameters_set_to``; on a functional backend through
    its ``load_checkpoint`` (the user's own in-place write, as an optimizer
    step on an nnx module). Raises :class:`UnsupportedByBackendError` where
    the backend says the model cannot change (an immutable ``Functional``),
    and fails where a functional backend does not say either: without it the
    suite could not see kernels that captured the other weights when built.
    """
    if not model.kernels.functional:
        with model.parameters_set_to(flat):
            yield
        return
    if type(model.kernels).load_checkpoint is ModelKernels.load_checkpoint:
        pytest.fail(
            f"{type(model.kernels).__qualname__} is functional and does not implement "
            "load_checkpoint, so this suite cannot change the user's model and check that "
            "kernels built earlier read its current weights (the commonest backend bug: weights "
            "captured when the kernels were built). Implement load_checkpoint as the user's "
            "in-place write, or, for models that cannot change (immutable values), raise "
            "UnsupportedByBackendError from it saying so."
        )
    with model.parameters_set_to(flat):
        changed = model.save_state()
    saved = model.save_state()
    model.kernels.load_checkpoint(changed)
    try:
        yield
    finally:
        model.kernels.load_checkpoint(saved)


def last_layer_hessian(case: Case, weights: list[np.ndarray]) -> np.ndarray:
    """Closed-form Hessian of the mean cross-entropy in the last layer's canonical (W, b) order.

    With f̃ = [f, 1] the penultimate features and A = diag(p) − ppᵀ the softmax
    curvature, H = mean_i f̃_i f̃_iᵀ ⊗ A_i.
    """
    features = ref.penultimate_features(case.spec, weights, case.X)
    f = np.concatenate([features, np.ones((len(features), 1))], axis=1)
    z = features @ weights[-2] + weights[-1]
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    curvature = np.einsum("nk,kl->nkl", p, np.eye(p.shape[1])) - np.einsum("nk,nl->nkl", p, p)
    return np.mean(
        [np.kron(np.outer(fi, fi), a) for fi, a in zip(f, curvature, strict=True)], axis=0
    )


class SelectionChecks:
    """θ = the last layer; the first layer changes after the model is built."""

    backend: str = ""

    def build_case(self, spec_name: str, dtype: str) -> Case:  # provided by BackendConformance
        raise NotImplementedError

    def head_model(self, case: Case, names: list[str]) -> InfluenceModel:
        """The model with θ = ``names`` (a plugin's test may override how it is built)."""
        return InfluenceModel(
            case.reference.model,
            case.reference.loss_fn,
            parameters=names,
            backend=self.backend,
            batch_size=BATCH_SIZE,
        )

    def _expected(self, case: Case, weights: list[np.ndarray]) -> dict[str, np.ndarray]:
        start = canonical_offsets(case.spec)[-2]
        grads = ref.finite_difference_per_sample_grads(case.spec, weights, case.X, case.y)
        return {
            "losses": ref.per_sample_loss(case.spec, weights, case.X, case.y),
            "grads": grads[:, start:],
            "hessian": last_layer_hessian(case, weights),
        }

    def _check_head(self, case: Case, head: InfluenceModel, weights: list[np.ndarray], how: str):
        expected = self._expected(case, weights)
        canonical = head.to_canonical
        rng = np.random.default_rng(3)
        V = rng.normal(size=(head.num_parameters, 2))
        assert_close(head.per_sample_loss(case.data), expected["losses"], 1e-8, f"losses, {how}")
        grads = to_numpy(canonical(head.xp.matrix_transpose(head.per_sample_grads(case.data)))).T
        assert_close(grads, expected["grads"], 1e-8, f"per-sample grads of θ, {how}")
        hvp = to_numpy(canonical(head.hvp(case.data, head.from_canonical(V))))
        assert_close(hvp, expected["hessian"] @ V, 1e-8, f"HVPs in θ, {how}")

    @pytest.mark.parametrize("spec_name", MULTILAYER)
    def test_a_sub_selection_sees_the_other_weights_change(self, spec_name: str) -> None:
        case = self.build_case(spec_name, "float64")
        head = self.head_model(case, last_layer_names(case))  # built before the change
        weights = changed_weights(case, 1.3)
        flat = case.reference.from_canonical(ref.flatten_weights(weights))
        model_half = "passed"
        try:
            with weights_changed_in_the_model(case.model, flat):
                self._check_head(case, head, weights, "after the model's first layer changed")
        except UnsupportedByBackendError as error:
            model_half = f"not run: the model cannot change in place ({error})"
        try:
            with case.model.parameters_set_to(flat):
                state = case.model.save_state()
            with head.checkpoint_loaded(state):
                self._check_head(case, head, weights, "inside a checkpoint of every weight")
            checkpoint_half = "passed"
        except UnsupportedByBackendError as error:
            checkpoint_half = f"not run: checkpoints are optional ({error})"
        if model_half != "passed" or checkpoint_half != "passed":
            # never a silent pass: a half not run is a visible skip, with what did run
            pytest.skip(f"in-place half {model_half}; checkpoint half {checkpoint_half}")

    @pytest.mark.parametrize("spec_name", MULTILAYER)
    @optional
    def test_tracin_on_a_sub_selection_follows_checkpoints_of_every_weight(
        self, spec_name: str
    ) -> None:
        case = self.build_case(spec_name, "float64")
        head = self.head_model(case, last_layer_names(case))
        schedule = [(changed_weights(case, 1.3), 0.3), (changed_weights(case, 0.6), 0.1)]
        try:
            states = []
            for weights, _ in schedule:
                flat = case.reference.from_canonical(ref.flatten_weights(weights))
                with case.model.parameters_set_to(flat):
                    states.append(case.model.save_state())
        except UnsupportedByBackendError as error:
            pytest.skip(f"checkpoints are optional: {error}")
        test = (case.X[:4], case.y[:4])
        expected = sum(
            rate
            * self._expected(case, weights)["grads"][:4]
            @ self._expected(case, weights)["grads"].T
            for weights, rate in schedule
        )
        # Per-sample gradients (layerwise=False), then the layer statistics where offered.
        for layerwise in (False, None):
            tracin = TracIn(head, states, [rate for _, rate in schedule], layerwise=layerwise)
            assert_close(
                tracin.fit(case.data).influence(test),
                expected,
                1e-8,
                "TracIn over checkpoints of every weight",
            )
