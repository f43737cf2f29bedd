"""``ModelFactory``: how a worker builds the user's model, instead of receiving it.

A live framework model is never sent to a worker. A PyTorch module pickles
its class by reference and its tensors with their device; a Keras model is
not picklable at all, and a ``tf.function`` or a jitted JAX function holds
traced state bound to one process. What does travel is small and plain: a
function that builds the architecture (importable on the worker, or pickled
by value with cloudpickle), a function that builds the per-sample loss, and
the weights as NumPy (:meth:`InfluenceModel.weights_as_numpy`) or as a
checkpoint path every worker can read. Each worker builds the model once per
factory and keeps it for every task it runs.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..io import weights_fingerprint
from ..model import DEFAULT_BATCH_SIZE, DEFAULT_GRADIENT_MEMORY, InfluenceModel
from ..pass_order import DEFAULT_MAX_SAMPLES

__all__ = ["ModelFactory"]


@dataclass(frozen=True, eq=False)
class ModelFactory:
    """A picklable recipe for an :class:`~influence_core.InfluenceModel`: built where it is called.

    Args:
        build: ``build() -> model``, the framework model (a ``torch.nn.Module``,
            a Keras model, a ``flax.nnx`` module or ``Functional``); its weights
            are then replaced by ``weights``.
        loss: ``loss() -> loss_fn``, the per-sample loss (e.g.
            ``functools.partial(torch.nn.CrossEntropyLoss, reduction="none")``).
        weights: the model's weights: NumPy (from ``weights_as_numpy()``), or
            a checkpoint file path every worker can read (``torch.save`` state
            dict, Keras ``.weights.h5``, JAX ``.npz``). ``None`` keeps what
            ``build`` made, which must then be deterministic.
        parameters, backend, batch_size, check_finite, gradient_memory, max_samples,
        options: as for
            :class:`~influence_core.InfluenceModel`.

    Calling the factory builds a new model. Workers call :meth:`cached`, which
    builds it once per process and checks its weights against
    ``weights_fingerprint`` when the driver recorded one (a factory that
    does not reproduce the driver's weights is refused, not silently used).
    """

    build: Callable[[], Any]
    loss: Callable[[], Any]
    weights: Any = None
    parameters: str | Sequence[str] | None = None
    backend: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    check_finite: bool = True
    gradient_memory: int | None = DEFAULT_GRADIENT_MEMORY
    max_samples: int | None = DEFAULT_MAX_SAMPLES
    options: Mapping[str, Any] | None = None
    token: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def from_model(
        cls, model: InfluenceModel, build: Callable[[], Any], loss: Callable[[], Any]
    ) -> ModelFactory:
        """A factory for ``model`` as it is now: its settings, and its weights as NumPy."""
        return cls(
            build=build,
            loss=loss,
            weights=model.weights_as_numpy(),
            parameters=list(model.parameter_names),
            backend=model.backend,
            batch_size=model.batch_size,
            check_finite=model.check_finite,
            gradient_memory=model.gradient_memory,
            max_samples=model.max_samples,
            options=dict(model.options) or None,
        )

    def __call__(self) -> InfluenceModel:
        """A new :class:`~influence_core.InfluenceModel`, at ``weights``."""
        model = InfluenceModel(
            self.build(),
            self.loss(),
            parameters=self.parameters,
            backend=self.backend,
            batch_size=self.batch_size,
            check_finite=self.check_finite,
            gradient_memory=self.gradient_memory,
            max_samples=self.max_samples,
            options=self.options,
        )
        if self.weights is not None:
            model.load_weights(self.weights)
        return model

    def cached(self, expected_fingerprint: str | None = None) -> InfluenceModel:
        """This thread's model of this factory (built on first use), at the driver's weights.

        One per worker thread: calculators write checkpoints into in-place
        models (TracIn), so two threads never share one.
        """
        models = _models()
        model = models.get(self.token)
        if model is None:
            model = self()
            found = weights_fingerprint(model)
            if expected_fingerprint is not None and found is not None:
                if found != expected_fingerprint:
                    from ..errors import FingerprintMismatchError

                    raise FingerprintMismatchError(
                        "the model this worker built from the ModelFactory has other weights "
                        "than the driver's (weights fingerprint mismatch). Pass the weights: "
                        "ModelFactory(..., weights=model.weights_as_numpy()), or a checkpoint "
                        "path every worker reads; a build() that initialises at random "
                        "differs in every process"
                    )
            models.clear()  # one factory's model per worker thread at a time
            models[self.token] = model
        return model


_LOCAL = threading.local()


def _models() -> dict[str, InfluenceModel]:
    """The models this thread built, by factory token."""
    if not hasattr(_LOCAL, "models"):
        _LOCAL.models = {}
    return _LOCAL.models
