"""The autodiff protocol: the per-batch kernels a backend implements.

A backend supplies one :class:`ModelKernels` per wrapped model. Kernels see one
batch at a time and know nothing of datasets, estimators or error reporting:
the core's :class:`~influence_core.model.InfluenceModel` streams batches
through them, weights partial batches, checks for non-finite values and
assembles Hessians, once for every backend.

Conventions every kernel follows
--------------------------------
* θ is the *selected* parameters flattened to one vector of length ``d``:
  the selected parameters in the order of :attr:`ParameterLayout.names` (:attr:`ModelKernels.layout`),
  each flattened in row-major (C) order of its native layout.
* ``inputs`` is what the model is called with (one array, or a pytree of
  arrays that share a leading batch dimension ``b``); ``targets`` has leading
  dimension ``b``. Both are native arrays already converted by
  :meth:`ModelKernels.as_native`.
* ℓ(z, θ) is the per-sample loss returned by the user's loss function.
  ``mean`` below is over the ``b`` samples of the batch: the kernels never sum.
* Every returned array is a native array in the parameters' dtype and
  on their device.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .namespace import ArrayNamespace

__all__ = [
    "LastLayer",
    "Layer",
    "ModelKernels",
    "ParameterLayout",
    "UnsupportedByBackendError",
    "check_state",
]

Array = Any


class UnsupportedByBackendError(NotImplementedError):
    """A backend (or this kind of model) lacks an optional capability an estimator needs."""


@dataclass(frozen=True)
class ParameterLayout:
    """What θ is made of: the selected parameters, their shapes and dtype, and where they sit canonically.

    One record replaces what would otherwise be five properties on every backend.
    It is checked when it is built, so a backend that gets it wrong fails at
    construction with the reason, not later with a wrong number.

    Attributes:
        names: the selected parameters, in θ's flat order.
        shapes: the native shape of each, aligned with ``names``.
        dtype: the native floating dtype they share.
        canonical_permutations: per parameter, the axis permutation from its
            native layout to the canonical one (Keras': a dense kernel
            ``(in, out)``, a conv kernel ``(kh, kw, in, out)``):
            ``permute_dims(native, perm)`` is the canonical array; ``None``
            (per entry, or for all) means the native layout is canonical.
            Seeded random vectors are drawn in this layout, so the same seed
            gives the same numbers in every framework.
        canonical_order: the parameters in canonical order, layer by layer with
            the kernel before the bias: entry j is the index (in ``names``) of the
            j-th. ``None``, the identity, fits frameworks that list parameters in
            layer order with the kernel first (PyTorch, Keras); flax ``nnx``
            sorts names (``bias`` before ``kernel``) and says so here.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: Any
    canonical_permutations: tuple[tuple[int, ...] | None, ...] | None = None
    canonical_order: tuple[int, ...] | None = None
    sizes: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.names)
        shapes = tuple(tuple(int(s) for s in shape) for shape in self.shapes)
        count = len(names)
        if count == 0:
            raise ValueError("a ParameterLayout needs at least one parameter")
        if len(set(names)) != count:
            repeated = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"parameter names must be unique; repeated: {repeated}")
        if len(shapes) != count:
            raise ValueError(f"{len(shapes)} shapes for {count} parameter names")
        permutations = self.canonical_permutations
        permutations = (None,) * count if permutations is None else tuple(permutations)
        if len(permutations) != count:
            raise ValueError(f"{len(permutations)} canonical permutations for {count} parameters")
        for name, shape, perm in zip(names, shapes, permutations, strict=True):
            if perm is not None and sorted(perm) != list(range(len(shape))):
                raise ValueError(
                    f"the canonical permutation {tuple(perm)} of {name} is not a permutation "
                    f"of its {len(shape)} axes (shape {shape})"
                )
        order = tuple(range(count)) if self.canonical_order is None else tuple(self.canonical_order)
        if sorted(order) != list(range(count)):
            raise ValueError(
                f"canonical_order {order} is not a permutation of the {count} parameter indices"
            )
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "shapes", shapes)
        object.__setattr__(
            self,
            "canonical_permutations",
            tuple(None if p is None else tuple(int(a) for a in p) for p in permutations),
        )
        object.__setattr__(self, "canonical_order", tuple(int(i) for i in order))
        object.__setattr__(self, "sizes", tuple(math.prod(shape) for shape in shapes))

    @property
    def size(self) -> int:
        """d, the length of θ."""
        return sum(self.sizes)

    @property
    def is_canonical(self) -> bool:
        """True when θ's flat order and every layout are already the canonical ones."""
        return self.canonical_order == tuple(range(len(self.names))) and all(
            p is None for p in self.canonical_permutations or ()
        )


@dataclass(frozen=True)
class LastLayer:
    """The model's final linear layer, Φ(x) = f(x) W + b, in the canonical orientation.

    Attributes:
        name: a parameter selector for the layer (``InfluenceModel(parameters=name)``).
        weight: W, shape ``(p, c)``: p penultimate features to c outputs (a copy).
        bias: b, shape ``(c,)``, or ``None`` when the layer has none.
    """

    name: str
    weight: Array
    bias: Array | None


@dataclass(frozen=True)
class Layer:
    """A layer of θ for which the backend gives layer-wise statistics (:meth:`ModelKernels.layers`).

    Each kind says what the statistics ``(a, g)`` of :meth:`ModelKernels.layer_statistics`
    hold and how sample i's gradient is built from them (g is always ∂ℓ_i/∂z
    at the layer's output z, at each of its T positions):

    * ``"dense"``: z = a W + b at T positions (T = 1 on ``(b, p_in)`` inputs,
      T = t on ``(b, t, p_in)``); ``a`` is ``(b, T, p_in)``; ∇W = Σ_t a_tᵀ g_t,
      ∇b = Σ_t g_t. Attention's query/key/value/output projections are dense
      layers over positions.
    * ``"conv2d"``: a dense layer on the unfolded patches, one position per
      output pixel, each patch in the canonical ``(kh, kw, in)`` order, so
      that W is the canonical kernel reshaped to ``(kh·kw·in, out)``.
    * ``"embedding"``: z = W[a] (a one-hot input times W); ``a`` holds the
      integer indices, shape ``(b, T)``, ``inputs`` is the number of rows of W
      (the vocabulary) and ``outputs`` its width. ∇W = Σ_t e_{a_t} g_tᵀ (rows
      of W a sample did not use get nothing); no bias. Positions whose
      gradient the framework drops (a padding index) have g = 0.
    * ``"elementwise"``: z = a ⊙ w + b (normalisation's affine scale and
      shift: a is the normalised input x̂); ``a`` and ``g`` are ``(b, T, p)``
      with the p features last (channels for BatchNorm/GroupNorm, T their
      positions); ``inputs`` is 1 (each output sees one input) and
      ``outputs`` is p. ∇w = Σ_t a_t ⊙ g_t, ∇b = Σ_t g_t.
    * ``"parameter"``: a parameter used directly (a positional table added to
      activations, a class token, attention's packed input projection): the
      generic case, an elementwise layer with input 1. ``g`` is the per-sample
      gradient of the parameter in its canonical order, ``(b, 1, p)``, and
      ``a`` is ones of the same shape (a broadcast view is enough); ``inputs``
      is 1, ``outputs`` the parameter's size, no bias. Its block is the
      diagonal of the Fisher. A backend computes g however it can (vmapped
      gradients restricted to these parameters), so keep such parameters small.

    Attributes:
        name: the layer's name (a parameter selector).
        kind: ``"dense"``, ``"conv2d"``, ``"embedding"``, ``"elementwise"`` or ``"parameter"``.
        kernel: the parameter name (in ``layout.names``) of W (w).
        bias: the parameter name of b, or ``None`` when b is absent or not in θ.
        inputs: p_in, the length of a (the patch length for a convolution, the
            number of rows for an embedding, 1 for an elementwise or parameter layer).
        outputs: p_out, the length of z.
    """

    name: str
    kind: str
    kernel: str
    bias: str | None
    inputs: int
    outputs: int


#: Entries of the one-hot chunk in :meth:`ModelKernels.segment_sum`'s default (8 MiB in float64).
_SEGMENT_ENTRIES = 1 << 20


class ModelKernels(ABC):
    """Per-batch autodiff kernels for one model, loss and parameter selection.

    Implementations must be vectorised: no Python loop over samples, and
    per-sample gradients never computed as the Jacobian of the per-sample loss
    vector. A backend author implements the abstract members and runs the
    conformance suite (:mod:`influence_conformance`) to prove them.
    """

    #: Name of the backend that built these kernels (``"torch"``, ``"tensorflow"`` …).
    backend_name: str

    # -- description of θ --------------------------------------------------------
    @property
    @abstractmethod
    def xp(self) -> ArrayNamespace:
        """The Array API namespace of this model's native arrays."""

    @property
    @abstractmethod
    def layout(self) -> ParameterLayout:
        """θ's parameters: names, shapes, dtype and canonical placement."""

    #: Whether the kernels hold the weights as *values* (JAX). A functional
    #: backend never writes into the user's model: the core asks it for kernels
    #: at other weights (:meth:`with_parameters`, :meth:`with_checkpoint`)
    #: instead of writing θ in place (:meth:`set_flat_parameters`,
    #: :meth:`load_checkpoint`). A backend implements one pair or the other.
    functional: bool = False

    # -- θ itself ------------------------------------------------------------
    @abstractmethod
    def get_flat_parameters(self) -> Array:
        """A copy of θ, shape ``(d,)``."""

    def set_flat_parameters(self, flat: Array) -> None:
        """Write θ (shape ``(d,)``) into the model's parameters, in place (in-place backends)."""
        raise NotImplementedError(
            f"the {self._name()} backend must either write θ in place (set_flat_parameters) "
            "or declare functional = True and implement with_parameters"
        )

    def with_parameters(self, flat: Array) -> ModelKernels:
        """Kernels at θ = ``flat`` and the other weights as they are here (functional backends).

        Returns a new kernels object; neither ``self`` nor the user's model changes.
        """
        raise NotImplementedError(
            f"the {self._name()} backend declares functional = True but does not implement "
            "with_parameters"
        )

    # -- kernels on one batch -------------------------------------------------------
    @abstractmethod
    def per_sample_loss(self, inputs: Array, targets: Array) -> Array:
        """ℓ(z_i, θ) for each sample of the batch: shape ``(b,)``.

        Returns whatever the user's loss returns, unchecked; the core checks the shape.
        """

    @abstractmethod
    def mean_loss_grad(self, inputs: Array, targets: Array) -> Array:
        """∇_θ (1/b) Σ_i ℓ(z_i, θ): shape ``(d,)``."""

    @abstractmethod
    def per_sample_grads(self, inputs: Array, targets: Array) -> Array:
        """∇_θ ℓ(z_i, θ) for each sample, row i for sample i: shape ``(b, d)``."""

    @abstractmethod
    def mean_loss_hvp(self, inputs: Array, targets: Array, vectors: Array) -> Array:
        """H V with H = ∇²_θ (1/b) Σ_i ℓ(z_i, θ), for a block ``vectors`` of shape ``(d, k)``.

        Returns shape ``(d, k)``; column j is H times column j. ``k`` may be 1.
        """

    # -- data -------------------------------------------------------------------
    @abstractmethod
    def as_native(self, array: Any, *, floating: bool | None = None) -> Array:
        """Convert ``array`` (NumPy, list, or native) to a native array on the model's device.

        Floating-point arrays are cast to ``layout.dtype``; integer arrays keep
        their dtype. ``floating=True`` forces the cast (used for vectors in
        parameter space).
        """

    @abstractmethod
    def to_numpy(self, array: Array) -> Any:
        """A NumPy copy of a native array, moved to host memory (for small host-side work)."""

    @abstractmethod
    def native_batches(self, data: Any, batch_size: int) -> Iterator[Any] | None:
        """Iterate a framework-native dataset, or return ``None`` if ``data`` is not one.

        For a PyTorch ``DataLoader`` / ``Dataset`` or a ``tf.data.Dataset``.
        Yields the raw elements (the core checks they are ``(inputs, targets)``
        pairs). Unbatched datasets are batched with ``batch_size``.
        """

    # -- optional capabilities ------------------------------------------------------
    def native_batch_count(self, data: Any, batch_size: int) -> int | None:
        """How many batches :meth:`native_batches` yields for ``data``, if known without a pass.

        Used for progress-bar totals only; the default (``None``) is always safe.
        """
        return None

    # TracIn needs checkpoints; representer points need the split "features → last
    # linear layer". A backend without them still runs every other estimator: the
    # defaults raise UnsupportedByBackendError naming the backend.
    def _name(self) -> str:
        return getattr(self, "backend_name", type(self).__name__)

    def _unsupported(self, what: str) -> UnsupportedByBackendError:
        return UnsupportedByBackendError(f"the {self._name()} backend does not implement {what}")

    def per_sample_grads_and_finite(self, inputs: Array, targets: Array) -> tuple[Array, bool]:
        """:meth:`per_sample_grads` and whether every value is finite.

        The default adds one reduction over the ``(b, d)`` result. A backend
        that can fold the check into the kernel (JAX: sums of the per-parameter
        gradients inside the same compiled function) overrides this.
        """
        grads = self.per_sample_grads(inputs, targets)
        return grads, math.isfinite(float(self.xp.sum(grads)))

    def save_state(self) -> Any:
        """An in-memory copy of *all* the weights these kernels compute at (θ and the rest).

        **Flat**: a mapping ``name -> array`` (PyTorch's state dict, JAX's
        names) or a sequence of arrays (Keras' ``get_weights()``), every value
        an array with ``shape`` and ``dtype``, never a nested container; the
        core checks it (:func:`check_state`) and fingerprints it by its values.
        In a form :meth:`load_checkpoint` (in-place backends) or
        :meth:`with_checkpoint` (functional ones) takes back.

        Optional for an in-place backend (TracIn, saved results' weights
        fingerprint and checkpoints need it); **required** for a functional
        one, whose views at other weights are made from it.
        """
        raise self._unsupported("save_state (needed by TracIn)")

    #: File name suffix :meth:`save_checkpoint` needs (``".pt"``, ``".weights.h5"`` …).
    checkpoint_suffix: str = ""

    def save_checkpoint(self, path: str) -> None:
        """Write all the model's weights to ``path`` in the framework's usual format."""
        raise self._unsupported("save_checkpoint")

    def load_checkpoint(self, checkpoint: Any) -> None:
        """Load a user checkpoint (the framework's usual forms, or a :meth:`save_state`) in place.

        The core calls it (TracIn) only on in-place backends. On a functional
        backend it is the user's own in-place write (an optimizer step on an
        nnx module): the conformance suite uses it to check that kernels read
        the model's *current* weights. A functional backend whose models can
        change implements it; one whose models cannot (immutable values)
        raises :class:`UnsupportedByBackendError` from it, saying so, and the
        suite skips that check visibly. Left unimplemented, the check fails.
        """
        raise self._unsupported("load_checkpoint (needed by TracIn)")

    def with_checkpoint(self, checkpoint: Any) -> ModelKernels:
        """Kernels at every weight of ``checkpoint`` (**required** of functional backends).

        Accepts what :meth:`save_state` returns and the framework's usual
        forms; returns a new kernels object, and nothing else changes.
        """
        raise self._unsupported("with_checkpoint (needed by TracIn)")

    def last_layer(self) -> LastLayer:
        """The final linear layer whose outputs are the model's outputs Φ(x)."""
        raise self._unsupported("last_layer (needed by representer points)")

    def penultimate_features(self, inputs: Array) -> Array:
        """f(x), the input of :meth:`last_layer` for each sample: shape ``(b, p)``."""
        raise self._unsupported("penultimate_features (needed by representer points)")

    def outputs(self, inputs: Array) -> Array:
        """Φ(x), the model's outputs (inference mode): shape ``(b, c)``."""
        raise self._unsupported("outputs")

    def output_loss_grads(self, outputs: Array, targets: Array) -> tuple[Array, Array]:
        """ℓ at the given outputs and ∂ℓ/∂Φ per sample: shapes ``(b,)`` and ``(b, c)``."""
        raise self._unsupported("output_loss_grads (needed by representer points)")

    def output_loss_hessians(self, outputs: Array, targets: Array) -> Array:
        """∂²ℓ/∂Φ² per sample: shape ``(b, c, c)``."""
        raise self._unsupported("output_loss_hessians (needed by RepresenterPointL2)")

    def mean_loss_ggn_vp(self, inputs: Array, targets: Array, vectors: Array) -> Array:
        """G V with the generalised Gauss–Newton G = (1/b) Σ_i J_iᵀ (∂²ℓ_i/∂Φ²) J_i, V of shape (d, k).

        J_i = ∂Φ(x_i)/∂θ (outputs in inference mode, shape (b, c)). Positive
        semi-definite for a convex loss of the outputs, so iterative solvers on
        it never stop on negative curvature (``curvature="ggn"``). Returns (d, k).
        """
        raise self._unsupported("mean_loss_ggn_vp (needed by curvature='ggn')")

    # -- layer-wise statistics (K-FAC, EK-FAC) ---------------------------------------
    def layers(self) -> tuple[Layer, ...]:
        """The layers of θ with layer-wise statistics (dense, conv2d …), in any order.

        A selected parameter that belongs to no listed layer (a layer kind the
        backend does not support) is simply not covered; the solvers that need
        layers name it.
        """
        raise self._unsupported("layers (needed by K-FAC and EK-FAC)")

    def host_threads(self) -> int | None:
        """The framework's CPU thread count, which the core's NumPy linear algebra keeps to.

        ``None`` (the default): NumPy's BLAS is left as it is.
        """
        return None

    def layer_gaps(self) -> dict[str, str]:
        """Selected parameters that no layer of :meth:`layers` holds, each with why.

        For instance ``{"wte.weight": "tied: used by wte and lm_head"}``. The
        solvers that need layers quote it when they refuse; optional (default: none).
        """
        return {}

    def layer_statistics(
        self,
        inputs: Array,
        targets: Array,
        measurement: Callable[[Array, Array], Array] | None = None,
    ) -> dict[str, tuple[Array, Array]]:
        """Per layer of :meth:`layers`, from one forward and one backward pass (inference mode).

        Returns ``{layer.name: (a, g)}`` with ``a`` of shape ``(b, T, p_in)``,
        the layer's input at each position, and ``g`` of shape ``(b, T, p_out)``,
        ∂ℓ(z_i)/∂z at the layer's output z = a W + b (before any activation),
        for the per-sample loss ℓ at ``targets``, or, given ``measurement``
        (a native ``m(outputs, targets) -> (b,)`` as in
        :meth:`per_sample_measurement_grads`), for m instead of ℓ. Sample i's gradient is then
        Σ_t a_itᵀ g_it for the canonical kernel ``(p_in, p_out)`` and Σ_t g_it
        for the bias: the core builds gradients and Kronecker factors from
        these without a ``(b, d)`` matrix.
        """
        raise self._unsupported("layer_statistics (needed by K-FAC and EK-FAC)")

    def layer_statistics_deferred(
        self,
        inputs: Array,
        targets: Array,
        measurement: Callable[[Array, Array], Array] | None = None,
    ) -> dict[str, tuple[Array, Array]]:
        """:meth:`layer_statistics` with every ``"conv2d"`` layer's patches left unformed.

        A convolution's patches are kh·kw/stride² times its input, copied every
        batch. A first-order score against one test point needs only
        Σ_t ⟨a_t K, g_t⟩ for the layer's solved kernel K, which is the layer's
        own convolution of its input by K (:meth:`conv2d_map`): no patches. So
        a ``"conv2d"`` layer's first entry here is its input x as the backend
        keeps it (opaque to the core), which the core passes back to
        :meth:`conv2d_patches` or :meth:`conv2d_map`; g and every other layer
        are as in :meth:`layer_statistics`. Optional, with those two (torch,
        TensorFlow and JAX nnx have them): the default raises
        :class:`UnsupportedByBackendError` and the core forms the patches.
        """
        raise self._unsupported("layer_statistics_deferred")

    def conv2d_patches(self, layer: Layer, x: Array) -> Array:
        """(b, T, p_in): the patches of a ``"conv2d"`` layer's deferred input x, as
        :meth:`layer_statistics` gives them (canonical (kh, kw, in) order)."""
        raise self._unsupported("conv2d_patches")

    def conv2d_map(self, layer: Layer, x: Array, kernels: Array) -> Array:
        """(b, T, m): patches(x) @ ``kernels`` for canonical kernels (p_in, m), no bias.

        The layer's own convolution of its deferred input x with m output
        channels, never forming the patches (b·T·p_in·m multiply-adds).
        """
        raise self._unsupported("conv2d_map")

    def matmul_into(self, x1: Array, x2: Array, out: Array) -> Array:
        """x1 @ x2 written into ``out`` (the product's shape and dtype), and returned.

        For backends whose arrays are writeable (torch: ``torch.matmul(..., out=)``).
        The layer-wise solvers form a (b, p, o) block per layer and batch; written
        into one buffer reused over a pass (:class:`~influence_core.workspace.Workspace`)
        it does not take fresh pages from the operating system every batch. The
        default raises :class:`UnsupportedByBackendError`, and the core then
        uses ``xp.matmul``.
        """
        raise self._unsupported("matmul_into")

    def segment_sum(self, values: Array, segments: Array, count: int) -> Array:
        """Row r of the result is Σ of the rows i of ``values`` with ``segments[i] = r``.

        ``values`` is ``(m, k)``, ``segments`` an integer ``(m,)`` with entries
        in ``[0, count)``; returns ``(count, k)``, zero where no row lands. The
        embedding blocks need it (token counts, a sample's rows of W); the
        Array API has no scatter-add, so this default is a one-hot matrix
        product in chunks of rows (O(m · count · k)). Backends override it with
        their scatter (``index_add``, ``unsorted_segment_sum``,
        ``jax.ops.segment_sum``): O(m · k).
        """
        xp = self.xp
        m = int(values.shape[0])
        total = xp.zeros((count, int(values.shape[1])), dtype=values.dtype)
        rows = xp.arange(count, dtype=segments.dtype)
        chunk = max(1, _SEGMENT_ENTRIES // max(count, 1))
        for begin in range(0, m, chunk):
            part = segments[begin : begin + chunk]
            one_hot = xp.astype(rows[:, None] == part[None, :], values.dtype)  # (count, chunk)
            total = total + xp.matmul(one_hot, values[begin : begin + chunk, :])
        return total

    def per_sample_loss_jvp(self, inputs: Array, targets: Array, vectors: Array) -> Array:
        """⟨∇_θ ℓ(z_i), v_j⟩ for each sample i and column j of ``vectors`` (d, q): shape ``(b, q)``.

        The forward-mode derivative of the per-sample losses along each
        column, with no ``(b, d)`` gradient block (the reverse pass of
        :mod:`influence_core.unrolling` reads it once per training step).
        Optional: without it the core multiplies :meth:`per_sample_grads` by
        the vectors.
        """
        raise self._unsupported("per_sample_loss_jvp (forward-mode per-sample loss derivatives)")

    def per_sample_measurement_grads(
        self, inputs: Array, targets: Array, measurement: Callable[[Array, Array], Array]
    ) -> Array:
        """∇_θ m(Φ(x_i), y_i) for each sample: shape ``(b, d)``, row i for sample i.

        ``measurement(outputs, targets) -> (b,)`` is a function of the model's
        outputs (inference mode) written with native operations; each value
        depends only on its own sample, so it may be called on one sample at a
        time (``b = 1``) inside ``vmap`` / ``vectorized_map``. The same function
        object is passed on every call for one measurement: backends that trace
        may cache by it. Needed for test-side measurements other than the loss
        (:mod:`influence_core.measurements`) and by RepresenterPointLJE.
        """
        raise self._unsupported("per_sample_measurement_grads (needed by measurement=)")


def check_state(state: Any, backend: str = "the") -> Any:
    """``state`` (a :meth:`ModelKernels.save_state`) if it is flat, else a ``TypeError`` naming what is not.

    Flat: a mapping of string names to arrays, or a list or tuple of arrays;
    an array is anything with ``shape`` and ``dtype``. A nested dict would be
    fingerprinted by object address (a new fingerprint on every call), so it
    is refused here, once, for every backend.
    """
    if isinstance(state, dict) or hasattr(state, "keys"):
        items = [(key, state[key]) for key in state.keys()]
        bad_keys = [key for key, _ in items if not isinstance(key, str)]
        if bad_keys:
            raise TypeError(
                f"save_state() of the {backend} backend must map string names to arrays; keys "
                f"{bad_keys[:5]} are not strings"
            )
    elif isinstance(state, (list, tuple)):
        items = list(enumerate(state))
    else:
        raise TypeError(
            f"save_state() of the {backend} backend must return a flat name -> array mapping or a "
            f"list of arrays, got {type(state).__name__}"
        )
    for key, value in items:
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            raise TypeError(
                f"save_state() of the {backend} backend must be flat (every value an array), but "
                f"{key!r} holds a {type(value).__name__}: flatten nested state to names such as "
                "'layer/kernel'"
            )
    return state
