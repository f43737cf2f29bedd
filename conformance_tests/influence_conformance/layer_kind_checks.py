"""Conformance checks of the layer kinds beyond dense and conv2d: embeddings, normalisation, parameters.

The reference specs are dense and convolutional, so a backend shows its
embedding and elementwise (normalisation) statistics on models of its own:
(and parameters used directly, kind ``"parameter"``) on models of its own:
the module of its ``reference_models`` builder defines
``layer_kind_case(kind) -> (model, loss_fn, (inputs, targets)) | None``,
or its test class overrides :meth:`LayerKindChecks.layer_kind_case`. For each kind the statistics must rebuild
the per-sample gradients, which the rest of the suite checks against NumPy
through the backend's flat per-sample gradients. A backend that provides no
model for a kind is skipped visibly, saying so. ``segment_sum``, which the
embedding blocks use, is checked against ``numpy.add.at`` for every backend,
and the optional ``matmul_into`` against ``numpy.matmul`` where a backend has it.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest

from influence_core import InfluenceModel, RandomProjection
from influence_core.layerwise import coverage, per_sample_grads_from_layers
from influence_core.measurements import LOSS

from .cases import assert_close, registered_builder, to_numpy

#: The kinds with a case each: a model holding at least one layer of the kind.
KINDS = ("embedding", "elementwise", "parameter")


class LayerKindChecks:
    """Embedding and elementwise layers, on the backend's own models (see the module docstring)."""

    backend: str = ""

    def layer_kind_case(self, kind: str) -> tuple[InfluenceModel, Any] | None:
        """A float64 model whose θ holds a layer of ``kind``, and a batch of its data; None: none.

        A good case has what users' models have: a token table with a padding
        index and repeated tokens, a positional table looked up once for the
        batch, LayerNorm/BatchNorm with an affine map away from the identity.
        By default, ``layer_kind_case`` of the reference builder's module.
        """
        builder = registered_builder(self.backend)
        factory = getattr(sys.modules.get(builder.__module__), "layer_kind_case", None)
        made = None if factory is None else factory(kind)
        if made is None:
            return None
        model, loss_fn, data = made
        return InfluenceModel(model, loss_fn, backend=self.backend), data

    def segment_sum_model(self) -> InfluenceModel:  # provided by BackendConformance
        raise NotImplementedError

    @pytest.mark.parametrize("kind", KINDS)
    def test_statistics_of_each_layer_kind_rebuild_the_per_sample_gradients(
        self, kind: str
    ) -> None:
        case = self.layer_kind_case(kind)
        if case is None:
            pytest.skip(f"this backend's test class gives no {kind} model (layer_kind_case)")
        model, data = case
        kinds = {c.kind for c in coverage(model).values()}
        assert kind in kinds, f"the case has no {kind} layer (kinds: {sorted(kinds)})"
        rebuilt = per_sample_grads_from_layers(model, data)
        expected = to_numpy(model.per_sample_grads(data))
        assert_close(rebuilt, expected, 1e-10, f"per-sample gradients from {kind} statistics")

    @pytest.mark.parametrize("kind", KINDS)
    def test_a_redrawn_projection_reads_each_layer_kind_range_by_range(self, kind: str) -> None:
        """A dense projection too large to keep is drawn slab by slab and meets the gradient
        entries of each slab's rows, formed from the statistics
        (:mod:`influence_core.gradient_ranges`): it must equal the canonical gradients times P."""
        case = self.layer_kind_case(kind)
        if case is None:
            pytest.skip(f"this backend's test class gives no {kind} model (layer_kind_case)")
        model, data = case
        d, k = model.num_parameters, 5
        grads = to_numpy(model.per_sample_grads(data))
        canonical = to_numpy(model.to_canonical(model.kernels.as_native(grads.T, floating=True))).T
        batches = list(model.batches(data, 3))
        # Slabs of 3 rows cut every layer at odd places; a budget one byte short of the whole
        # matrix keeps it in two slabs, drawn once for all the batches.
        for budget in (1, d * k * model.itemsize - 1):
            projector = RandomProjection(k, seed=2, block_rows=3, memory_budget=budget)
            assert not projector.fits(model) and projector.samples_per_call(model) > 0
            got = np.concatenate(
                [to_numpy(f) for f in projector.features_of(model, batches, LOSS)], axis=0
            )
            expected = canonical @ projector.matrix(d)
            assert_close(got, expected, 1e-10, f"redrawn projection of {kind} gradient ranges")

    def test_segment_sum_adds_rows_into_their_segments(self) -> None:
        model = self.segment_sum_model()
        rng = np.random.default_rng(0)
        values = rng.standard_normal((40, 3))
        segments = rng.integers(0, 7, size=40)
        segments[:3] = 8  # the last segment filled, one (7) left empty
        expected = np.zeros((9, 3))
        np.add.at(expected, segments, values)
        native = model.kernels.as_native
        got = model.kernels.segment_sum(native(values, floating=True), native(segments), 9)
        assert_close(got, expected, 1e-12, "segment_sum against numpy.add.at")

    def test_matmul_into_writes_the_product_into_the_buffer_given(self) -> None:
        """The optional ``matmul_into`` (the solvers' reused buffer), where the backend has it.

        Its product, from a transposed view as the solvers pass it, equals NumPy's
        and is what a :class:`~influence_core.workspace.Workspace` returns. A
        backend without it is skipped, saying so.
        """
        from influence_core.plugin import UnsupportedByBackendError
        from influence_core.workspace import Workspace

        model = self.segment_sum_model()
        rng = np.random.default_rng(1)
        a, b = rng.standard_normal((3, 6, 4)), rng.standard_normal((3, 6, 5))
        native = model.kernels.as_native
        x1 = model.xp.matrix_transpose(native(a, floating=True))  # (3, 4, 6), a view
        x2 = native(b, floating=True)
        expected = a.transpose(0, 2, 1) @ b
        out = model.xp.zeros((3, 4, 5), dtype=x2.dtype)
        try:
            got = model.kernels.matmul_into(x1, x2, out)
        except UnsupportedByBackendError:
            pytest.skip(f"the {self.backend} backend has no matmul_into (optional)")
        assert_close(got, expected, 1e-12, "matmul_into against numpy.matmul")
        workspace = Workspace(model)
        for _ in range(2):  # the second into the buffer the first left
            assert_close(
                workspace.matmul(x1, x2), expected, 1e-12, "a Workspace product (matmul_into)"
            )
