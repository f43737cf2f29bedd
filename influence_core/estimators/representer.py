"""What the representer-point methods share: features, targets and the score layout."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

from ..data import Batch
from ..measurements import logit
from ..model import InfluenceModel
from ..plugin.protocol import LastLayer
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

    The last layer is the backend's (``InfluenceModel.last_layer()``: the last
    ``nn.Linear`` in PyTorch, the last ``Dense`` in Keras) unless ``last_layer=``
    names it. A named layer works on every backend, with no backend support
    beyond gradients of the outputs: its canonical kernel is W, and the
    features are read off the gradient identity ∂Φ_0(x)/∂W[:, 0] = f(x) of a
    linear head (checked: Φ(x) must equal f(x) W + b, or the layer is not the
    model's last).
    """

    def __init__(
        self,
        model: InfluenceModel,
        *,
        target: Target = "label",
        last_layer: str | Sequence[str] | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, batch_size=batch_size)
        if target not in ("label", "prediction"):
            raise ValueError(f"target must be 'label' or 'prediction', got {target!r}")
        self.target = target
        self.last_layer = (
            last_layer if last_layer is None or isinstance(last_layer, str) else list(last_layer)
        )

    def get_params(self) -> dict[str, Any]:
        return {"target": self.target, "last_layer": self.last_layer, "batch_size": self.batch_size}

    def _fit(self, train_data: Any) -> None:
        if self.last_layer is None:
            self._named_head: InfluenceModel | None = None
            #: The model's last linear layer (:class:`~influence_core.plugin.LastLayer`).
            self.layer_ = self.model.last_layer()
            self._head_selector: str | list[str] = self.layer_.name
        else:
            self._named_head = self.model.with_parameters(self.last_layer)
            self.layer_ = named_linear_layer(self._named_head, self.last_layer)
            self._head_selector = self.last_layer

    def _batches(self, data: Any) -> Iterator[Batch]:
        return self.model.batches(data, self.batch_size)

    def _augmented_features(self, inputs: Array) -> Array:
        """f̃(x): the features, with a constant 1 appended when the layer has a bias."""
        xp = self.xp
        if self._named_head is None:
            features = self.model.kernels.penultimate_features(inputs)
        else:
            features = features_of_named_layer(self._named_head, self.layer_, inputs)
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


def named_linear_layer(head: InfluenceModel, selector: str | Sequence[str]) -> LastLayer:
    """The linear layer whose parameters ``head`` selects: W ``(p, c)`` canonical, and b."""
    layout = head.layout
    order = layout.canonical_order
    shapes = []
    for i in order:
        perm = layout.canonical_permutations[i]
        shape = layout.shapes[i]
        shapes.append(shape if perm is None else tuple(shape[a] for a in perm))
    if not (
        len(shapes) in (1, 2)
        and len(shapes[0]) == 2
        and (len(shapes) == 1 or shapes[1] == (shapes[0][1],))
    ):
        raise ValueError(
            f"last_layer={selector!r} selects parameters of canonical shapes {shapes}; a linear "
            "layer has a kernel (p, c) and optionally a bias (c,)"
        )
    xp = head.xp
    theta = head.to_canonical(head.get_parameters())
    p, c = shapes[0]
    weight = xp.reshape(theta[: p * c], (p, c))
    bias = theta[p * c :] if len(shapes) == 2 else None
    name = selector if isinstance(selector, str) else ", ".join(selector)
    return LastLayer(name, weight, bias)


def features_of_named_layer(head: InfluenceModel, layer: LastLayer, inputs: Array) -> Array:
    """f(x) for a linear last layer Φ = f W + b, as ∂Φ_0/∂W[:, 0], checked against Φ.

    One per-sample gradient of the output Φ_0 over the layer's own parameters;
    its canonical kernel block holds f(x) in column 0 (and zeros elsewhere).
    """
    xp = head.xp
    outputs = head.kernels.outputs(inputs)
    b = int(outputs.shape[0])
    batch = Batch(inputs, xp.zeros((b,), dtype=xp.int64), 0)
    # The measurement protocol differentiates the loss-like −Φ_0: negate it back.
    grads = -head.batch_per_sample_grads(batch, logit(0))
    canonical = xp.matrix_transpose(head.to_canonical(xp.matrix_transpose(grads)))
    p, c = (int(s) for s in layer.weight.shape)
    if tuple(int(s) for s in outputs.shape) != (b, c):
        raise ValueError(
            f"the model's outputs have shape {tuple(outputs.shape)} but last_layer="
            f"{layer.name!r} has {c} outputs: representer points need the model's last layer"
        )
    features = xp.reshape(canonical[:, : p * c], (b, p, c))[:, :, 0]
    linear = xp.matmul(features, layer.weight)
    if layer.bias is not None:
        linear = linear + layer.bias
    scale = float(xp.max(xp.abs(outputs))) + 1.0
    error = float(xp.max(xp.abs(linear - outputs)))
    if not error <= 1e-4 * scale:
        raise ValueError(
            f"the model's outputs are not f(x) W + b of last_layer={layer.name!r} (largest "
            f"difference {error:.3g}): representer points need that layer to be the model's "
            "last, with no activation after it (put softmax/sigmoid in the loss)"
        )
    return features
