"""Keras' side of train-time capture: a callback that feeds ``influence_core.capture.CheckpointCapture``.

``model.fit(..., callbacks=[TracInCallback(capture)])`` tells the capture
after every training batch, with the learning rate that batch's step used
(read before the step, so a schedule's value is the step's own).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

__all__ = ["TracInCallback"]


class TracInCallback(keras.callbacks.Callback):
    """Calls ``capture.after_step(lr)`` after every batch of ``fit`` (Keras 3).

    Args:
        capture: an :class:`influence_core.capture.CheckpointCapture` over an
            ``InfluenceModel`` of the model being fitted.
    """

    def __init__(self, capture: Any) -> None:
        super().__init__()
        self.capture = capture
        self._rate = None

    def on_train_batch_begin(self, batch: int, logs: Any = None) -> None:
        self._rate = float(
            np.asarray(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        )

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.capture.after_step(self._rate)
