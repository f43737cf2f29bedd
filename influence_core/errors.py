"""Exceptions raised by influence_core.

Every error says what went wrong *and* what to do about it. They subclass the
built-in exception a user would expect (``ValueError``, ``TypeError``,
``LookupError``), so generic handlers keep working.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = [
    "AmbiguousBackendError",
    "BackendNotFoundError",
    "ChunkRecomputedWarning",
    "ConvergenceWarning",
    "CostLimitError",
    "DataConsumedError",
    "DataOrderError",
    "DatasetFormatError",
    "DuplicateBackendError",
    "EmptyDataError",
    "EndlessDataError",
    "FingerprintMismatchError",
    "FrozenParameterError",
    "InvalidBackendSpecError",
    "InvalidSampleError",
    "LissaDivergenceError",
    "MeasurementError",
    "ModelOutputError",
    "NonFiniteGradientError",
    "NotFittedError",
    "NotPositiveDefiniteError",
    "PerSampleLossError",
    "PluginLoadWarning",
    "PrecisionWarning",
    "ResultFileError",
    "RunLockedError",
    "UnknownParameterError",
]


def _listed(items: Sequence[object], limit: int = 20) -> str:
    """The first ``limit`` items as a list, and how many more there are."""
    more = len(items) - limit
    return f"{list(items[:limit])}" + (f" (+{more} more)" if more > 0 else "")


class BackendNotFoundError(LookupError):
    """No installed backend handles the given model, array or name."""


class AmbiguousBackendError(LookupError):
    """Two installed backends claim the same model or array type; which one is meant is not guessed."""

    def __init__(self, what: str, specs: Sequence[object]):
        self.backends = tuple(getattr(spec, "name", str(spec)) for spec in specs)
        claims = ", ".join(
            f"{getattr(spec, 'name', spec)!r} (from {getattr(spec, 'distribution', '?')!r})"
            for spec in specs
        )
        super().__init__(
            f"{what} is claimed by more than one installed backend: {claims}. Pass "
            f"backend={self.backends[0]!r} (or another) to InfluenceModel, or uninstall the plugin "
            "you do not mean to use; influence_core never picks one silently."
        )


class DuplicateBackendError(RuntimeError):
    """Two plugins registered a backend under the same name."""


class InvalidBackendSpecError(ValueError):
    """A plugin returned a malformed :class:`~influence_core.plugin.BackendSpec`."""


class NotFittedError(RuntimeError):
    """A solver or calculator was used before ``fit`` (configure, then fit, then use)."""

    def __init__(self, obj: object, what: str = "") -> None:
        name = type(obj).__name__
        super().__init__(
            f"this {name} is not fitted yet{': ' + what if what else ''}. Call "
            f"{name}(...).fit(...) first; it returns the fitted object."
        )


class PluginLoadWarning(UserWarning):
    """A backend plugin failed to import or to answer its hook; it was skipped."""


class PrecisionWarning(UserWarning):
    """The loss is computed in a lower precision than the parameters."""


class PerSampleLossError(ValueError):
    """The loss function does not return one value per sample."""


class UnknownParameterError(LookupError):
    """A requested layer or parameter name does not exist in the model."""

    def __init__(self, unknown: Sequence[str], layers: Sequence[str], parameters: Sequence[str]):
        self.unknown = tuple(unknown)
        self.layers = tuple(layers)
        self.parameters = tuple(parameters)
        super().__init__(
            f"unknown layer or parameter name(s) {list(self.unknown)}. "
            f"Layers in this model: {list(self.layers)}. "
            f"Trainable parameters: {list(self.parameters)}. "
            "Pass layer names or parameter names from these lists."
        )


class FrozenParameterError(UnknownParameterError):
    """A requested layer or parameter exists but is frozen (not trainable), so it is not in θ."""

    def __init__(
        self,
        frozen: Sequence[str],
        layers: Sequence[str],
        parameters: Sequence[str],
        how: str = "requires_grad=False / trainable=False",
    ):
        LookupError.__init__(
            self,
            f"{list(frozen)} {'is' if len(frozen) == 1 else 'are'} frozen ({how}): influence is "
            "computed over trainable parameters only. Unfreeze it before wrapping the model "
            "(PyTorch: parameter.requires_grad_(True); Keras: layer.trainable = True), or "
            f"select trainable ones: layers {list(layers)}, parameters {list(parameters)}.",
        )
        self.unknown = tuple(frozen)
        self.layers = tuple(layers)
        self.parameters = tuple(parameters)


class NonFiniteGradientError(FloatingPointError):
    """A gradient or Hessian-vector product contains NaN or infinity."""

    def __init__(
        self,
        what: str,
        sample_indices: Sequence[int],
        *,
        outputs: bool = False,
        parameters: Sequence[str] = (),
    ):
        self.sample_indices = tuple(int(i) for i in sample_indices)
        #: The model's weights that hold NaN/inf themselves (checked before blaming the data).
        self.parameters = tuple(parameters)
        if self.parameters:
            super().__init__(
                f"non-finite {what}: the model's weights {_listed(self.parameters, 10)} hold NaN or infinity "
                "themselves, so every sample's gradient is non-finite; the data is not to blame. "
                "Load finite weights (an earlier checkpoint, or train with a lower learning rate "
                "or gradient clipping)."
            )
            return
        if outputs:
            super().__init__(
                f"non-finite {what}: the model's outputs for the sample(s) at index "
                f"{_listed(self.sample_indices)} "
                "of the data passed in are NaN or infinite. Check those inputs for NaN/inf."
            )
            return
        if not self.sample_indices:
            super().__init__(
                f"non-finite {what}, although every sample's gradient is finite: the second "
                "derivatives overflow. Check the loss for points of infinite curvature, or "
                "use float64."
            )
            return
        super().__init__(
            f"non-finite {what}: the gradients of the sample(s) at index "
            f"{_listed(self.sample_indices)} of the "
            "data passed in are NaN or infinite. Check those inputs and targets for NaN/inf, "
            "and the loss for log(0) or division by zero (e.g. use logits with a from_logits loss)."
        )


#: What to try besides more damping when a Hessian is indefinite (a non-convex model).
HESSIAN_ALTERNATIVES = (
    "or use curvature='ggn' (the Gauss-Newton matrix, positive semi-definite for a convex loss "
    "of the outputs such as cross-entropy or squared error), or a factored solver (EKFACIHVP, "
    "KFACIHVP: positive definite by construction), or restrict influence to layers where the "
    "loss is convex (e.g. the last layer)"
)


class NotPositiveDefiniteError(ValueError):
    """The damped Hessian H + λI is not positive definite.

    ``smallest_eigenvalue`` is that of the *undamped* matrix (or, from CG, its
    Rayleigh quotient along a search direction: an upper bound on it), so the
    damping that makes H + λI positive definite is any λ above its negation.
    The suggested damping is always above the one in use (at least twice the
    bound, rounded up), and a NaN curvature is reported as such, never with a
    NaN damping.
    """

    def __init__(
        self,
        smallest_eigenvalue: float,
        damping: float,
        how: str = "smallest eigenvalue",
        *,
        matrix: str = "Hessian H",
        advice: str = HESSIAN_ALTERNATIVES,
        scale: float = 0.0,
    ):
        self.smallest_eigenvalue = float(smallest_eigenvalue)
        self.damping = float(damping)
        if not math.isfinite(self.smallest_eigenvalue):
            super().__init__(
                f"the damped {matrix} + {damping:g} I has a non-finite {how} "
                f"({self.smallest_eigenvalue}): the curvature holds NaN or infinity, which no "
                "damping mends. Non-finite data or weights reached it; with check_finite=True "
                "(the default) the error names the samples or weights."
            )
            return
        needed = max(-self.smallest_eigenvalue, 0.0)
        suggestion = _round_up(max(2.0 * needed, 1e-8, 1e-6 * scale, 2.0 * self.damping))
        damped = self.smallest_eigenvalue + self.damping
        super().__init__(
            f"the damped {matrix} + {damping:g} I is not positive definite: its {how} is "
            f"{damped:.3e} (of {matrix} alone, {self.smallest_eigenvalue:.3e}). Raise the "
            f"damping above {needed:.3g} (e.g. damping={suggestion:.2g}); {advice}."
        )


def format_above(value: float, bound: float) -> str:
    """``value`` with the fewest significant digits (at least 3) that still print above ``bound``.

    ``f"{0.1017:.2g}"`` prints 0.1, which reads as not above ``tol=0.1``.
    """
    for digits in range(3, 18):
        text = f"{value:.{digits}g}"
        if float(text) > bound:
            return text
    return repr(value)


def _round_up(value: float) -> float:
    """``value`` rounded *up* to two significant digits (so printing it never shows less)."""
    exponent = math.floor(math.log10(value)) - 1
    return math.ceil(value / 10.0**exponent) * 10.0**exponent


class ModelOutputError(TypeError):
    """The model returns several outputs (a tuple, a dict, a ``ModelOutput``) and which one the loss reads is not said."""


class MeasurementError(ValueError):
    """A test-side measurement does not fit the model's outputs (a margin of a one-output model)."""


class CostLimitError(ValueError):
    """A request would cost far more than its result is worth with this solver; refused up front.

    Raised before any work, with the estimate and the cheaper routes (a
    factored solver), e.g. self-influence through an iterative solver, which
    solves one block per training batch: O(n_train × n_fit) HVPs.
    """


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped before reaching its tolerance."""


class LissaDivergenceError(FloatingPointError):
    """LiSSA's recursion diverged: its scale is below a (mini-batch) Hessian's largest eigenvalue."""

    def __init__(
        self,
        scale: float,
        largest_eigenvalue: float,
        iteration: int,
        largest_batch_eigenvalue: float | None = None,
    ):
        self.scale = float(scale)
        self.largest_eigenvalue = float(largest_eigenvalue)
        self.largest_batch_eigenvalue = (
            None if largest_batch_eigenvalue is None else float(largest_batch_eigenvalue)
        )
        needed = max(self.largest_eigenvalue, self.largest_batch_eigenvalue or 0.0)
        suggestion = 2.0 * needed
        if self.largest_batch_eigenvalue is not None and self.scale > self.largest_eigenvalue:
            reason = (
                f"every step's damped mini-batch Hessian must have eigenvalues below the scale; "
                f"the whole data's largest is {self.largest_eigenvalue:.3e} (below the scale), "
                f"but a mini-batch's reaches {self.largest_batch_eigenvalue:.3e}"
            )
        else:
            reason = (
                "the scale must exceed the largest eigenvalue of the damped Hessian, estimated "
                f"at {needed:.3e}"
            )
        super().__init__(
            f"LiSSA diverged at iteration {iteration} with scale={scale:g}: {reason}. Use "
            f"scale={suggestion:.3g} or more (a larger scale needs more depth), or larger "
            "mini-batches (batch_size=)."
        )


class DatasetFormatError(TypeError):
    """A dataset element is not an ``(inputs, targets)`` pair."""


class EmptyDataError(ValueError):
    """The data passed in holds no samples."""


class DataConsumedError(EmptyDataError):
    """A one-shot iterator (a generator) was passed again after an earlier pass read from it."""

    def __init__(self, kind: str):
        super().__init__(
            f"this data is a one-shot iterator ({kind}) that an earlier pass already read from "
            "(fit reads the training data, and scoring reads it again). Pass data that can be "
            "read more than once: (X, y) arrays, a list of (inputs, targets) batches, a torch "
            "DataLoader, a tf.data.Dataset, or an object whose __iter__ starts your generator "
            "afresh (class Batches: def __iter__(self): return make_batches())."
        )


class DataOrderError(ValueError):
    """Two passes over the same data gave different samples at the same position.

    Scores are numbered by position in the data, and most estimators read the
    training data several times, so a shuffling loader (or random augmentation)
    would silently misalign them; this is raised instead.
    """


class EndlessDataError(ValueError):
    """The data never ends (``.repeat()``, ``itertools.cycle``): a pass over it cannot finish."""


class InvalidSampleError(ValueError):
    """The model or its loss fails on particular samples (e.g. labels outside the classes)."""

    def __init__(self, sample_indices: Sequence[int], cause: BaseException):
        self.sample_indices = tuple(int(i) for i in sample_indices)
        text = " ".join(str(cause).split())
        text = text if len(text) <= 300 else text[:300] + " …"
        super().__init__(
            f"the model or its loss fails on the sample(s) at index {_listed(self.sample_indices)} "
            "of the data "
            f"passed in ({type(cause).__name__}: {text}). Check those samples' targets (a label "
            "outside the model's classes?) and inputs (shape, dtype)."
        )


class RunLockedError(RuntimeError):
    """Another live process is writing the same resumable run directory."""


class ChunkRecomputedWarning(UserWarning):
    """A saved chunk of a resumable run was damaged or inconsistent and is computed again."""


class ResultFileError(ValueError):
    """A saved result is missing, corrupted, or not a result of this library."""


class FingerprintMismatchError(ValueError):
    """A saved result (or a run being resumed) belongs to other parameters or data."""
