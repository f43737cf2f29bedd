"""What a test point's score explains: its loss (the default), a logit, a probability, a margin.

Influence asks "how does this training point change f(z_test)?" and f need not
be the loss. kronfluence calls it the *measurement* (``Task.compute_measurement``),
TRAK uses the margin. Every calculator takes ``measurement=``:

* ``"loss"`` (default): ℓ(z_test), the model's own per-sample loss;
* ``"logit"`` / :func:`logit`: Φ_k(x), the output of the target's class k
  (or of a fixed class);
* ``"probability"`` / :func:`probability`: softmax(Φ(x))_k;
* ``"margin"`` / :func:`margin`: Φ_y(x) − log Σ_{k≠y} exp Φ_k(x), TRAK's
  multi-class margin (Park et al. 2023), log p/(1 − p) of the true class;
* a :class:`Measurement` of your own, or any callable
  ``f(outputs, targets) -> (b,)`` written with the framework's own operations
  (or the namespace): one value per sample, each depending on its own sample.

**One sign convention.** A positive score means a proponent: for the loss,
training on z_train *lowers* ℓ(z_test); for every other measurement it
*raises* f(z_test) (a proponent of the logit pushes the logit up). The core
implements this by differentiating the loss-like m(z) = −f(z) for measurements
that a proponent raises, so every estimator's formula stays the loss formula
with ∇m in place of ∇ℓ on the test side. Training points are always seen
through their training loss.

A measurement reaches the backend through one protocol method,
:meth:`~influence_core.plugin.ModelKernels.per_sample_measurement_grads`,
so every estimator gets it at once and no estimator knows which it scores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import MeasurementError

__all__ = ["LOSS", "Measurement", "logit", "margin", "probability", "resolve_measurement"]

Array = Any
#: ``function(xp, outputs, targets) -> (b,)``, written once with the namespace.
MeasurementFunction = Callable[[Any, Array, Array], Array]


@dataclass(frozen=True, eq=False)
class Measurement:
    """A per-sample function of the model's outputs (and targets) to explain.

    Args:
        name: how results and metadata call it.
        function: ``function(xp, outputs, targets) -> (b,)``; ``xp`` is the
            model's array namespace, ``outputs`` the model's outputs (b, c).
        proponents_raise: ``True`` when a proponent raises the value (a logit, a
            margin); ``False`` when it lowers it (a loss-like quantity).
    """

    name: str
    function: MeasurementFunction | None
    proponents_raise: bool = True
    _bound: dict[int, Callable[[Array, Array], Array]] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def is_loss(self) -> bool:
        """Whether this is the model's own training loss (no output function needed)."""
        return self.function is None

    def loss_like(self, xp: Any) -> Callable[[Array, Array], Array]:
        """``m(outputs, targets) -> (b,)``, the function whose gradient is taken (−f if raised).

        Bound once per namespace, so a backend that caches traced graphs by
        function (TensorFlow) traces it once.
        """
        if self.function is None:
            raise TypeError("the loss measurement is the model's own loss_fn")
        key = id(xp)
        if key not in self._bound:
            function, sign = self.function, -1.0 if self.proponents_raise else 1.0

            def loss_like(outputs: Array, targets: Array) -> Array:
                return sign * function(xp, outputs, targets)

            self._bound[key] = loss_like
        return self._bound[key]

    def describe(self) -> str:
        return self.name


#: The model's own per-sample loss: the default measurement.
LOSS = Measurement("loss", None, proponents_raise=False)


def _class_index(xp: Any, outputs: Array, targets: Array, index: int | None) -> Array:
    """(b, 1) int64 column indices: the fixed ``index``, or each sample's integer target."""
    if index is not None:
        return xp.astype(xp.full((int(outputs.shape[0]), 1), int(index)), xp.int64)
    return xp.reshape(xp.astype(targets, xp.int64), (-1, 1))


def _pick(xp: Any, values: Array, index: Array) -> Array:
    return xp.reshape(xp.take_along_axis(values, index, axis=1), (-1,))


def logit(index: int | None = None) -> Measurement:
    """Φ_k(x): the output of class ``index``, or of each test point's integer label."""

    def function(xp: Any, outputs: Array, targets: Array) -> Array:
        return _pick(xp, outputs, _class_index(xp, outputs, targets, index))

    return Measurement("logit" if index is None else f"logit[{index}]", function)


def _classifier_outputs(outputs: Array, what: str) -> int:
    """c, the number of classes, after refusing a model with fewer than two outputs."""
    c = int(outputs.shape[1]) if len(outputs.shape) == 2 else 0
    if c < 2:
        raise MeasurementError(
            f"the {what} needs a classifier's outputs, c ≥ 2 classes per sample, but the model "
            f"returns {c if c else tuple(outputs.shape[1:])} per sample: with one output a softmax is constant "
            "and its gradients are zero or NaN. For a regression model (or one logit of a "
            "binary classifier) use measurement='loss' (the default) or "
            "measurement=influence_core.measurements.logit(0); TRAK takes them too, with "
            "weighting=None."
        )
    return c


def _log_softmax(xp: Any, outputs: Array) -> Array:
    shifted = outputs - xp.max(outputs, axis=1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))


def probability(index: int | None = None) -> Measurement:
    """softmax(Φ(x))_k for class ``index``, or each test point's integer label."""

    def function(xp: Any, outputs: Array, targets: Array) -> Array:
        _classifier_outputs(outputs, "probability")
        return xp.exp(
            _pick(xp, _log_softmax(xp, outputs), _class_index(xp, outputs, targets, index))
        )

    return Measurement("probability" if index is None else f"probability[{index}]", function)


def margin() -> Measurement:
    """Φ_y(x) − log Σ_{k≠y} exp Φ_k(x), the multi-class margin of TRAK (Park et al. 2023).

    It equals log(p_y / (1 − p_y)) for p = softmax(Φ): large when the true class
    wins by a wide margin. Computed stably (the maximum is shifted out).
    """

    def function(xp: Any, outputs: Array, targets: Array) -> Array:
        c = _classifier_outputs(outputs, "margin")
        labels = xp.reshape(xp.astype(targets, xp.int64), (-1, 1))
        one_hot = xp.astype(
            labels == xp.reshape(xp.arange(c, dtype=xp.int64), (1, c)), outputs.dtype
        )
        correct = xp.sum(outputs * one_hot, axis=1)
        top = xp.max(outputs, axis=1, keepdims=True)
        others = xp.sum(xp.exp(outputs - top) * (1.0 - one_hot), axis=1)
        return correct - (xp.log(others) + xp.reshape(top, (-1,)))

    return Measurement("margin", function)


_NAMED: dict[str, Callable[[], Measurement]] = {
    "loss": lambda: LOSS,
    "logit": logit,
    "probability": probability,
    "margin": margin,
}


def resolve_measurement(
    measurement: str | Measurement | Callable[..., Array] | None,
) -> Measurement:
    """A :class:`Measurement` from a name, a measurement, or a native ``f(outputs, targets)``."""
    if measurement is None:
        return LOSS
    if isinstance(measurement, Measurement):
        return measurement
    if isinstance(measurement, str):
        try:
            return _NAMED[measurement]()
        except KeyError:
            raise ValueError(
                f"unknown measurement {measurement!r}; use one of {sorted(_NAMED)}, a "
                "Measurement, or a callable f(outputs, targets) -> one value per sample"
            ) from None
    if callable(measurement):
        user = measurement
        name = getattr(user, "__name__", type(user).__name__)
        return Measurement(name, lambda xp, outputs, targets: user(outputs, targets))
    raise TypeError(
        f"measurement must be a name, a Measurement or a callable, got {type(measurement).__name__}"
    )
