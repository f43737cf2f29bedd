"""``InfluenceModel``: a user's model, loss and parameter selection, ready for influence.

One call wraps a PyTorch ``nn.Module`` or a TensorFlow/Keras model::

    im = InfluenceModel(model, loss_fn, parameters=["fc2"])      # backend from the model's type
    g = im.loss_grad((X_train, y_train))                          # (d,)  mean over the data
    G = im.per_sample_grads((X_batch, y_batch))                   # (b, d)
    HV = im.hvp((X_train, y_train), V)                            # (d, k)
    H = im.hessian((X_train, y_train))                            # (d, d), small d only

Everything dataset-level (streaming batches, weighting the partial last batch,
non-finite checks that name the samples, Hessians assembled from HVP blocks)
is written here once; the backend supplies only the per-batch kernels of
:class:`~influence_core.plugin.ModelKernels`. Results are native arrays of
the model's framework (torch in, torch out; TF in, TF out).

Loss convention: ``loss_fn`` returns one value per sample (``reduction="none"``
in PyTorch, ``reduction=None`` in Keras) and follows the framework's argument
order: ``loss_fn(outputs, targets)`` in PyTorch, ``loss_fn(y_true, y_pred)`` in
Keras/TensorFlow. Every quantity is of the *mean* loss L(θ) = (1/n) Σ_i ℓ(z_i, θ).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .arrays import join
from .data import Batch, is_array_pair, iter_batches, leading_dim
from .errors import NonFiniteGradientError, PerSampleLossError, PrecisionWarning
from .measurements import LOSS, Measurement
from .plugin.namespace import ArrayNamespace
from .plugin.protocol import LastLayer, ModelKernels
from .plugin.registry import BackendRegistry, get_registry
from .progress import progress

__all__ = ["DEFAULT_BATCH_SIZE", "MAX_HESSIAN_PARAMETERS", "InfluenceModel"]

#: Batch size used to cut ``(X, y)`` arrays and unbatched datasets when none is given.
DEFAULT_BATCH_SIZE = 256
#: Largest ``d`` for which :meth:`InfluenceModel.hessian` builds the full matrix by default.
MAX_HESSIAN_PARAMETERS = 10_000

Array = Any


class InfluenceModel:
    """A model, its per-sample loss and the parameters θ influence is computed over.

    Args:
        model: a ``torch.nn.Module``, a Keras 3 model / layer, a ``tf.Module``,
            or any model type a registered backend plugin handles.
        loss_fn: per-sample loss (see the module docstring for the convention).
        parameters: layer or parameter names selecting θ (a layer name selects
            all its trainable parameters); ``None`` selects every trainable
            parameter. Unknown names raise an error listing the real ones.
        backend: a backend name (``"torch"``, ``"tensorflow"`` …); by default
            chosen from the model's type.
        batch_size: batch size for ``(X, y)`` arrays and unbatched datasets.
        check_finite: check every gradient, HVP and Hessian for NaN/inf and name
            the offending samples. Costs one reduction per result (its cost is
            measured by ``make bench``, ``benchmarks/bench_kernels.py``; table in
            ``docs/benchmarks.md``).
        registry: the backend registry (tests use their own).
    """

    def __init__(
        self,
        model: Any,
        loss_fn: Any,
        *,
        parameters: str | Sequence[str] | None = None,
        backend: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        check_finite: bool = True,
        registry: BackendRegistry | None = None,
    ) -> None:
        registry = registry or get_registry()
        spec = registry.by_name(backend) if backend is not None else registry.for_model(model)
        self.backend: str = spec.name
        self.model = model
        self.loss_fn = loss_fn
        self.batch_size = int(batch_size)
        self.check_finite = bool(check_finite)
        self.kernels: ModelKernels = spec.load_kernels()(model, loss_fn, parameters)
        self._loss_checked = False
        self._registry = registry

    def with_parameters(self, parameters: str | Sequence[str] | None) -> InfluenceModel:
        """The same model, loss and settings with another selection θ (e.g. the last layer)."""
        return InfluenceModel(
            self.model,
            self.loss_fn,
            parameters=parameters,
            backend=self.backend,
            batch_size=self.batch_size,
            check_finite=self.check_finite,
            registry=self._registry,
        )

    def last_layer(self) -> LastLayer:
        """The final linear layer (Φ(x) = f(x) W + b); its ``name`` selects its parameters."""
        return self.kernels.last_layer()

    # -- θ ------------------------------------------------------------------------
    @property
    def xp(self) -> ArrayNamespace:
        """The Array API namespace of the model's arrays."""
        return self.kernels.xp

    @property
    def dtype(self) -> Any:
        return self.kernels.dtype

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """The selected parameters making up θ, in flat order."""
        return self.kernels.parameter_names

    @property
    def num_parameters(self) -> int:
        """d, the length of θ."""
        total = 0
        for shape in self.kernels.parameter_shapes:
            size = 1
            for s in shape:
                size *= int(s)
            total += size
        return total

    def get_parameters(self) -> Array:
        """A copy of θ, shape ``(d,)``."""
        return self.kernels.get_flat_parameters()

    @contextmanager
    def parameters_set_to(self, flat: Any) -> Iterator[None]:
        """Temporarily load θ = ``flat`` (shape ``(d,)``) into the model.

        The previous values are restored on exit, also after an exception, so
        the user's model is untouched outside the ``with`` block.
        """
        flat = self.kernels.as_native(flat, floating=True)
        if tuple(flat.shape) != (self.num_parameters,):
            raise ValueError(
                f"expected a flat parameter vector of shape ({self.num_parameters},), "
                f"got {tuple(flat.shape)}"
            )
        saved = self.kernels.get_flat_parameters()
        self.kernels.set_flat_parameters(flat)
        try:
            yield
        finally:
            self.kernels.set_flat_parameters(saved)

    @contextmanager
    def checkpoint_loaded(self, checkpoint: Any) -> Iterator[None]:
        """Temporarily load a user checkpoint (all weights) into the model; restored on exit.

        Accepts what the backend's ``load_checkpoint`` does: a state dict or a
        ``torch.save`` file in PyTorch, a ``get_weights()`` list or a
        ``load_weights`` file in Keras. One checkpoint is in memory at a time.
        """
        saved = self.kernels.save_state()
        try:
            self.kernels.load_checkpoint(checkpoint)
            yield
        finally:
            self.kernels.load_checkpoint(saved)

    def to_numpy(self, array: Any) -> Any:
        """A NumPy copy (on the host) of one of this model's native arrays."""
        return self.kernels.to_numpy(array)

    # -- data ---------------------------------------------------------------------
    def batches(self, data: Any, batch_size: int | None = None) -> Iterator[Batch]:
        """Iterate ``data`` as :class:`~influence_core.data.Batch` es of native arrays.

        ``data``: ``(X, y)`` arrays, a torch ``DataLoader``/``Dataset``, a
        ``tf.data.Dataset`` (batched or not), or an iterable of ``(x, y)`` batches.
        """
        for batch in iter_batches(
            data,
            batch_size or self.batch_size,
            self.kernels.native_batches,
            self.kernels.as_native,
        ):
            if not self._loss_checked:
                self._check_per_sample_loss(batch)
            yield batch

    def count(self, data: Any, batch_size: int | None = None) -> int:
        """The number of samples in ``data`` (free for arrays; one pass over a dataset)."""
        if is_array_pair(data):
            return leading_dim(data[1])
        return sum(batch.size for batch in self.batches(data, batch_size))

    def _check_per_sample_loss(self, batch: Batch) -> None:
        losses = self.kernels.per_sample_loss(batch.inputs, batch.targets)
        shape = tuple(getattr(losses, "shape", ()))
        if shape != (batch.size,):
            raise PerSampleLossError(
                f"the loss returned shape {shape} for a batch of {batch.size} samples; it must "
                f"return one value per sample, shape ({batch.size},). Build it without "
                "reduction: torch.nn.CrossEntropyLoss(reduction='none') in PyTorch, "
                "keras.losses.SparseCategoricalCrossentropy(reduction=None) in Keras."
            )
        if getattr(losses, "dtype", self.dtype) != self.dtype:
            warnings.warn(
                f"the loss returns {losses.dtype} values but the parameters are {self.dtype}: "
                "gradients lose precision. Keras losses compute in keras.config.floatx() unless "
                "built with dtype='float64'.",
                PrecisionWarning,
                stacklevel=4,
            )
        self._loss_checked = True

    def _single_batch(self, data: Any) -> Batch:
        batches = list(self.batches(data, batch_size=2**62))
        if len(batches) != 1:
            raise ValueError(
                f"expected one batch (inputs, targets), got data yielding {len(batches)} batches; "
                "use iter_per_sample_grads() to stream a dataset"
            )
        return batches[0]

    # -- losses and gradients -------------------------------------------------------
    def per_sample_loss(self, data: Any, batch_size: int | None = None) -> Array:
        """ℓ(z_i, θ) for every sample of ``data``: shape ``(n,)``."""
        parts = [
            self.kernels.per_sample_loss(b.inputs, b.targets)
            for b in self.batches(data, batch_size)
        ]
        return join(self.xp, parts)

    def loss_grad(self, data: Any, batch_size: int | None = None) -> Array:
        """∇_θ L(θ) = (1/n) Σ_i ∇_θ ℓ(z_i, θ) over all of ``data``: shape ``(d,)``.

        Batches are weighted by their size, so a partial last batch counts correctly.
        """
        return self._weighted_mean(
            data, batch_size, lambda b: self.kernels.mean_loss_grad(b.inputs, b.targets), "gradient"
        )

    def per_sample_grads(self, batch: Any) -> Array:
        """∇_θ ℓ(z_i, θ) for each sample of one batch ``(inputs, targets)``: shape ``(b, d)``.

        To go through a dataset without holding an ``n × d`` array, use
        :meth:`iter_per_sample_grads`.
        """
        b = self._single_batch(batch)
        return self.batch_per_sample_grads(b)

    def iter_per_sample_grads(
        self, data: Any, batch_size: int | None = None
    ) -> Iterator[tuple[Batch, Array]]:
        """Stream ``(batch, per-sample gradients of shape (b, d))`` over ``data``."""
        for batch in self.batches(data, batch_size):
            yield batch, self.batch_per_sample_grads(batch)

    def batch_per_sample_grads(self, batch: Batch, measurement: Measurement = LOSS) -> Array:
        """Per-sample gradients (b, d) of one :class:`Batch` from :meth:`batches`, finite-checked.

        With a ``measurement`` other than the loss, the gradients of its
        loss-like form m = ∓f (:mod:`influence_core.measurements`).
        """
        if measurement.is_loss:
            grads = self.kernels.per_sample_grads(batch.inputs, batch.targets)
        else:
            grads = self.kernels.per_sample_measurement_grads(
                batch.inputs, batch.targets, measurement.loss_like(self.xp)
            )
        if self.check_finite and not self._all_finite(grads):
            raise NonFiniteGradientError(
                "per-sample gradients"
                + ("" if measurement.is_loss else f" of the {measurement.describe()}"),
                self._bad_rows(grads, batch.start),
            )
        return grads

    def iter_measurement_grads(
        self, data: Any, measurement: Measurement, batch_size: int | None = None
    ) -> Iterator[tuple[Batch, Array]]:
        """Stream ``(batch, ∇_θ m(z_i) of shape (b, d))`` for a test-side measurement."""
        for batch in self.batches(data, batch_size):
            yield batch, self.batch_per_sample_grads(batch, measurement)

    # -- second order -------------------------------------------------------------
    def hvp(self, data: Any, vectors: Any, batch_size: int | None = None) -> Array:
        """H v with H = ∇²_θ L(θ) of the mean loss over ``data``.

        ``vectors``: shape ``(d,)`` for one vector (returns ``(d,)``) or ``(d, k)``
        for a block of k (returns ``(d, k)``, all columns in one batched pass).
        """
        v = self.kernels.as_native(vectors, floating=True)
        d = self.num_parameters
        single = len(v.shape) == 1
        if single:
            v = self.xp.reshape(v, (d, 1))
        if len(v.shape) != 2 or int(v.shape[0]) != d:
            raise ValueError(f"vectors must have shape ({d},) or ({d}, k), got {tuple(v.shape)}")
        out = self._weighted_mean(
            data,
            batch_size,
            lambda b: self.kernels.mean_loss_hvp(b.inputs, b.targets, v),
            "Hessian-vector product",
        )
        return self.xp.reshape(out, (d,)) if single else out

    def hessian(
        self,
        data: Any,
        *,
        block_size: int = 256,
        batch_size: int | None = None,
        max_parameters: int = MAX_HESSIAN_PARAMETERS,
    ) -> Array:
        """The full Hessian ∇²_θ L(θ), shape ``(d, d)``, from blocks of HVPs.

        One pass over ``data``: each batch is multiplied by the identity in
        column blocks of ``block_size``. Memory is ``d²`` floats, so ``d`` above
        ``max_parameters`` is refused: select fewer parameters (e.g. the last
        layer) or use an iterative solver.
        """
        d = self.num_parameters
        if d > max_parameters:
            raise ValueError(
                f"the full Hessian of d={d} parameters needs {d * d * 8 / 2**30:.1f} GiB in "
                f"float64, above max_parameters={max_parameters}. Select fewer parameters "
                "(e.g. parameters=['<last layer>']) or raise max_parameters."
            )
        xp = self.xp
        eye = self.kernels.as_native(
            xp.eye(d, dtype=self.dtype), floating=True
        )  # on the model's device
        blocks = [eye[:, s : s + block_size] for s in range(0, d, block_size)]

        def block_hvps(batch: Batch) -> Array:
            hb = [self.kernels.mean_loss_hvp(batch.inputs, batch.targets, blk) for blk in blocks]
            return join(xp, hb, axis=1)

        return self._weighted_mean(data, batch_size, block_hvps, "Hessian", show_progress=True)

    # -- helpers ------------------------------------------------------------------
    def _weighted_mean(
        self,
        data: Any,
        batch_size: int | None,
        compute: Callable[[Batch], Array],
        what: str,
        show_progress: bool = False,
    ) -> Array:
        """(1/n) Σ_j b_j · compute(batch_j) over the batches of ``data``.

        Each kernel returns a mean over its batch of b_j samples, so weighting by
        b_j makes a partial last batch count correctly. With a single batch the
        kernel's result is returned as it is (no arithmetic, bit-exact).
        Non-finite results are checked once, at the end.
        """
        first = total = None
        n = 0
        batches = self.batches(data, batch_size)
        for batch in progress(batches, desc=what) if show_progress else batches:
            result = compute(batch)
            if first is None:
                first = result
            else:
                total = (first * n if total is None else total) + result * batch.size
            n += batch.size
        if first is None:
            raise ValueError("the data yielded no samples")
        mean = first if total is None else total / n
        if self.check_finite and not self._all_finite(mean):
            self._raise_non_finite(data, batch_size, what)
        return mean

    def _all_finite(self, array: Array) -> bool:
        # NaN/inf anywhere makes the sum non-finite: one reduction on the device,
        # then a Python check of the 0-d result (``__float__`` is in the standard).
        return math.isfinite(float(self.xp.sum(array)))

    def _bad_rows(self, grads: Array, start: int) -> list[int]:
        xp = self.xp
        row_bad = xp.logical_not(xp.isfinite(xp.sum(grads, axis=1)))
        return [start + int(i) for i in xp.nonzero(row_bad)[0]]

    def _raise_non_finite(self, data: Any, batch_size: int | None, what: str) -> None:
        # Slow path, only on failure: per-sample gradients name the samples.
        bad: list[int] = []
        for batch in self.batches(data, batch_size):
            bad += self._bad_rows(
                self.kernels.per_sample_grads(batch.inputs, batch.targets), batch.start
            )
        raise NonFiniteGradientError(what, bad)

    def __repr__(self) -> str:
        return (
            f"InfluenceModel(backend={self.backend!r}, d={self.num_parameters}, "
            f"parameters={list(self.parameter_names)})"
        )
