"""Second-order group influence (Basu, You, Feizi 2020)."""

from __future__ import annotations

from typing import Any

from .first_order import Array, FirstOrderInfluenceCalculator

__all__ = ["SecondOrderInfluenceCalculator"]


class SecondOrderInfluenceCalculator(FirstOrderInfluenceCalculator):
    """Group influence with the second-order cross terms of removing a group together.

    Removing a group U of m training points (p = m/n, q = p/(1 − p)) and
    retraining on the other n − m with the same objective (mean loss plus the
    regulariser that the damping λ stands for) moves the parameters by::

        Δθ_U ≈ q (H + λI)⁻¹ ḡ_U  +  q² (H + λI)⁻¹ (H_U − H) (H + λI)⁻¹ ḡ_U

    with ḡ_U = (1/m) Σ_{z∈U} ∇ℓ(z) − ∇L(θ̂) (the group's mean gradient, centred
    by the full training gradient, which is −∇R(θ̂) at a stationary point),
    H = ∇²L(θ̂) the Hessian of the mean training loss, H_U = ∇²L_U(θ̂) that of
    the group's mean loss. This is the expansion of the exact linearised
    change, q (H + λI + q(H − H_U))⁻¹ ḡ_U, to second order in q (Basu, You,
    Feizi, "On Second-Order Group Influence Functions for Black-Box
    Predictions", ICML 2020). The q² term is what first order misses: the
    interaction of the removed points through H_U, and the renormalisation
    1/(1 − p) of the remaining data's mean.

    **Scale and sign**, the same as
    :meth:`FirstOrderInfluenceCalculator.group_influence`::

        group_influence(z_test, U) = n · g(z_test)ᵀ Δθ_U

    ≈ n × (change of the test loss when U is removed); positive means U, as
    a group, is a proponent. At first order and ∇L(θ̂) = 0 this is the first
    order's Σ_{z∈U} score(z, z_test) times 1/(1 − p). (Influenciae's two group
    calculators differ by a factor n; here both are on this scale.)

    H, H_U's complement and ∇L(θ̂) all come from the one training set the
    calculator is fitted on (:meth:`fit` fits the solver on it too), so they
    cannot disagree. Cost per group: one training-gradient pass, two block
    solves, and two HVP passes (over U and over the training set). Single-point methods
    (``influence``, ``self_influence``, ``top_k``) are the first-order ones:
    for |U| = 1 the q² term is O(1/n²).
    """

    #: Its fit also holds n and ∇L(θ̂), which are not exported (yet).
    exports_fitted_state = False

    def _fit(self, train_data: Any) -> None:
        super()._fit(train_data)
        #: n and ∇L(θ̂) of the training set the solver's H was fitted on.
        self.n_train_ = self.model.count(train_data, self.batch_size)
        self.train_gradient_ = self.model.loss_grad(train_data, batch_size=self.batch_size)

    def parameter_change(self, group_data: Any) -> Array:
        """Δθ_U, the predicted parameter change from removing the group: shape (d,)."""
        self._check_fitted()
        n = self.n_train_
        m = self.model.count(group_data, self.batch_size)
        if not 0 < m < n:
            raise ValueError(f"a group needs 1 to n − 1 = {n - 1} points, got {m}")
        p = m / n
        q = p / (1.0 - p)
        g_group = (
            self.model.loss_grad(group_data, batch_size=self.batch_size) - self.train_gradient_
        )
        first = self.ihvp.solve(g_group)
        cross = self.model.hvp(group_data, first, batch_size=self.batch_size) - self.model.hvp(
            self.train_data_, first, batch_size=self.batch_size
        )
        return q * first + (q * q) * self.ihvp.solve(cross)

    def group_influence(self, test_data: Any, group_data: Any) -> Array:
        """n · g(z_test)ᵀ Δθ_U for each test point: shape (n_test,)."""
        xp = self.xp
        delta = self.parameter_change(group_data)
        return self._stack(
            xp.matmul(g, delta) * self.n_train_ for _, g in self._test_gradients(test_data)
        )
