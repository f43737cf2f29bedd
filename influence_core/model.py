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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from .arrays import join
from .data import Batch, OffsetData, is_array_pair, iter_batches, leading_dim, slice_samples
from .deferred_statistics import DeferredStatistics
from .errors import (
    EmptyDataError,
    InvalidSampleError,
    NonFiniteGradientError,
    PerSampleLossError,
    PrecisionWarning,
)
from .measurements import LOSS, Measurement
from .pass_order import DEFAULT_MAX_SAMPLES, PassOrder
from .plugin.namespace import ArrayNamespace
from .plugin.outputs import OutputSelector, check_output_selector
from .plugin.protocol import (
    LastLayer,
    ModelKernels,
    ParameterLayout,
    UnsupportedByBackendError,
    check_state,
)
from .plugin.registry import BackendRegistry, get_registry
from .progress import progress
from .sums import ShardedData, curvature_sum, hessian_sum
from .tree import tree_map

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_GRADIENT_MEMORY",
    "MAX_HESSIAN_PARAMETERS",
    "InfluenceModel",
]

#: Batch size used to cut ``(X, y)`` arrays and unbatched datasets when none is given.
DEFAULT_BATCH_SIZE = 256
#: Largest ``d`` for which :meth:`InfluenceModel.hessian` builds the full matrix by default.
MAX_HESSIAN_PARAMETERS = 10_000
#: Default bound on one block of per-sample gradients, b × d entries (1 GiB).
DEFAULT_GRADIENT_MEMORY = 2**30

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
            the offending samples. Costs one reduction per result, or less where
            the backend folds it into the kernel (measured by ``make bench``,
            ``benchmarks/bench_kernels.py``; table in ``docs/benchmarks.md``).
        gradient_memory: the most bytes one block of per-sample gradients
            (b × d) may take. A batch with more samples than that allows
            (b · d · itemsize > gradient_memory) is cut into consecutive
            sub-batches, each a batch of its own with its place in the data,
            so every estimator streams it in bounded memory with the same
            numbers; the backend's kernels may briefly hold about twice the
            block. ``None``: batches as they come. Passes that never form the
            block are not cut (means, HVPs, K-FAC factors, fingerprints), nor
            a batch asked for whole (:meth:`per_sample_grads`).
        max_samples: the most samples one pass over data of unknown length may
            yield before it is refused as endless (``.repeat()``, an infinite
            generator); ``None``: no bound.
        output: which of the model's outputs the loss and measurements read,
            when it returns more than one array (a Hugging Face ``ModelOutput``,
            a tuple, a dict): a key, an index or a callable
            (:func:`~influence_core.plugin.select_output`); by default an array
            as it is, or a mapping's ``"logits"``. Passed to the backend as the
            standard option ``output``.
        options: backend options, passed to the backend's kernels as keyword
            arguments (each backend documents its own, e.g. ``call_kwargs``
            forwarded to every model call); an unknown one is an error.
        registry: the backend registry (tests use their own).

    θ in the model: an in-place backend (PyTorch, Keras) writes θ into the
    user's model inside :meth:`parameters_set_to` and :meth:`checkpoint_loaded`
    and restores it afterwards. A functional backend (JAX) never writes into
    the model: inside the block this ``InfluenceModel`` (and the views
    :meth:`with_parameters` makes from it) compute at the new weights, and
    the user's model is untouched.
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
        gradient_memory: int | None = DEFAULT_GRADIENT_MEMORY,
        max_samples: int | None = DEFAULT_MAX_SAMPLES,
        output: OutputSelector = None,
        options: Mapping[str, Any] | None = None,
        registry: BackendRegistry | None = None,
    ) -> None:
        registry = registry or get_registry()
        spec = registry.by_name(backend) if backend is not None else registry.for_model(model)
        if isinstance(loss_fn, str) or not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be a callable returning one loss per sample, got "
                f"{type(loss_fn).__name__} {loss_fn!r}. Build the loss object: "
                "torch.nn.CrossEntropyLoss(reduction='none') in PyTorch, "
                "keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None) "
                "in Keras (a Keras loss name such as 'sparse_categorical_crossentropy' reduces "
                "over the batch)."
            )
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        self.backend: str = spec.name
        self.model = model
        self.loss_fn = loss_fn
        self.batch_size = int(batch_size)
        self.check_finite = bool(check_finite)
        self.max_samples = None if max_samples is None else int(max_samples)
        if gradient_memory is not None and int(gradient_memory) < 1:
            raise ValueError(
                f"gradient_memory must be a positive number of bytes, got {gradient_memory}"
            )
        self.gradient_memory = None if gradient_memory is None else int(gradient_memory)
        self._gradient_rows: int | None = None
        self.options: dict[str, Any] = dict(options or {})
        if output is not None:
            self.options["output"] = check_output_selector(output)
        self.kernels: ModelKernels = spec.load_kernels()(model, loss_fn, parameters, **self.options)
        _check_writes_theta(self.kernels)
        self._loss_checked = False
        self._registry = registry
        self._pass_order = PassOrder()

    def with_parameters(self, parameters: str | Sequence[str] | None) -> InfluenceModel:
        """The same model, loss and settings with another selection θ (e.g. the last layer).

        Made inside :meth:`parameters_set_to` or :meth:`checkpoint_loaded` of a
        functional backend, the view computes at the weights of that block.
        """
        view = InfluenceModel(
            self.model,
            self.loss_fn,
            parameters=parameters,
            backend=self.backend,
            batch_size=self.batch_size,
            check_finite=self.check_finite,
            gradient_memory=self.gradient_memory,
            max_samples=self.max_samples,
            options=self.options,
            registry=self._registry,
        )
        if self._bound:
            view.kernels = view.kernels.with_checkpoint(self.save_state())
            view._bound = True
        return view

    def last_layer(self) -> LastLayer:
        """The final linear layer (Φ(x) = f(x) W + b); its ``name`` selects its parameters."""
        return self.kernels.last_layer()

    # -- θ ------------------------------------------------------------------------
    @property
    def xp(self) -> ArrayNamespace:
        """The Array API namespace of the model's arrays."""
        return self.kernels.xp

    @property
    def layout(self) -> ParameterLayout:
        """θ's parameters: names, shapes, dtype and canonical placement."""
        return self.kernels.layout

    @property
    def dtype(self) -> Any:
        return self.kernels.layout.dtype

    @property
    def itemsize(self) -> int:
        """Bytes per entry of θ's dtype (4 for float32, 8 for float64): for memory estimates."""
        return int(self.to_numpy(self.xp.zeros((1,), dtype=self.dtype)).dtype.itemsize)

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """The selected parameters making up θ, in flat order."""
        return self.kernels.layout.names

    @property
    def num_parameters(self) -> int:
        """d, the length of θ."""
        return self.kernels.layout.size

    def to_canonical(self, flat: Any) -> Array:
        """A flat vector (d,) or block (d, k) in this backend's θ order, in the canonical layout.

        The canonical layout is framework-neutral (Keras': dense kernels
        ``(in, out)``, conv kernels ``(kh, kw, in, out)``), so the same weights
        give the same canonical vector in every framework.
        """
        return self._relayout(flat, to_canonical=True)

    def from_canonical(self, flat: Any) -> Array:
        """The inverse of :meth:`to_canonical`: a canonical (d,) or (d, k) in this backend's order."""
        return self._relayout(flat, to_canonical=False)

    def _relayout(self, flat: Any, *, to_canonical: bool) -> Array:
        xp = self.xp
        flat = self.kernels.as_native(flat, floating=True)
        d = self.num_parameters
        if len(flat.shape) not in (1, 2) or int(flat.shape[0]) != d:
            raise ValueError(f"expected shape ({d},) or ({d}, k), got {tuple(flat.shape)}")
        layout = self.kernels.layout
        if layout.is_canonical:
            return flat
        layouts, order = layout.canonical_permutations, layout.canonical_order
        trailing = tuple(int(s) for s in flat.shape[1:])
        shapes, sizes = layout.shapes, layout.sizes
        # Where each parameter sits in the input: backend order, or canonical order.
        sequence = list(range(len(shapes))) if to_canonical else list(order)
        offsets, start = {}, 0
        for i in sequence:
            offsets[i] = start
            start += sizes[i]
        pieces = {}
        for i, (shape, perm) in enumerate(zip(shapes, layouts, strict=True)):
            piece = flat[offsets[i] : offsets[i] + sizes[i]]
            if perm is not None:
                extra = tuple(range(len(shape), len(shape) + len(trailing)))
                if to_canonical:
                    block = xp.reshape(piece, (*shape, *trailing))
                    piece = xp.permute_dims(block, (*perm, *extra))
                else:
                    canonical_shape = tuple(shape[p] for p in perm)
                    inverse = tuple(perm.index(j) for j in range(len(perm)))
                    block = xp.reshape(piece, (*canonical_shape, *trailing))
                    piece = xp.permute_dims(block, (*inverse, *extra))
                piece = xp.reshape(piece, (sizes[i], *trailing))
            pieces[i] = piece
        output = list(order) if to_canonical else list(range(len(shapes)))
        return join(xp, [pieces[i] for i in output])

    def get_parameters(self) -> Array:
        """A copy of θ, shape ``(d,)``."""
        return self.kernels.get_flat_parameters()

    @contextmanager
    def parameters_set_to(self, flat: Any) -> Iterator[None]:
        """Compute at θ = ``flat`` (shape ``(d,)``) inside the ``with`` block.

        In-place backends load it into the model and restore the previous
        values on exit, also after an exception; functional ones bind new
        kernels and never touch the model. Either way the user's model is as
        before outside the block.
        """
        flat = self.kernels.as_native(flat, floating=True)
        if tuple(flat.shape) != (self.num_parameters,):
            raise ValueError(
                f"expected a flat parameter vector of shape ({self.num_parameters},), "
                f"got {tuple(flat.shape)}"
            )
        if self.kernels.functional:
            with self._bound_to(self.kernels.with_parameters(flat)):
                yield
            return
        saved = self.kernels.get_flat_parameters()
        self.kernels.set_flat_parameters(flat)
        try:
            yield
        finally:
            self.kernels.set_flat_parameters(saved)

    @contextmanager
    def checkpoint_loaded(self, checkpoint: Any) -> Iterator[None]:
        """Compute at every weight of a user checkpoint inside the ``with`` block.

        Accepts what the backend's ``load_checkpoint`` (``with_checkpoint`` for
        a functional backend) does: a state dict or a ``torch.save`` file in
        PyTorch, a ``get_weights()`` list or a ``load_weights`` file in Keras,
        a ``save_state()`` dict or ``.npz`` file in JAX. In-place backends
        restore the previous weights on exit. One checkpoint is in memory at a time.
        """
        if self.kernels.functional:
            with self._bound_to(self.kernels.with_checkpoint(checkpoint)):
                yield
            return
        saved = self.save_state()
        try:
            self.kernels.load_checkpoint(checkpoint)
            yield
        finally:
            self.kernels.load_checkpoint(saved)

    def load_weights(self, checkpoint: Any) -> None:
        """Compute at a checkpoint's weights from now on (what a model factory does on a worker).

        Accepts what :meth:`checkpoint_loaded` does, and the NumPy form of
        :meth:`weights_as_numpy`. An in-place backend writes it into the model;
        a functional one binds kernels at it (the user's model is untouched).
        """
        if self.kernels.functional:
            self.kernels, self._bound = self.kernels.with_checkpoint(checkpoint), True
        else:
            self.kernels.load_checkpoint(checkpoint)

    def weights_as_numpy(self) -> Any:
        """Every weight of the model (not only θ) as NumPy, in the backend's checkpoint form.

        A state dict of arrays in PyTorch, the ``get_weights()`` list in Keras,
        the ``save_state()`` dict in JAX: what :meth:`load_weights` and
        :meth:`checkpoint_loaded` take back, in this or another process,
        without pickling a framework tensor.
        """
        import numpy as np

        def host(leaf: Any) -> Any:
            return leaf if isinstance(leaf, np.ndarray) else np.asarray(self.to_numpy(leaf))

        return tree_map(host, self.save_state())

    def save_state(self) -> Any:
        """Every weight of the model (θ and the rest), native, as the backend keeps it: checked flat.

        A name → array mapping or a list of arrays
        (:meth:`~influence_core.plugin.ModelKernels.save_state`); what
        :meth:`checkpoint_loaded` takes back.
        """
        return check_state(self.kernels.save_state(), self.backend)

    _bound = False  # True while a functional backend's kernels are at other weights

    @contextmanager
    def _bound_to(self, kernels: ModelKernels) -> Iterator[None]:
        saved, was_bound = self.kernels, self._bound
        self.kernels, self._bound = kernels, True
        try:
            yield
        finally:
            self.kernels, self._bound = saved, was_bound

    def to_numpy(self, array: Any) -> Any:
        """A NumPy copy (on the host) of one of this model's native arrays."""
        return self.kernels.to_numpy(array)

    # -- data ---------------------------------------------------------------------
    def batches(
        self, data: Any, batch_size: int | None = None, *, whole: bool = False
    ) -> Iterator[Batch]:
        """Iterate ``data`` as :class:`~influence_core.data.Batch` es of native arrays.

        ``data``: ``(X, y)`` arrays, a torch ``DataLoader``/``Dataset``, a
        ``tf.data.Dataset`` (batched or not), an iterable of ``(x, y)`` batches,
        or any of these as an :class:`~influence_core.data.OffsetData` shard.

        Every pass over the same data must yield the same samples in the same
        order (:mod:`influence_core.pass_order`): a pass that differs from an
        earlier one raises :class:`~influence_core.errors.DataOrderError`, a
        one-shot generator read a second time
        :class:`~influence_core.errors.DataConsumedError`, and endless data
        :class:`~influence_core.errors.EndlessDataError`. A batch larger than
        ``gradient_memory`` allows is cut into sub-batches (unless ``whole``).
        """
        if isinstance(data, ShardedData):
            raise TypeError(
                f"{type(data).__name__} is iterated on its workers, shard by shard, never in "
                "this process; this operation streams its data here. The solvers' fits "
                "(exact, CG, Arnoldi, K-FAC, EK-FAC) and the scores of "
                "influence_core.distributed.DistributedInfluence run on sharded data"
            )
        n = 0
        batch_size = batch_size or self.batch_size
        stream = iter_batches(data, batch_size, self.kernels.native_batches, self.kernels.as_native)
        for batch in self._pass_order.watch(
            data, batch_size, stream, self.xp, self.kernels.to_numpy, self.max_samples
        ):
            if batch.size == 0:  # an empty batch has nothing to say; kernels never see one
                continue
            if not self._loss_checked:
                self._guarded(batch, lambda b: self._check_per_sample_loss(b))
            n += batch.size
            rows = None if whole else self.gradient_rows()
            if rows is None or batch.size <= rows:
                yield batch
                continue
            for start in range(0, batch.size, rows):  # whole sub-batches, not samples
                stop = min(start + rows, batch.size)
                yield Batch(
                    slice_samples(batch.inputs, start, stop),
                    slice_samples(batch.targets, start, stop),
                    batch.start + start,
                )
        if n == 0:
            raise EmptyDataError(
                f"the data holds no samples ({_describe_data(data)}); influence needs at least one"
            )

    def num_batches(self, data: Any, batch_size: int | None = None) -> int | None:
        """How many batches :meth:`batches` yields, when known without a pass (for progress bars)."""
        batch_size = batch_size or self.batch_size
        if isinstance(data, ShardedData):
            return None
        if isinstance(data, OffsetData):
            data = data.data
        if is_array_pair(data):
            return -(-leading_dim(data[1]) // batch_size)
        if isinstance(data, (list, tuple)):
            return len(data)
        return self.kernels.native_batch_count(data, batch_size)

    def count(self, data: Any, batch_size: int | None = None) -> int:
        """The number of samples in ``data`` (free for arrays; one pass over a dataset)."""
        if isinstance(data, ShardedData):
            return data.num_samples
        if isinstance(data, OffsetData):
            if data.size is not None:
                return int(data.size)
            data = data.data
        if is_array_pair(data):
            return leading_dim(data[1])
        return sum(batch.size for batch in self.batches(data, batch_size, whole=True))

    def _check_per_sample_loss(self, batch: Batch) -> None:
        losses = self.kernels.per_sample_loss(batch.inputs, batch.targets)
        shape = tuple(getattr(losses, "shape", ()))
        b = batch.size
        if shape != (b,):
            if shape == (b, 1):
                advice = (
                    "it returns one value per sample with a trailing axis of 1 (a (b, 1) "
                    "output, e.g. BCEWithLogitsLoss on a one-unit head): squeeze it, "
                    "e.g. loss_fn=lambda outputs, targets: loss(outputs, targets).reshape(-1), "
                    "or give the targets and outputs shape (b,)"
                )
            elif len(shape) == 0:
                advice = (
                    "it reduces over the batch. Build it without reduction: "
                    "torch.nn.CrossEntropyLoss(reduction='none') in PyTorch, "
                    "keras.losses.SparseCategoricalCrossentropy(reduction=None) in Keras"
                )
            else:
                advice = (
                    f"reduce its other axes yourself (e.g. mean over all but the first), so it "
                    f"returns shape ({b},)"
                )
            raise PerSampleLossError(
                f"the loss returned shape {shape} for a batch of {b} samples; it must return "
                f"one value per sample, shape ({b},): {advice}."
            )
        loss_bits = self._bits(losses)
        parameter_bits = self._bits(self.xp.zeros((1,), dtype=self.dtype))
        if loss_bits is not None and parameter_bits is not None and loss_bits < parameter_bits:
            warnings.warn(
                f"the loss returns {losses.dtype} values but the parameters are {self.dtype}: "
                "gradients lose precision. Keras losses compute in keras.config.floatx() unless "
                "built with dtype='float64'.",
                PrecisionWarning,
                stacklevel=5,
            )
        self._loss_checked = True

    def _bits(self, array: Any) -> int | None:
        """Bits per value of a floating native array (via its host copy), else ``None``."""
        try:
            host = self.kernels.to_numpy(array)
        except Exception:  # an exotic dtype: no precision comparison
            return None
        kind = getattr(getattr(host, "dtype", None), "kind", "")
        return 8 * host.dtype.itemsize if kind == "f" else None

    def _guarded(self, batch: Batch, compute: Callable[[Batch], Any]) -> Any:
        """``compute(batch)``; if the framework raises, name the samples the loss fails on.

        Only on failure: each sample's loss is taken alone to find the culprits
        (a label outside the classes, a wrong shape), then the error is raised
        as :class:`~influence_core.errors.InvalidSampleError` with their indices.
        """
        try:
            return compute(batch)
        except Exception as error:
            if type(error).__module__.startswith("influence_core"):
                raise  # our own diagnosis already (or a missing capability): no sample to blame
            bad = []
            for i in range(batch.size):

                def one(a: Any, i: int = i) -> Any:
                    return a[i : i + 1]

                try:
                    self.kernels.per_sample_loss(
                        tree_map(one, batch.inputs), tree_map(one, batch.targets)
                    )
                except Exception:
                    bad.append(batch.start + i)
            if bad:
                raise InvalidSampleError(bad, error) from error
            raise

    def gradient_rows(self) -> int | None:
        """The most samples a batch of per-sample gradients may hold under ``gradient_memory``."""
        if self.gradient_memory is None:
            return None
        if self._gradient_rows is None:
            self._gradient_rows = max(
                1, self.gradient_memory // (self.num_parameters * self.itemsize)
            )
        return self._gradient_rows

    def _single_batch(self, data: Any) -> Batch:
        batches = list(self.batches(data, batch_size=2**62, whole=True))
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
            self._guarded(b, lambda b: self.kernels.per_sample_loss(b.inputs, b.targets))
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
        if measurement.is_loss and self.check_finite:
            grads, finite = self._guarded(
                batch, lambda b: self.kernels.per_sample_grads_and_finite(b.inputs, b.targets)
            )
            if not finite:
                raise self.non_finite_error(
                    "per-sample gradients", self._bad_rows(grads, batch.start)
                )
            return grads
        if measurement.is_loss:
            grads = self._guarded(
                batch, lambda b: self.kernels.per_sample_grads(b.inputs, b.targets)
            )
        else:
            function = measurement.loss_like(self.xp)
            grads = self._guarded(
                batch,
                lambda b: self.kernels.per_sample_measurement_grads(b.inputs, b.targets, function),
            )
        if self.check_finite and not self._all_finite(grads):
            raise self.non_finite_error(
                "per-sample gradients"
                + ("" if measurement.is_loss else f" of the {measurement.describe()}"),
                self._bad_rows(grads, batch.start),
            )
        return grads

    def per_sample_grad_products(self, batch: Any, vectors: Any) -> Array:
        """⟨∇_θ ℓ(z_i), v_j⟩ for each sample of one batch ``(inputs, targets)``: shape ``(b, q)``.

        ``vectors``: shape ``(d, q)``. A forward-mode product where the backend
        has one (:meth:`~influence_core.plugin.ModelKernels.per_sample_loss_jvp`:
        no ``(b, d)`` block, a few forward passes' cost); otherwise the
        per-sample gradients times ``vectors``.
        """
        b = self._single_batch(batch)
        v = self.kernels.as_native(vectors, floating=True)
        if self._forward_products:
            try:
                products = self._guarded(
                    b, lambda b: self.kernels.per_sample_loss_jvp(b.inputs, b.targets, v)
                )
            except UnsupportedByBackendError:
                self._forward_products = False
            else:
                if self.check_finite and not self._all_finite(products):
                    raise self.non_finite_error(
                        "per-sample gradient products", self._bad_rows(products, b.start)
                    )
                return products
        return self.xp.matmul(self.batch_per_sample_grads(b), v)

    _forward_products = True  # until the backend says it has no per_sample_loss_jvp

    def layer_statistics(
        self,
        batch: Batch,
        measurement: Measurement = LOSS,
        targets: Any = None,
        *,
        deferred: bool = False,
    ) -> Mapping[str, tuple[Array, Array]]:
        """Each layer's inputs and output gradients for one :class:`Batch` (the loss, or a measurement).

        ``{layer name: (a (b, T, p_in), g (b, T, p_out))}`` from the backend's
        :meth:`~influence_core.plugin.ModelKernels.layer_statistics`; with a
        measurement other than the loss, g is the gradient of its loss-like
        form m = ∓f, as in :meth:`batch_per_sample_grads`. ``targets``
        replaces the batch's own (a true Fisher's sampled labels). Every
        layer's shapes are checked against its description
        (:func:`check_layer_statistics`), naming the layer.

        ``deferred``: a :class:`~influence_core.deferred_statistics.DeferredStatistics`
        whose convolutions form their patches only when read, from the
        backend's ``layer_statistics_deferred`` where it has it.
        """
        targets = batch.targets if targets is None else targets
        kernels, layers = self.kernels, self.kernels.layers()
        compute = kernels.layer_statistics
        if deferred and any(layer.kind == "conv2d" for layer in layers) and self._defers():
            compute = kernels.layer_statistics_deferred
        try:
            if measurement.is_loss:
                stats = self._guarded(batch, lambda b: compute(b.inputs, targets))
            else:
                function = measurement.loss_like(self.xp)
                stats = self._guarded(
                    batch, lambda b: compute(b.inputs, targets, measurement=function)
                )
        except UnsupportedByBackendError:
            if compute == kernels.layer_statistics:
                raise
            stats = self.layer_statistics(batch, measurement, targets)  # patches formed
            return DeferredStatistics(self, stats, layers, batch.size, deferred=False)
        deferring = compute != kernels.layer_statistics
        checked = [layer for layer in layers if not (deferring and layer.kind == "conv2d")]
        check_layer_statistics(checked, stats, batch.size, self.backend)
        if not deferred:
            return stats
        return DeferredStatistics(self, stats, layers, batch.size, deferred=deferring)

    def _defers(self) -> bool:
        """Whether the backend implements all three kernels of deferred convolutions."""
        kind = type(self.kernels)
        return all(
            getattr(kind, name) is not getattr(ModelKernels, name)
            for name in ("layer_statistics_deferred", "conv2d_patches", "conv2d_map")
        )

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
        return self.curvature_vp(data, vectors, "hessian", batch_size)

    def ggn_vp(self, data: Any, vectors: Any, batch_size: int | None = None) -> Array:
        """G v with G the generalised Gauss–Newton matrix of the mean loss over ``data``.

        G = (1/n) Σ_i J_iᵀ (∂²ℓ_i/∂Φ²) J_i, J_i = ∂Φ(x_i)/∂θ: the Hessian without
        its second-derivative-of-the-network term, positive semi-definite for a
        convex loss (cross-entropy, squared error). Shapes as :meth:`hvp`.
        """
        return self.curvature_vp(data, vectors, "ggn", batch_size)

    def curvature_vp(
        self, data: Any, vectors: Any, curvature: str = "hessian", batch_size: int | None = None
    ) -> Array:
        """:meth:`hvp` (``curvature="hessian"``) or :meth:`ggn_vp` (``"ggn"``), streamed over ``data``."""
        check_curvature(curvature)
        v = self.kernels.as_native(vectors, floating=True)
        d = self.num_parameters
        single = len(v.shape) == 1
        if single:
            v = self.xp.reshape(v, (d, 1))
        if len(v.shape) != 2 or int(v.shape[0]) != d:
            raise ValueError(f"vectors must have shape ({d},) or ({d}, k), got {tuple(v.shape)}")
        if isinstance(data, ShardedData):  # one pass over every shard, where it is
            sums = data.sum_over_shards(
                self,
                curvature_sum,
                {"vectors": v, "curvature": curvature, "batch_size": batch_size},
            )
            out = sums["sum"] / sums["n"]
            return self.xp.reshape(out, (d,)) if single else out
        out = self._weighted_mean(
            data,
            batch_size,
            lambda b: self.batch_curvature_vp(b.inputs, b.targets, v, curvature),
            "Hessian-vector product" if curvature == "hessian" else "Gauss-Newton-vector product",
        )
        return self.xp.reshape(out, (d,)) if single else out

    def batch_curvature_vp(
        self, inputs: Any, targets: Any, vectors: Array, curvature: str
    ) -> Array:
        """One batch's mean-loss Hessian or Gauss–Newton product with ``vectors`` (d, k)."""
        if curvature == "hessian":
            return self.kernels.mean_loss_hvp(inputs, targets, vectors)
        check_curvature(curvature)
        return self.kernels.mean_loss_ggn_vp(inputs, targets, vectors)

    def hessian(
        self,
        data: Any,
        *,
        block_size: int = 256,
        batch_size: int | None = None,
        max_parameters: int = MAX_HESSIAN_PARAMETERS,
        curvature: str = "hessian",
    ) -> Array:
        """The full Hessian ∇²_θ L(θ) (or, ``curvature="ggn"``, the Gauss–Newton matrix), ``(d, d)``.

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
        if isinstance(data, ShardedData):  # each shard's Hessian where it is, then summed
            sums = data.sum_over_shards(
                self,
                hessian_sum,
                {
                    "curvature": curvature,
                    "batch_size": batch_size,
                    "block_size": block_size,
                    "max_parameters": max_parameters,
                },
            )
            return sums["sum"] / sums["n"]
        xp = self.xp
        eye = self.kernels.as_native(
            xp.eye(d, dtype=self.dtype), floating=True
        )  # on the model's device
        blocks = [eye[:, s : s + block_size] for s in range(0, d, block_size)]

        def block_hvps(batch: Batch) -> Array:
            hb = [
                self.batch_curvature_vp(batch.inputs, batch.targets, blk, curvature)
                for blk in blocks
            ]
            return join(xp, hb, axis=1)

        what = "Hessian" if curvature == "hessian" else "Gauss-Newton matrix"
        return self._weighted_mean(data, batch_size, block_hvps, what, show_progress=True)

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
        batches = self.batches(data, batch_size, whole=True)  # means and HVPs: no (b, d) block
        if show_progress:
            batches = progress(batches, desc=what, total=self.num_batches(data, batch_size))
        for batch in batches:
            result = self._guarded(batch, compute)
            if first is None:
                first = result
            else:
                total = (first * n if total is None else total) + result * batch.size
            n += batch.size
        if first is None:  # pragma: no cover - batches() raises EmptyDataError first
            raise EmptyDataError("the data yielded no samples")
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
        raise self.non_finite_error(what, bad)

    def non_finite_error(self, what: str, sample_indices: Sequence[int]) -> NonFiniteGradientError:
        """The error for non-finite ``what`` at these samples, after checking the weights themselves.

        A NaN or infinite weight makes every sample's gradient non-finite; the
        error then names the weights, not the data.
        """
        return NonFiniteGradientError(what, sample_indices, parameters=self.non_finite_weights())

    def non_finite_weights(self) -> list[str]:
        """The model's weights holding NaN or infinity: θ's by name, then the others of ``save_state``."""
        import numpy as np

        names, start = [], 0
        flat = np.asarray(self.to_numpy(self.get_parameters()))
        for name, size in zip(self.parameter_names, self.layout.sizes, strict=True):
            if not np.isfinite(flat[start : start + size]).all():
                names.append(name)
            start += size
        try:
            state = self.save_state()
        except UnsupportedByBackendError:
            return names
        items = state.items() if isinstance(state, Mapping) else enumerate(state)
        for key, leaf in items:
            host = np.asarray(self.to_numpy(leaf) if not isinstance(leaf, np.ndarray) else leaf)
            label = str(key) if isinstance(state, Mapping) else f"weight {key} of save_state()"
            if host.dtype.kind in "fc" and not np.isfinite(host).all() and label not in names:
                names.append(label)
        return names

    def __repr__(self) -> str:
        return (
            f"InfluenceModel(backend={self.backend!r}, d={self.num_parameters}, "
            f"parameters={list(self.parameter_names)})"
        )


def _check_writes_theta(kernels: ModelKernels) -> None:
    """A backend implements one way of computing at other θ: in place, or functionally."""
    kind = type(kernels)
    if kernels.functional:  # its views at other weights are made from a state of every weight
        needed = ("with_parameters", "with_checkpoint", "save_state")
    else:
        needed = ("set_flat_parameters",)
    missing = [m for m in needed if getattr(kind, m) is getattr(ModelKernels, m)]
    if missing:
        how = (
            "a functional backend (functional = True) returns kernels at other weights "
            "(with_parameters) and at a state of every weight (save_state, with_checkpoint)"
            if kernels.functional
            else "an in-place backend writes θ into the model (or declares functional = True "
            "and implements with_parameters)"
        )
        raise TypeError(f"{kind.__qualname__} does not implement {', '.join(missing)}: {how}")


def _describe_data(data: Any) -> str:
    if is_array_pair(data):
        return f"arrays of leading dimension {leading_dim(data[1])}"
    return f"a {type(data).__name__} that yielded no samples"


#: The curvatures the HVP-based solvers take (see :meth:`InfluenceModel.curvature_vp`).
CURVATURES = ("hessian", "ggn")


def check_curvature(curvature: str) -> None:
    """Refuse a curvature other than ``"hessian"`` or ``"ggn"``, naming it."""
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")


def check_layer_statistics(
    layers: Sequence[Any], stats: Mapping[str, tuple[Any, Any]], b: int, backend: str
) -> None:
    """Refuse layer statistics whose shapes are not ``a (b, T, p_in)``, ``g (b, T, p_out)`` for each layer.

    A backend that swaps a and g, or drops the position axis, would otherwise
    fail deep in the core with a bare reshape error, or (when p_in and p_out
    allow the reshape) give wrong scores silently.
    """
    for layer in layers:
        if layer.name not in stats:
            raise ValueError(
                f"the {backend} backend's layer_statistics returned no entry for layer "
                f"{layer.name!r} (it returned {sorted(stats)}); every layer of layers() needs one"
            )
        a, g = stats[layer.name]
        a_shape, g_shape = tuple(int(s) for s in a.shape), tuple(int(s) for s in g.shape)
        # An embedding's a holds indices (b, T); an elementwise or parameter layer's a is
        # (b, T, p) like g.
        expected_a = {
            "embedding": (),
            "elementwise": (layer.outputs,),
            "parameter": (layer.outputs,),
        }.get(layer.kind, (layer.inputs,))
        expected_g = (layer.outputs,)
        good = (
            len(a_shape) == 2 + len(expected_a)
            and len(g_shape) == 3
            and a_shape[0] == g_shape[0] == b
            and a_shape[1] == g_shape[1]
            and a_shape[2:] == expected_a
            and g_shape[2:] == expected_g
        )
        if good:
            continue
        swapped = a_shape[2:] == expected_g and g_shape[2:] == expected_a
        hint = (
            " (the inputs and output gradients look swapped: return (a, g))"
            if swapped and layer.inputs != layer.outputs
            else ""
        )
        raise ValueError(
            f"the {backend} backend's layer statistics of layer {layer.name!r} "
            f"({layer.kind}, p_in={layer.inputs}, p_out={layer.outputs}) have shapes a "
            f"{a_shape} and g {g_shape} for a batch of {b}; expected a "
            f"({', '.join([f'b={b}', 'T', *map(str, expected_a)])}) and g "
            f"(b={b}, T, {layer.outputs}) with the same T{hint}"
        )
