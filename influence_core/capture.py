"""Train-time capture: record what TracIn needs while the user's own loop trains.

TracIn (Pruthi et al., 2020) sums, over checkpoints θ_k of a run, η_k times
the dot product of a training point's and a test point's gradients. Its
inputs are the checkpoints and their learning rates, which only the training
loop sees. :class:`CheckpointCapture` is told after each optimizer step (and
the learning rate used), keeps the weights every ``every`` steps as host
(NumPy) copies in the backend's checkpoint form
(:meth:`~influence_core.InfluenceModel.weights_as_numpy`), and builds the
:class:`~influence_core.TracIn` calculator over them; nothing is recomputed
after training.

In a PyTorch or JAX loop (JAX with an immutable model: pass the new state)::

    capture = CheckpointCapture(model, every=steps_per_epoch)
    for step in range(steps):
        ...                          # forward, backward, optimizer step
        capture.after_step(lr)       # JAX: capture.after_step(lr, state=new_state)
    tracin = capture.tracin().fit(train)

In Keras (``from influence_tensorflow.capture import TracInCallback``),
``model.fit(..., callbacks=[TracInCallback(capture)])``
calls it after every batch with the optimizer's current learning rate.

The same capture feeds approximate unrolling (SOURCE): ``capture.approximate_unrolling()``
makes each kept checkpoint a segment of the steps since the one before.

Cost: a host copy of the weights every ``every`` steps, and their memory
(one copy of the weights per kept checkpoint).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .estimators.tracin import TracIn
from .model import InfluenceModel
from .tree import tree_map
from .unrolling.segments import ApproximateUnrolling

__all__ = ["CheckpointCapture"]


class CheckpointCapture:
    """The weights every ``every`` optimizer steps and the learning rate of each, for TracIn.

    Args:
        model: the :class:`~influence_core.InfluenceModel` over the model being
            trained (an in-place model is read as it trains).
        every: keep the weights after every ``every``-th step (1: every step).
    """

    def __init__(self, model: InfluenceModel, every: int = 1) -> None:
        if not isinstance(model, InfluenceModel):
            raise TypeError(
                f"CheckpointCapture takes an InfluenceModel, got {type(model).__name__}"
            )
        if every < 1:
            raise ValueError(f"every must be ≥ 1, got {every}")
        self.model, self.every = model, every
        self.steps = 0
        self.checkpoints: list[Any] = []
        self.learning_rates: list[float] = []
        self.at_steps: list[int] = []

    def after_step(self, lr: float, state: Any = None) -> None:
        """Count one optimizer step taken with learning rate ``lr``; keep the weights if it is due.

        ``state``: the weights after the step, in the form the model's
        :meth:`~influence_core.InfluenceModel.checkpoint_loaded` takes (a
        functional JAX model's new state); by default the model's own.
        """
        lr = float(lr)
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"the learning rate must be a finite number > 0, got {lr!r}")
        self.steps += 1
        if self.steps % self.every:
            return
        if state is None:
            kept = self.model.weights_as_numpy()
        else:
            kept = tree_map(lambda leaf: np.array(self.model.to_numpy(leaf)), state)  # a copy
        self.checkpoints.append(kept)
        self.learning_rates.append(lr)
        self.at_steps.append(self.steps)

    def tracin(self, **options: Any) -> TracIn:
        """:class:`~influence_core.TracIn` over the kept checkpoints and their rates (unfitted).

        ``options`` go to TracIn (``projection_dim``, ``measurement``, …). A
        checkpoint's rate is the one of the step it was kept after: with
        ``every`` > 1 it stands for the ``every`` steps before it, as in the
        TracIn paper's checkpoint approximation.
        """
        if not self.checkpoints:
            raise ValueError(
                f"no checkpoint kept yet: {self.steps} step(s) recorded, one is kept every "
                f"{self.every}; call after_step(lr) after each optimizer step"
            )
        return TracIn(self.model, self.checkpoints, self.learning_rates, **options)

    def approximate_unrolling(self, **options: Any) -> ApproximateUnrolling:
        """SOURCE over the kept checkpoints (unfitted): each one a segment of the steps since
        the previous, at its rate (:class:`~influence_core.unrolling.ApproximateUnrolling`).

        ``options`` go to it (``solver``, ``measurement``, ``batch_size``). For momentum
        SGD, divide the rates by (1 − β) first (SOURCE's effective rate); this records
        the optimizer's own.
        """
        if not self.checkpoints:
            raise ValueError(
                f"no checkpoint kept yet: {self.steps} step(s) recorded, one is kept every "
                f"{self.every}; call after_step(lr) after each optimizer step"
            )
        steps = [b - a for a, b in zip([0, *self.at_steps[:-1]], self.at_steps, strict=True)]
        return ApproximateUnrolling(
            self.model, self.checkpoints, self.learning_rates, steps, **options
        )
