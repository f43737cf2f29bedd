"""TracIn: influence traced through training checkpoints (Pruthi et al. 2020)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

from ..data import Batch, chunks
from ..layerwise import (
    LayerBlock,
    covering_layers,
    layer_gradient_dots,
    layer_gradient_squared_norms,
)
from ..measurements import LOSS, Measurement
from ..model import InfluenceModel
from ..plugin.protocol import UnsupportedByBackendError
from ..progress import progress
from ..projection import GradientProjector, projected_features, resolve_projector
from .base import Array, InfluenceCalculator

__all__ = ["TracIn"]


class TracIn(InfluenceCalculator):
    """TracInCP: gradient alignment summed over saved checkpoints.

    ::

        score(z_train, z_test) = Σ_k η_k g(z_test; θ_k) · g(z_train; θ_k)
        self-influence(z)      = Σ_k η_k ‖g(z; θ_k)‖²

    over checkpoints θ_k with learning rates η_k (Pruthi, Liu, Kale,
    Sundararajan, "Estimating Training Data Influence by Tracing Gradient
    Descent", NeurIPS 2020). A step of SGD on z_train with rate η lowers the
    test loss by about η g(z_test)·g(z_train), so **positive means proponent**,
    the library's convention. g is over the selected parameters θ.

    Checkpoints are the user's own, loaded one at a time into ``model`` (which
    is restored afterwards): in PyTorch a state dict or a ``torch.save`` path;
    in Keras a ``get_weights()`` list or a ``.weights.h5`` path.

    **Random projection**: ``projection_dim=m`` multiplies gradients by a
    seeded Gaussian :class:`~influence_core.projection.RandomProjection` P
    (d × m, entries N(0, 1/m), drawn in blocks of the canonical layout so the
    same seed gives the same projection in every framework); ``projector=``
    takes any projector, e.g. a
    :class:`~influence_core.projection.KroneckerProjection`, which projects
    each layer's inputs and output gradients and never forms the gradient.
    Each dot product becomes (Pᵀa)·(Pᵀb), unbiased with standard deviation at
    most √(2/m)·‖a‖‖b‖ (Johnson-Lindenstrauss). The same P serves every
    checkpoint.

    **Exact, from layer statistics** (``layerwise``): without a projection, on
    a backend with layer statistics that cover θ (dense and convolution
    layers), the dot products are taken from each layer's inputs and output
    gradients without forming per-sample gradients: a dense layer's
    g_i·g_j = (ã_i·ã_j)(δ_i·δ_j), p + o multiply-adds per pair instead of p·o
    (:func:`~influence_core.layerwise.layer_gradient_dots`). The same numbers
    (to rounding); ``layerwise=None`` (default) uses it where available,
    ``False`` never.

    Memory and loads: :meth:`influence` and :meth:`self_influence` load each
    checkpoint once and stream training batches; to have both, call
    :meth:`influence_and_self_influence`, which takes each checkpoint's training
    gradients once for the two. :meth:`top_k` must sum over
    checkpoints before ranking: it takes training data in chunks of
    ``chunk_size`` samples and loads every checkpoint once per chunk, keeping
    O(n_test · chunk_size) scores.

    Args:
        model: the :class:`~influence_core.InfluenceModel`.
        checkpoints: the checkpoints θ_k, in any order.
        learning_rates: η_k, one per checkpoint, or one for all.
        projection_dim: m for a dense random projection of gradients; ``None`` for exact.
        seed: seed of that projection.
        projector: any :class:`~influence_core.projection.GradientProjector`
            (instead of ``projection_dim``).
        layerwise: dot products from layer statistics (``None``: where the
            backend offers them and there is no projection; ``True``: required).
        measurement: what a test point's score explains (default its loss;
            :mod:`influence_core.measurements`).
        batch_size: batch size for ``(X, y)`` arrays.
        chunk_size: training samples per chunk in :meth:`top_k`.
    """

    def __init__(
        self,
        model: InfluenceModel,
        checkpoints: Sequence[Any],
        learning_rates: float | Sequence[float],
        *,
        projection_dim: int | None = None,
        seed: int = 0,
        projector: GradientProjector | None = None,
        layerwise: bool | None = None,
        measurement: Any = None,
        batch_size: int | None = None,
        chunk_size: int = 4096,
    ) -> None:
        super().__init__(model, measurement=measurement, batch_size=batch_size)
        checkpoints = list(checkpoints)
        if not checkpoints:
            raise ValueError("TracIn needs at least one checkpoint")
        rates = (
            [float(learning_rates)] * len(checkpoints)
            if isinstance(learning_rates, int | float)
            else [float(r) for r in learning_rates]
        )
        if len(rates) != len(checkpoints):
            raise ValueError(
                f"got {len(rates)} learning rates for {len(checkpoints)} checkpoints; "
                "give one per checkpoint, or a single rate for all"
            )
        bad = [r for r in rates if not (math.isfinite(r) and r > 0)]
        if bad:
            raise ValueError(
                f"learning rates must be finite and positive (η_k > 0, the step the optimiser "
                f"took after checkpoint k), got {bad}"
            )
        #: The projector of the gradients, or ``None`` without projection.
        self.projector = resolve_projector(projection_dim, seed, projector)
        if layerwise and self.projector is not None:
            raise ValueError("layerwise=True computes exact dot products: give no projection")
        self.layerwise = layerwise
        self._blocks: list[LayerBlock] | None = None
        self.checkpoints = checkpoints
        self.learning_rates = rates
        self.projection_dim = None if projection_dim is None else int(projection_dim)
        self.seed = int(seed)
        self.chunk_size = int(chunk_size)

    #: Nothing is fitted: a model at the same weights scores the same anywhere.
    exports_fitted_state = True

    def get_params(self) -> dict[str, Any]:
        return {
            **super().get_params(),
            "checkpoints": [
                c if isinstance(c, str) else f"<in memory #{i}>"
                for i, c in enumerate(self.checkpoints)
            ],
            "learning_rates": self.learning_rates,
            "projector": None if self.projector is None else self.projector.get_params(),
        }

    # -- building blocks ---------------------------------------------------------------
    def _layer_blocks(self) -> list[LayerBlock] | None:
        """The layers whose statistics give exact dot products, or ``None`` (features instead)."""
        if self.projector is not None or self.layerwise is False:
            return None
        if self._blocks is None:
            try:
                self._blocks = covering_layers(self.model)
            except (UnsupportedByBackendError, ValueError):
                if self.layerwise:
                    raise
                self.layerwise = False
                return None
        return self._blocks

    def _train_features(self, data: Any) -> Iterator[tuple[Batch, Array]]:
        """Training-loss gradients, projected if asked: ``(batch, (b, m))``."""
        return projected_features(self.model, data, self.projector, LOSS, self.batch_size)

    def _side(self, batch: Batch, measurement: Measurement) -> Any:
        """One batch's side of the dot products: layer statistics, or (projected) gradients (b, m)."""
        if self._layer_blocks() is not None:
            return self.model.layer_statistics(batch, measurement)
        if self.projector is None:
            return self.model.batch_per_sample_grads(batch, measurement)
        return self.projector.features(self.model, batch, measurement)

    def _dots(self, test: Any, side: Any) -> Array:
        """(n_test, b) dot products of the test side with one training batch's side."""
        blocks = self._layer_blocks()
        if blocks is None:
            return self.xp.matmul(test, self.xp.matrix_transpose(side))
        return layer_gradient_dots(self.xp, blocks, test, side)

    def _norms(self, side: Any, batch: Batch) -> Array:
        """‖g‖² of each sample of one batch's side: shape (b,), finite-checked from statistics."""
        xp, blocks = self.xp, self._layer_blocks()
        if blocks is None:
            return xp.sum(side * side, axis=1)
        norms = layer_gradient_squared_norms(xp, blocks, side)
        if self.model.check_finite and not self.model._all_finite(norms):
            rows = self.model._bad_rows(xp.reshape(norms, (-1, 1)), batch.start)
            raise self.model.non_finite_error("per-sample gradients (from layer statistics)", rows)
        return norms

    def _test_block(self, test_data: Any) -> Any:
        """The test side at the loaded checkpoint: (n_test, m), or layer statistics of n_test."""
        sides = [
            self._side(b, self.measurement) for b in self.model.batches(test_data, self.batch_size)
        ]
        if self._layer_blocks() is None:
            return self._stack(sides)
        return {
            name: tuple(self._stack([side[name][i] for side in sides]) for i in (0, 1))
            for name in sides[0]
        }

    def _checkpoints(self) -> Iterator[float]:
        """Load each checkpoint in turn (restoring the model after the last); yield η_k."""
        pairs = zip(self.checkpoints, self.learning_rates, strict=True)
        for checkpoint, rate in progress(pairs, desc="checkpoints", total=len(self.checkpoints)):
            with self.model.checkpoint_loaded(checkpoint):
                yield rate

    # -- results -----------------------------------------------------------------------
    def _scores_from_prepared(self, prepared: Any, train_data: Any) -> Iterator[tuple[int, Array]]:
        """Scores per training chunk; the test gradients are retaken at each checkpoint."""
        test_data = prepared
        for chunk in chunks(self.model.batches(train_data, self.batch_size), self.chunk_size):
            total = None
            for rate in self._checkpoints():
                test = self._test_block(test_data)  # (n_test, m)
                scores = rate * self._stack(
                    (self._dots(test, self._side(b, LOSS)) for b in chunk), axis=1
                )
                total = scores if total is None else total + scores
            yield chunk[0].start, total

    def _traced(
        self, test_data: Any | None, train_data: Any, *, squared_norms: bool
    ) -> tuple[Array | None, Array | None]:
        """Σ_k η_k of the scores (unless ``test_data`` is None) and of the squared norms (if asked).

        Each checkpoint is loaded once and its training gradients taken once,
        whichever of the two results are asked for.
        """
        train = self.training_data(train_data)
        totals: list[Array | None] = [None, None]
        checked = self._layer_blocks() is not None and self.model.check_finite
        for rate in self._checkpoints():
            test = None if test_data is None else self._test_block(test_data)
            blocks, parts = [], []
            for batch in self.model.batches(train, self.batch_size):
                side = self._side(batch, LOSS)
                if test is not None:
                    blocks.append(self._dots(test, side))
                if squared_norms or checked:  # statistics are finite-checked through the norms
                    norms = self._norms(side, batch)
                    if squared_norms:
                        parts.append(norms)
            for i, (pieces, axis) in enumerate(((blocks, 1), (parts, 0))):
                if pieces:
                    value = rate * self._stack(pieces, axis=axis)
                    totals[i] = value if totals[i] is None else totals[i] + value
        return totals[0], totals[1]

    def influence(self, test_data: Any, train_data: Any = None) -> Array:
        """Σ_k η_k G_test,k G_train,kᵀ: shape (n_test, n_train); each checkpoint loaded once."""
        return self._traced(test_data, train_data, squared_norms=False)[0]

    def self_influence(self, train_data: Any = None) -> Array:
        """Σ_k η_k ‖g(z; θ_k)‖² for every training point: shape (n_train,)."""
        return self._traced(None, train_data, squared_norms=True)[1]

    def influence_and_self_influence(
        self, test_data: Any, train_data: Any = None
    ) -> tuple[Array, Array]:
        """Scores and self-influences from one load of each checkpoint and one gradient pass."""
        scores, values = self._traced(test_data, train_data, squared_norms=True)
        return scores, values

    def group_influence(self, test_data: Any, group_data: Any) -> Array:
        """Σ_{z∈U} score(z, z_test) = Σ_k η_k g(z_test; θ_k) · Σ_{z∈U} g(z; θ_k): shape (n_test,)."""
        self._check_fitted()
        xp = self.xp
        total = None
        for rate in self._checkpoints():
            test = self._test_block(test_data)
            if self.projector is None and self._layer_blocks() is None:
                n_group = self.model.count(group_data, self.batch_size)
                summed = xp.reshape(  # one mean-gradient pass, no per-sample gradients
                    self.model.loss_grad(group_data, batch_size=self.batch_size), (1, -1)
                )
                values = n_group * xp.reshape(xp.matmul(test, xp.matrix_transpose(summed)), (-1,))
            else:  # the group's dot products, summed batch by batch
                values = None
                for batch in self.model.batches(group_data, self.batch_size):
                    part = xp.sum(self._dots(test, self._side(batch, LOSS)), axis=1)
                    values = part if values is None else values + part
            values = rate * values
            total = values if total is None else total + values
        return total
