"""Representer points from a local Jacobian expansion (Sui, Wu, Sanner 2021)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from ..ihvp import ExactIHVP, InverseHessianVectorProduct
from ..ihvp.base import DEFAULT_DAMPING
from ..model import InfluenceModel
from .base import Array
from .representer import RepresenterCalculator, Target

__all__ = ["RepresenterPointLJE"]

IHVPFactory = Callable[[InfluenceModel, Any], InverseHessianVectorProduct]


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
        train_data: the n training points.
        step: η, the ascent step on the mean training loss.
        damping: λ added to H* by the default exact solver.
        ihvp_factory: ``(head_model, train_data) -> solver`` to use another IHVP
            solver (it is built at θ*).
        target: ``"label"`` or ``"prediction"``.
        batch_size: batch size for ``(X, y)`` arrays.
    """

    def __init__(
        self,
        model: InfluenceModel,
        train_data: Any,
        *,
        step: float = 1e-2,
        damping: float = DEFAULT_DAMPING,
        ihvp_factory: IHVPFactory | None = None,
        target: Target = "label",
        batch_size: int | None = None,
    ) -> None:
        super().__init__(model, train_data, target=target, batch_size=batch_size)
        #: The model with θ = the last layer.
        self.head = model.with_parameters(self.layer.name)
        self.n_train = self.head.count(train_data, batch_size)
        trained = self.head.get_parameters()
        self.step = float(step)
        #: θ*, the perturbed last layer the expansion is taken at.
        self.expansion_point = trained + self.step * self.head.loss_grad(train_data, batch_size)
        factory = ihvp_factory or (
            lambda head, data: ExactIHVP(head, data, damping=damping, batch_size=batch_size)
        )
        with self._at_expansion_point():
            self.ihvp = factory(self.head, train_data)

    def _at_expansion_point(self) -> Any:
        return self.head.parameters_set_to(self.expansion_point)

    # -- the test side ------------------------------------------------------------------
    def _test_side(self, test_data: Any) -> tuple[Array, Array]:
        """(Φ_k(x_t; θ*) shape (n_test,), S = H*⁻¹ ∇Φ_kᵀ shape (d, n_test)); call at θ*."""
        xp, kernels = self.xp, self.head.kernels
        values, gradients = [], []
        for b in self.head.batches(test_data, self.batch_size):
            outputs = kernels.outputs(b.inputs)
            components = self._components(outputs, b.targets, self.target)
            values.append(self._select(outputs, components))
            gradients.append(self._output_gradients(b.inputs, outputs, components))
        value = values[0] if len(values) == 1 else xp.concat(values, axis=0)
        grads = gradients[0] if len(gradients) == 1 else xp.concat(gradients, axis=0)
        return value, self.ihvp.solve(xp.matrix_transpose(grads))

    def _output_gradients(self, inputs: Array, outputs: Array, components: Array | None) -> Array:
        """∇_θ Φ_k per sample (b, d); for regression the sum over outputs."""
        xp, kernels = self.xp, self.head.kernels
        if components is not None:
            return kernels.per_sample_output_grads(inputs, components)
        b, c = int(outputs.shape[0]), int(outputs.shape[1])
        total = None
        for k in range(c):
            index = xp.astype(xp.full((b,), k), xp.int64)
            part = kernels.per_sample_output_grads(inputs, index)
            total = part if total is None else total + part
        return total

    # -- results ------------------------------------------------------------------------
    def prepare_test(self, test_data: Any) -> tuple[Array, Array]:
        """(Φ_k(x_t; θ*), H*⁻¹ ∇Φ_k(x_t; θ*)ᵀ) for every test point."""
        with self._at_expansion_point():
            return self._test_side(test_data)

    def _scores_from_prepared(self, prepared: Any, train_data: Any) -> Iterator[tuple[int, Array]]:
        xp = self.xp
        values, solved = prepared
        with self._at_expansion_point():
            constant = xp.reshape(values, (-1, 1))
            for batch, g in self.head.iter_per_sample_grads(train_data, self.batch_size):
                second = xp.matrix_transpose(xp.matmul(g, solved))  # (n_test, b)
                yield batch.start, (constant - second) / self.n_train

    def decompose(self, test_data: Any) -> Array:
        """Σ_i r_i(x_t) over the training data: Φ_k(x_t; θ_N), shape (n_test,)."""
        xp = self.xp
        with self._at_expansion_point():
            values, solved = self._test_side(test_data)
            gradient = self.head.loss_grad(self.train_data, self.batch_size)
            return values - xp.matmul(gradient, solved)

    def self_influence(self, train_data: Any = None) -> Array:
        """r_i(x_i) for every training point, with its own label as the component."""
        xp = self.xp
        parts = []
        with self._at_expansion_point():
            for b in self.head.batches(self._train(train_data), self.batch_size):
                outputs = self.head.kernels.outputs(b.inputs)
                components = self._components(outputs, b.targets, "label")
                solved = self.ihvp.solve(
                    xp.matrix_transpose(self._output_gradients(b.inputs, outputs, components))
                )
                g = self.head.batch_per_sample_grads(b)
                second = xp.sum(g * xp.matrix_transpose(solved), axis=1)
                parts.append((self._select(outputs, components) - second) / self.n_train)
        return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)
