"""Attribution through training: exact metagradients of a replayed training run.

The estimators elsewhere read one trained model and approximate how training
would have changed. Here training itself is the function differentiated
(MAGIC, Ilyas & Engstrom, 2025; its REPLAY keeps memory low by recomputing
states): the run is fixed (initial θ₀, a seeded batch order, the optimizer),
each training sample i carries a weight wᵢ (1: the run as trained, 0: the
sample left out), and the score is the exact derivative of a test
measurement at the final weights with respect to wᵢ.

**The run.** T steps on batches B_t, SGD with heavy-ball momentum β and L2
weight decay μ (PyTorch's ``torch.optim.SGD`` convention, m₀ = 0)::

    g_t     = (1/|B_t|) Σ_{i ∈ B_t} wᵢ ∇ℓ(zᵢ, θ_t)
    m_{t+1} = β m_t + g_t + μ θ_t
    θ_{t+1} = θ_t − η m_{t+1}

**The metagradient**, by reverse mode through the run: adjoints θ̄_T = ∇f(θ_T),
m̄_T = 0, and for t = T − 1, …, 0::

    u       = m̄_{t+1} − η θ̄_{t+1}                 (the adjoint of m_{t+1})
    w̄ᵢ     += ⟨∇ℓ(zᵢ, θ_t), u⟩ / |B_t|             for i ∈ B_t
    θ̄_t     = θ̄_{t+1} + (H_t + μ I) u              H_t: ∂g_t/∂θ, the batch's weighted Hessian
    m̄_t     = β u

Every quantity is a protocol call at a replayed θ_t: one Hessian-vector
product and one batch of per-sample gradients per step, for a whole block of
test measurements at once (u is d × q). The score follows the library's
convention, **τ(zᵢ, z_test) = −∂f_test(θ_T)/∂wᵢ**: positive is a proponent
(removing zᵢ, Δwᵢ = −1, raises the test loss by about τ).

**Memory** (REPLAY with one level of checkpoints): the forward pass keeps
(θ_t, m_t) every K steps (K = ⌈√T⌉ by default); the reverse pass recomputes
one segment of K states at a time. Peak: (T/K + K) · 2d floats, plus the
d × q adjoints; time: two forward runs and one reverse pass (an HVP and a
batch of per-sample gradients per step).

Exact when training is deterministic and smooth in θ (no dropout, no data
augmentation drawn at random, differentiable activations). The weights of the
reverse pass must be 0 or 1 (a batch's weighted Hessian is then the kept
samples' mean Hessian times their fraction); the forward pass takes any w.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .data import is_array_pair, leading_dim, take_samples
from .model import InfluenceModel
from .progress import progress

__all__ = ["SGD", "ReplayedTraining"]

Array = Any


@dataclass(frozen=True)
class SGD:
    """SGD with heavy-ball momentum and L2 weight decay (``torch.optim.SGD``'s convention).

    Args:
        lr: the step size η > 0.
        momentum: β in [0, 1).
        weight_decay: μ ≥ 0, added to the gradient as μ θ.
    """

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number ≥ 0, got {self.weight_decay!r}")


class ReplayedTraining:
    """A deterministic training run that can be replayed with per-sample weights and differentiated.

    Args:
        model: the :class:`~influence_core.InfluenceModel`; its current θ is
            the run's initialisation θ₀ (copied now; the model is never changed).
        train_data: ``(X, y)`` arrays (NumPy or native): the run indexes samples.
        optimizer: :class:`SGD`.
        epochs: passes over the training data.
        batch_size: samples per step (the last batch of an epoch may be smaller).
        seed: the batch order, drawn once from ``numpy.random.default_rng(seed)``
            (a new permutation every epoch); every replay uses the same order.
        checkpoint_every: K, states kept every K steps in the reverse pass
            (default ⌈√T⌉).

    ``train()`` gives θ_T; ``retrain(indices)`` trains on a subset (the rest
    weighted 0) with the same order, a ``retrain`` for
    :mod:`influence_core.evaluation`; ``metagradient_scores(test)`` gives
    τ of shape (n_test, n_train).
    """

    def __init__(
        self,
        model: InfluenceModel,
        train_data: Any,
        optimizer: SGD,
        *,
        epochs: int,
        batch_size: int,
        seed: int = 0,
        checkpoint_every: int | None = None,
    ) -> None:
        if not isinstance(optimizer, SGD):
            raise TypeError(f"optimizer must be an SGD, got {type(optimizer).__name__}")
        if not is_array_pair(train_data):
            raise TypeError(
                "ReplayedTraining indexes samples: pass the training data as (X, y) arrays "
                f"(NumPy or native), got {type(train_data).__name__}"
            )
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"epochs and batch_size must be ≥ 1, got {epochs} and {batch_size}")
        self.model, self.data, self.optimizer = model, train_data, optimizer
        self.n = leading_dim(train_data[1])
        rng = np.random.default_rng(seed)
        self.order: list[np.ndarray] = [
            permutation[start : start + batch_size]
            for permutation in (rng.permutation(self.n) for _ in range(epochs))
            for start in range(0, self.n, batch_size)
        ]
        self.steps = len(self.order)
        self.checkpoint_every = checkpoint_every or max(1, math.isqrt(self.steps - 1) + 1)
        self.initial = model.get_parameters()

    # -- forward ------------------------------------------------------------------
    def _weights(self, weights: Any) -> np.ndarray:
        if weights is None:
            return np.ones(self.n)
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (self.n,) or not np.all(np.isfinite(w)):
            raise ValueError(f"weights must be {self.n} finite numbers, got shape {w.shape}")
        return w

    def _batch(self, indices: np.ndarray) -> tuple[Any, Any]:
        return take_samples(self.data, indices)

    def _gradient(self, theta: Array, t: int, w: np.ndarray) -> Array:
        """g_t = (1/|B_t|) Σ_{i ∈ B_t} wᵢ ∇ℓ(zᵢ, θ_t)."""
        model, xp, batch = self.model, self.model.xp, self.order[t]
        weights = w[batch]
        with model.parameters_set_to(theta):
            if np.all(weights == 1.0):
                return model.loss_grad(self._batch(batch), batch_size=batch.size)
            if np.all((weights == 0.0) | (weights == 1.0)):
                kept = batch[weights == 1.0]
                if kept.size == 0:
                    return xp.zeros_like(theta)
                mean = model.loss_grad(self._batch(kept), batch_size=kept.size)
                return mean * (kept.size / batch.size)
            grads = model.per_sample_grads(self._batch(batch))  # (b, d): one batch, never n
            column = xp.asarray(weights / batch.size, dtype=grads.dtype)
            return xp.sum(grads * xp.reshape(column, (-1, 1)), axis=0)

    def _step(self, theta: Array, momentum: Array, t: int, w: np.ndarray) -> tuple[Array, Array]:
        o = self.optimizer
        velocity = o.momentum * momentum + self._gradient(theta, t, w)
        if o.weight_decay:
            velocity = velocity + o.weight_decay * theta
        return theta - o.lr * velocity, velocity

    def _states(
        self, w: np.ndarray, keep_every: int, *, show: bool = False
    ) -> Iterator[tuple[int, Array, Array]]:
        """(t, θ_t, m_t) for t = 0, K, 2K, … and, last, (T, θ_T, m_T)."""
        theta = self.initial
        momentum = self.model.xp.zeros_like(theta)
        steps = range(self.steps)
        for t in progress(steps, desc="training run", total=self.steps) if show else steps:
            if t % keep_every == 0:
                yield t, theta, momentum
            theta, momentum = self._step(theta, momentum, t, w)
        yield self.steps, theta, momentum

    def train(self, weights: Any = None) -> Array:
        """θ_T of the run with per-sample ``weights`` (default all 1), native, shape (d,)."""
        w = self._weights(weights)
        *_, (_, theta, _) = self._states(w, self.steps + 1, show=True)
        return theta

    def retrain(self, indices: Any) -> Any:
        """The run on the samples ``indices`` only (the others weighted 0): the model's state.

        What :mod:`influence_core.evaluation` takes as ``retrain``: the same
        initialisation and batch order, so the difference is the data alone.
        """
        w = np.zeros(self.n)
        w[np.asarray(indices, dtype=np.int64)] = 1.0
        with self.model.parameters_set_to(self.train(w)):
            return self.model.save_state()

    # -- reverse ------------------------------------------------------------------
    def metagradient_scores(self, test_data: Any, weights: Any = None) -> Array:
        """τ(zᵢ, z_test) = −∂ℓ(z_test, θ_T)/∂wᵢ for every test and training point: (n_test, n_train).

        One forward run keeping a state every K steps, then per segment (last
        first) a replay of its K states and the reverse steps of the module
        docstring, for all test points at once. ``weights`` (0 or 1 each,
        default all 1) is the run differentiated.
        """
        model, xp = self.model, self.model.xp
        w = self._weights(weights)
        if not np.all((w == 0.0) | (w == 1.0)):
            raise ValueError(
                "metagradients are computed at weights of 0 or 1 (a batch's weighted Hessian is "
                "then its kept samples' mean Hessian); the forward run (train) takes any weights"
            )
        kept_states = list(self._states(w, self.checkpoint_every, show=True))
        (_, theta_T, _) = kept_states.pop()
        with model.parameters_set_to(theta_T):
            test_grads = model.per_sample_grads(test_data)  # (q, d)
        theta_bar = xp.permute_dims(test_grads, (1, 0))  # (d, q)
        momentum_bar = xp.zeros_like(theta_bar)
        scores = np.zeros((int(test_grads.shape[0]), self.n))
        segments = progress(list(reversed(kept_states)), desc="reverse pass")
        for start, theta, momentum in segments:
            stop = min(start + self.checkpoint_every, self.steps)
            states = [theta]
            for t in range(start, stop - 1):  # replay the segment's states θ_start … θ_{stop-1}
                theta, momentum = self._step(theta, momentum, t, w)
                states.append(theta)
            for t in reversed(range(start, stop)):
                theta_bar, momentum_bar, rows = self._adjoint(
                    states[t - start], t, w, theta_bar, momentum_bar
                )
                scores[:, self.order[t]] += rows
        return xp.asarray(-scores, dtype=model.dtype)

    def _adjoint(
        self, theta: Array, t: int, w: np.ndarray, theta_bar: Array, momentum_bar: Array
    ) -> tuple[Array, Array, np.ndarray]:
        """One reverse step: (θ̄_t, m̄_t, the batch's (q, b) weight adjoints w̄)."""
        model, xp, o = self.model, self.model.xp, self.optimizer
        batch = self.order[t]
        u = momentum_bar - o.lr * theta_bar
        kept = batch[w[batch] == 1.0]
        with model.parameters_set_to(theta):
            grads = model.per_sample_grads(self._batch(batch))  # (b, d)
            rows = model.to_numpy(xp.matmul(grads, u)).T / batch.size  # (q, b)
            curvature = (
                model.hvp(self._batch(kept), u, batch_size=kept.size) * (kept.size / batch.size)
                if kept.size
                else xp.zeros_like(u)
            )
        if o.weight_decay:
            curvature = curvature + o.weight_decay * u
        return theta_bar + curvature, o.momentum * u, rows
