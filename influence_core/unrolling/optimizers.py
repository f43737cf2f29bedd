"""Optimizers a replayed run can differentiate: each step forward, and its adjoint.

An optimizer is a small record of its settings with three methods, written
once over the array namespace ``xp``:

* ``init(xp, θ₀)``: its state before the first step (a tuple of arrays);
* ``step(xp, θ_t, state_t, g_t, t)`` → ``(θ_{t+1}, state_{t+1})``, with g_t
  the batch's weighted mean gradient;
* ``adjoint(xp, θ_t, state_t, g_t, t, θ̄_{t+1}, statē_{t+1})`` →
  ``(ḡ_t, θ̄_t without the g path, statē_t)``: the reverse of one step for a
  block of q adjoints (each d × q). The caller adds the path through g_t:
  θ̄_t += H_t ḡ_t, and wᵢ's adjoint ⟨∇ℓ(zᵢ, θ_t), ḡ_t⟩/|B_t|.

Conventions are PyTorch's (``torch.optim.SGD``, ``torch.optim.Adam`` with L2
weight decay added to the gradient, ``torch.optim.AdamW`` with decoupled
decay), so a run written with any of them matches the user's own loop step
for step. A learning-rate schedule is the sequence of each step's rate
(``lr=[η_0, η_1, …]``, one per step, e.g. read off the user's
``torch.optim.lr_scheduler`` as ``scheduler.get_last_lr()[0]`` after each
step); a number is a constant rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, Protocol

__all__ = ["SGD", "Adam", "AdamW", "Optimizer", "check_optimizer", "optimizer_settings"]

Array = Any


def _check(name: str, value: float, low: float, high: float, *, open_low: bool = False) -> None:
    ok = math.isfinite(value) and (value > low if open_low else value >= low) and value < high
    if not ok:
        bound = f"({low}, {high})" if open_low else f"[{low}, {high})"
        raise ValueError(f"{name} must be in {bound}, got {value!r}")


def _rates(value: float | Sequence[float]) -> float | tuple[float, ...]:
    """A constant rate, or a schedule (one rate per step) as a tuple; each must be > 0."""
    if isinstance(value, int | float):
        _check("lr", float(value), 0.0, math.inf, open_low=True)
        return float(value)
    rates = tuple(float(r) for r in value)
    if not rates:
        raise ValueError("lr must be a positive number or one positive rate per step, got []")
    for t, rate in enumerate(rates):
        _check(f"lr[{t}]", rate, 0.0, math.inf, open_low=True)
    return rates


def _rate_at(lr: float | tuple[float, ...], t: int) -> float:
    """η_t: the constant rate, or step t's rate of the schedule (which must cover step t)."""
    if isinstance(lr, float):
        return lr
    if t >= len(lr):
        raise ValueError(
            f"the learning-rate schedule has {len(lr)} rates but the run takes step {t + 1}: "
            "give one rate per step of the run (epochs × batches per epoch)"
        )
    return lr[t]


def _column(xp: Any, vector: Array) -> Array:
    return xp.reshape(vector, (-1, 1))  # (d,) against (d, q) adjoints


@dataclass(frozen=True)
class SGD:
    """SGD with heavy-ball momentum β and L2 weight decay μ (``torch.optim.SGD``, dampening 0).

    m_{t+1} = β m_t + g_t + μ θ_t;  θ_{t+1} = θ_t − η m_{t+1};  m_0 = 0.
    """

    lr: float | Sequence[float]
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", _rates(self.lr))
        _check("momentum", self.momentum, 0.0, 1.0)
        _check("weight_decay", self.weight_decay, 0.0, math.inf)

    def init(self, xp: Any, theta: Array) -> tuple[Array, ...]:
        return (xp.zeros_like(theta),)

    def step(self, xp: Any, theta: Array, state: tuple, g: Array, t: int) -> tuple[Array, tuple]:
        velocity = self.momentum * state[0] + g
        if self.weight_decay:
            velocity = velocity + self.weight_decay * theta
        return theta - _rate_at(self.lr, t) * velocity, (velocity,)

    def adjoint(
        self, xp: Any, theta: Array, state: tuple, g: Array, t: int, theta_bar: Array, bars: tuple
    ) -> tuple[Array, Array, tuple]:
        velocity_bar = bars[0] - _rate_at(self.lr, t) * theta_bar  # the adjoint of m_{t+1}
        direct = theta_bar + self.weight_decay * velocity_bar if self.weight_decay else theta_bar
        return velocity_bar, direct, (self.momentum * velocity_bar,)


@dataclass(frozen=True)
class Adam:
    """Adam with L2 weight decay μ (``torch.optim.Adam``, amsgrad off).

    ĝ = g_t + μ θ_t;  m' = β₁ m + (1 − β₁) ĝ;  v' = β₂ v + (1 − β₂) ĝ²;
    θ_{t+1} = θ_t − η (m'/c₁) / (√(v'/c₂) + ε),  c_j = 1 − β_j^{t+1}.

    Its adjoint differentiates through ĝ² and the square root (where a
    coordinate's v' is exactly 0, so is its m', and its derivative is taken as 0).
    """

    lr: float | Sequence[float]
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    #: L2 decay added to the gradient (Adam); AdamW decays θ apart from it.
    decoupled = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr", _rates(self.lr))
        _check("betas[0]", self.betas[0], 0.0, 1.0)
        _check("betas[1]", self.betas[1], 0.0, 1.0)
        _check("eps", self.eps, 0.0, math.inf, open_low=True)
        _check("weight_decay", self.weight_decay, 0.0, math.inf)

    def init(self, xp: Any, theta: Array) -> tuple[Array, ...]:
        return (xp.zeros_like(theta), xp.zeros_like(theta))

    def _moments(self, theta: Array, state: tuple, g: Array) -> tuple[Array, Array, Array]:
        b1, b2 = self.betas
        coupled = self.weight_decay and not self.decoupled
        decayed = g + self.weight_decay * theta if coupled else g
        return decayed, b1 * state[0] + (1 - b1) * decayed, b2 * state[1] + (1 - b2) * decayed**2

    def step(self, xp: Any, theta: Array, state: tuple, g: Array, t: int) -> tuple[Array, tuple]:
        _, m, v = self._moments(theta, state, g)
        c1, c2 = 1 - self.betas[0] ** (t + 1), 1 - self.betas[1] ** (t + 1)
        lr = _rate_at(self.lr, t)
        if self.decoupled and self.weight_decay:
            theta = theta * (1 - lr * self.weight_decay)
        return theta - lr * (m / c1) / (xp.sqrt(v / c2) + self.eps), (m, v)

    def adjoint(
        self, xp: Any, theta: Array, state: tuple, g: Array, t: int, theta_bar: Array, bars: tuple
    ) -> tuple[Array, Array, tuple]:
        b1, b2 = self.betas
        decayed, m, v = self._moments(theta, state, g)
        c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
        root = xp.sqrt(v / c2)
        denominator = root + self.eps
        lr = _rate_at(self.lr, t)
        m_bar = bars[0] - theta_bar * _column(xp, lr / c1 / denominator)
        # ∂θ_{t+1}/∂v' = η (m'/c₁) / (√(v'/c₂) + ε)² · 1 / (2 c₂ √(v'/c₂))
        positive = root > 0
        safe = xp.where(positive, root, xp.ones_like(root))
        slope = xp.where(
            positive,
            lr * (m / c1) / (denominator**2 * 2 * c2 * safe),
            xp.zeros_like(root),
        )
        v_bar = bars[1] + theta_bar * _column(xp, slope)
        g_bar = (1 - b1) * m_bar + 2 * (1 - b2) * _column(xp, decayed) * v_bar
        if not self.weight_decay:
            direct = theta_bar
        elif self.decoupled:  # θ_{t+1} = (1 − η μ) θ_t − …
            direct = (1 - lr * self.weight_decay) * theta_bar
        else:  # ĝ = g + μ θ
            direct = theta_bar + self.weight_decay * g_bar
        return g_bar, direct, (b1 * m_bar, b2 * v_bar)


@dataclass(frozen=True)
class AdamW(Adam):
    """Adam with decoupled weight decay μ (``torch.optim.AdamW``, amsgrad off).

    θ' = (1 − η μ) θ_t, then Adam's step from θ' on the plain g_t:
    θ_{t+1} = θ' − η (m'/c₁) / (√(v'/c₂) + ε). torch's default μ is 0.01.
    """

    weight_decay: float = 0.01
    decoupled = True


class Optimizer(Protocol):
    """What :class:`~influence_core.unrolling.ReplayedTraining` takes: SGD, Adam, AdamW, or a
    user's own update rule written over the namespace with its adjoint (see the module).

    ``lr`` is a number or one rate per step. A rule that is not a dataclass gives its settings
    (JSON values, for the run's fingerprint) from ``get_params()``. Check a hand-written
    adjoint against finite differences of the replayed run before trusting its scores
    (``tests/test_unrolling.py`` shows how).
    """

    lr: Any

    def init(self, xp: Any, theta: Array) -> tuple[Array, ...]: ...

    def step(
        self, xp: Any, theta: Array, state: tuple, g: Array, t: int
    ) -> tuple[Array, tuple]: ...

    def adjoint(
        self, xp: Any, theta: Array, state: tuple, g: Array, t: int, theta_bar: Array, bars: tuple
    ) -> tuple[Array, Array, tuple]: ...


def optimizer_settings(optimizer: Any) -> dict[str, Any]:
    """An optimizer's settings as JSON values: a dataclass's fields, or ``get_params()``."""
    if is_dataclass(optimizer):
        return {"kind": type(optimizer).__name__, **asdict(optimizer)}
    getter = getattr(optimizer, "get_params", None)
    if getter is None:
        raise TypeError(
            f"{type(optimizer).__name__} is neither a dataclass nor has get_params(): the run's "
            "fingerprint needs its settings (make it a frozen dataclass, or add get_params())"
        )
    return {"kind": type(optimizer).__name__, **getter()}


def check_optimizer(optimizer: Any) -> None:
    """Refuse an object without ``init``, ``step`` and ``adjoint``, naming what is missing."""
    missing = [m for m in ("init", "step", "adjoint") if not callable(getattr(optimizer, m, None))]
    if missing or not hasattr(optimizer, "lr"):
        raise TypeError(
            f"optimizer must be an SGD, Adam or AdamW, or an update rule with lr, init, step and "
            f"adjoint (influence_core.unrolling.Optimizer); {type(optimizer).__name__} lacks "
            f"{', '.join(missing + ([] if hasattr(optimizer, 'lr') else ['lr']))}"
        )
