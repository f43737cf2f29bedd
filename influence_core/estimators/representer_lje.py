"""Representer points from a local Jacobian expansion (Sui, Wu, Sanner 2021)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..data import Batch
from ..ihvp import ExactIHVP, InverseHessianVectorProduct
from ..measurements import Measurement, logit
from ..model import InfluenceModel
from .base import Array
from .representer import RepresenterCalculator, Target

__all__ = ["RepresenterPointLJE"]

#: Σ_k Φ_k(x): what a regression head's representer values explain.
_OUTPUT_SUM = Measurement("sum of outputs", lambda xp, outputs, targets: xp.sum(outputs, axis=1))


class RepresenterPointLJE(RepresenterCalculator):
    """Representer points via local Jacobian expansion: no retraining of the last layer.

    Let θ = (W, b) be the last linear layer, Φ(x; θ) = f(x) W + b, and
    L(θ) = (1/n) Σ_i ℓ(z_i; θ). Following Sui, Wu and Sanner ("Representer
    Point Selection via Local Jacobian Expansion for Post-hoc Classifier
    Explanation of Deep Neural Networks and Ensemble Models", NeurIPS 2021):

    1. perturb the trained layer by one gradient-ascent step,
       θ* = θ̂ + η ∇L(θ̂), so the expansion point is not a stationary point;
    2. expand the gradient around θ* to first order: one Newton step back,
       θ_N = θ* − H*⁻¹ ∇L(θ*), with H* = ∇²L(θ*) + λI, lands at θ̂ up to
       O(‖θ* − θ̂‖²) (exactly, for a quadratic loss);
    3. Φ is linear in θ, so Φ(x_t; θ_N) splits into one term per training point::

           r_i(x_t) = (1/n) [ Φ_k(x_t; θ*) − ∇_θΦ_k(x_t; θ*)ᵀ H*⁻¹ ∇_θ ℓ(z_i; θ*) ]
           Σ_i r_i(x_t) = Φ_k(x_t; θ_N) ≈ Φ_k(x_t; θ̂)

    r_i(x_t) is the representer value of z_i for output k (the target
    component, see :class:`RepresenterCalculator`): positive pushes Φ_k(x_t)
    up, a proponent. Its second term is the first-order influence of z_i on
    the output Φ_k(x_t) (at θ*); the first is the same for every i.

    The paper writes r_i as α_i (f_iᵀ f_t) by dividing θ* by the features
    element-wise (and Influenciae adds an ε to avoid dividing by zero); the
    form above is the same sum without that division, exact where features
    vanish. :meth:`decompose` returns Σ_i r_i(x_t) for the identity check.

    Args:
        model: the :class:`~influence_core.InfluenceModel`; only its last layer
            is used (selected by name from the backend).
        ihvp: the solver for H* (default ``ExactIHVP()``); :meth:`fit` fits it
            on the last layer at θ*.
        step: η, the ascent step on the mean training loss.
        target: ``"label"`` or ``"prediction"``.
        last_layer: the name of the model's last linear layer (a parameter
            selector); by default the backend finds it (see
            :class:`~influence_core.estimators.representer.RepresenterCalculator`).
        batch_size: batch size for ``(X, y)`` arrays.
    """

    def __init__(
        self,
        model: InfluenceModel,
        ihvp: InverseHessianVectorProduct | None = None,
        *,
        step: float = 1e-2,
        target: Target = "label",
        last_layer: str | Sequence[str] | None = None,
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, target=target, last_layer=last_layer, batch_size=batch_size)
        self.ihvp = ihvp if ihvp is not None else ExactIHVP()
        if not np.isfinite(step):
            raise ValueError(f"step must be a finite number, got {step}")
        self.step = float(step)
        self._logit = logit()

    def get_params(self) -> dict[str, Any]:
        return {
            **super().get_params(),
            "step": self.step,
            "ihvp": {"class": type(self.ihvp).__name__, **self.ihvp.get_params()},
        }

    def _fit(self, train_data: Any) -> None:
        super()._fit(train_data)
        #: The model with θ = the last layer.
        self.head_ = self.model.with_parameters(self._head_selector)
        self.n_train_ = self.head_.count(train_data, self.batch_size)
        trained = self.head_.get_parameters()
        #: θ*, the perturbed last layer the expansion is taken at.
        self.expansion_point_ = trained + self.step * self.head_.loss_grad(
            train_data, self.batch_size
        )
        with self._at_expansion_point():
            self.ihvp.fitted_for(self.head_, train_data)

    def _at_expansion_point(self) -> Any:
        return self.head_.parameters_set_to(self.expansion_point_)

    # -- the test side ------------------------------------------------------------------
    def _test_side(self, test_data: Any) -> tuple[Array, Array]:
        """(Φ_k(x_t; θ*) shape (n_test,), S = H*⁻¹ ∇Φ_kᵀ shape (d, n_test)); call at θ*."""
        xp = self.xp
        values, gradients = [], []
        for b in self.head_.batches(test_data, self.batch_size):
            outputs = self.head_.kernels.outputs(b.inputs)
            components = self._components(outputs, b.targets, self.target)
            values.append(self._select(outputs, components))
            gradients.append(self._output_gradients(b, components))
        return self._stack(values), self.ihvp.solve(xp.matrix_transpose(self._stack(gradients)))

    def _output_gradients(self, batch: Batch, components: Array | None) -> Array:
        """∇_θ Φ_k per sample (b, d); for regression the gradient of the sum over outputs."""
        if components is None:
            measured, measurement = batch, _OUTPUT_SUM
        else:
            measured, measurement = Batch(batch.inputs, components, batch.start), self._logit
        # The measurement protocol differentiates the loss-like −Φ_k: negate it back.
        return -self.head_.batch_per_sample_grads(measured, measurement)

    # -- results ------------------------------------------------------------------------
    def prepare_test(self, test_data: Any) -> tuple[Array, Array]:
        """(Φ_k(x_t; θ*), H*⁻¹ ∇Φ_k(x_t; θ*)ᵀ) for every test point."""
        self._check_fitted()
        with self._at_expansion_point():
            return self._test_side(test_data)

    def _scores_from_prepared(self, prepared: Any, train_data: Any) -> Iterator[tuple[int, Array]]:
        xp = self.xp
        values, solved = prepared
        with self._at_expansion_point():
            constant = xp.reshape(values, (-1, 1))
            for batch, g in self.head_.iter_per_sample_grads(train_data, self.batch_size):
                second = xp.matrix_transpose(xp.matmul(g, solved))  # (n_test, b)
                yield batch.start, (constant - second) / self.n_train_

    def decompose(self, test_data: Any) -> Array:
        """Σ_i r_i(x_t) over the training data: Φ_k(x_t; θ_N), shape (n_test,)."""
        self._check_fitted()
        xp = self.xp
        with self._at_expansion_point():
            values, solved = self._test_side(test_data)
            gradient = self.head_.loss_grad(self.train_data_, self.batch_size)
            return values - xp.matmul(gradient, solved)

    def self_influence(self, train_data: Any = None) -> Array:
        """r_i(x_i) for every training point, with its own label as the component."""
        xp = self.xp
        parts = []
        data = self.training_data(train_data)
        with self._at_expansion_point():
            for b in self.head_.batches(data, self.batch_size):
                outputs = self.head_.kernels.outputs(b.inputs)
                components = self._components(outputs, b.targets, "label")
                solved = self.ihvp.solve(xp.matrix_transpose(self._output_gradients(b, components)))
                g = self.head_.batch_per_sample_grads(b)
                second = xp.sum(g * xp.matrix_transpose(solved), axis=1)
                parts.append((self._select(outputs, components) - second) / self.n_train_)
        return self._stack(parts)
