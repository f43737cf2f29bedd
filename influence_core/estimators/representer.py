"""What the representer-point methods share: features, targets and the score layout."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from ..data import Batch
from ..model import InfluenceModel
from .base import Array, InfluenceCalculator

__all__ = ["RepresenterCalculator", "Target"]

Target = Literal["label", "prediction"]


class RepresenterCalculator(InfluenceCalculator):
    """Base of the representer-point methods: a model Φ(x) = f(x) W + b explained per output.

    A representer value says how much a training point pushes the test
    point's output Φ_k(x_t) up. k is the **target component**: the test
    point's label (``target="label"``, integer class targets) or the model's
    prediction (``target="prediction"``). For regression (floating targets)
    every output counts: the value is summed over outputs (for a scalar head,
    its only output). Positive (excitatory) means proponent, as everywhere in
    the library. (Representers explain an output by construction, so they take
    ``target=`` rather than a ``measurement=``.)
    """

    def __init__(
        self,
        model: InfluenceModel,
        *,
        target: Target = "label",
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, batch_size=batch_size)
        if target not in ("label", "prediction"):
            raise ValueError(f"target must be 'label' or 'prediction', got {target!r}")
        self.target = target

    def get_params(self) -> dict[str, Any]:
        return {"target": self.target, "batch_size": self.batch_size}

    def _fit(self, train_data: Any) -> None:
        #: The model's last linear layer (:class:`~influence_core.plugin.LastLayer`).
        self.layer_ = self.model.last_layer()

    def _batches(self, data: Any) -> Iterator[Batch]:
        return self.model.batches(data, self.batch_size)

    def _augmented_features(self, inputs: Array) -> Array:
        """f̃(x): the features, with a constant 1 appended when the layer has a bias."""
        xp = self.xp
        features = self.model.kernels.penultimate_features(inputs)
        if self.layer_.bias is None:
            return features
        ones = xp.ones((int(features.shape[0]), 1), dtype=features.dtype)
        return xp.concat([features, ones], axis=1)

    def _components(self, outputs: Array, targets: Array, target: Target) -> Array | None:
        """The target output index per sample, or ``None`` (regression: sum over outputs)."""
        xp = self.xp
        if target == "prediction" and int(outputs.shape[1]) > 1:
            return xp.argmax(outputs, axis=1)
        if xp.isdtype(targets.dtype, "integral"):
            return xp.reshape(targets, (-1,))
        return None

    def _select(self, per_output: Array, components: Array | None) -> Array:
        """Row-wise pick of column ``components[i]`` from (n, c), or the row sum."""
        xp = self.xp
        if components is None:
            return xp.sum(per_output, axis=1)
        index = xp.reshape(xp.astype(components, xp.int64), (-1, 1))
        return xp.reshape(xp.take_along_axis(per_output, index, axis=1), (-1,))
