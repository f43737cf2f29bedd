"""LiSSA: stochastic inverse-Hessian-vector products (Agarwal, Bullins, Hazan 2017)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..data import is_array_pair, leading_dim, take_samples
from ..errors import LissaDivergenceError
from ..progress import progress
from ..tree import tree_map
from .base import DEFAULT_DAMPING, Array, InverseHessianVectorProduct

__all__ = ["LissaIHVP", "largest_eigenvalue"]


def largest_eigenvalue(
    solver: InverseHessianVectorProduct, iterations: int = 20, seed: int = 0
) -> float:
    """λ_max(H + λI) by power iteration with full-data HVPs (a few passes)."""
    xp = solver.xp
    rng = np.random.default_rng(seed)
    v = solver.model_.kernels.as_native(
        rng.normal(size=(solver.model_.num_parameters, 1)), floating=True
    )
    value = 0.0
    for _ in range(iterations):
        v = v / xp.linalg.vector_norm(v)
        hv = solver.damped_hvp(v)
        value = float(xp.sum(v * hv))
        v = hv
    return abs(value)


class LissaIHVP(InverseHessianVectorProduct):
    """(H + λI)⁻¹ V by the LiSSA recursion on sampled mini-batches.

    With scale s > λ_max(H + λI), the recursion
    x₀ = v,  x_{j+1} = v + (I − (H_{B_j} + λI)/s) x_j
    over mini-batches B_j (HVPs of the batch-mean loss) converges to
    s (H + λI)⁻¹ v; the result is x_J / s averaged over ``repetitions``
    independent runs. Mini-batches of ``(X, y)`` arrays are drawn without
    replacement from a permutation seeded by ``seed`` (reproducible); other
    datasets are cycled in their own order.

    Error after J steps ≈ (1 − λ_min/s)^J plus the sampling noise: a small
    scale converges faster but must stay above λ_max, which is checked: the
    iterates are bounded by s‖v‖/λ_min, and leaving that bound (or becoming
    non-finite) raises :class:`~influence_core.errors.LissaDivergenceError`
    with a power-iteration estimate of λ_max and a scale that works.
    """

    def __init__(
        self,
        *,
        damping: float = DEFAULT_DAMPING,
        batch_size: int | None = 64,
        scale: float = 10.0,
        depth: int = 1000,
        repetitions: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__(damping=damping, batch_size=batch_size)
        if not scale > 0 or depth < 1 or repetitions < 1:
            raise ValueError("LiSSA needs scale > 0, depth ≥ 1 and repetitions ≥ 1")
        self.scale = float(scale)
        self.depth = int(depth)
        self.repetitions = int(repetitions)
        self.seed = int(seed)

    def get_params(self) -> dict[str, Any]:
        return {
            **super().get_params(),
            "scale": self.scale,
            "depth": self.depth,
            "repetitions": self.repetitions,
            "seed": self.seed,
        }

    def _minibatches(self, rng: np.random.Generator) -> Iterator[tuple[Any, Any]]:
        batch_size = self.batch_size or self.model_.batch_size
        if is_array_pair(self.data_):
            # Native once, then gathered on the device: no per-step conversion.
            inputs, targets = tree_map(self.model_.kernels.as_native, self.data_)
            n = leading_dim(targets)
            batch_size = min(batch_size, n)
            while True:
                order = rng.permutation(n)
                for start in range(0, n - batch_size + 1, batch_size):
                    index = order[start : start + batch_size]
                    yield take_samples(inputs, index), take_samples(targets, index)
        else:
            while True:
                for batch in self.model_.batches(self.data_, batch_size):
                    yield batch.inputs, batch.targets

    def _solve_block(self, vectors: Array) -> Array:
        xp = self.xp
        v_norm = float(xp.max(xp.sqrt(xp.sum(vectors * vectors, axis=0))))
        # ‖s (H + λI)⁻¹ v‖ ≤ s‖v‖/λ: far beyond it (or without damping, huge) means divergence.
        bound = 10.0 * self.scale * v_norm / (self.damping if self.damping > 0 else 1e-12) + 1.0
        total = None
        for repetition in range(self.repetitions):
            rng = np.random.default_rng([self.seed, repetition])
            batches = self._minibatches(rng)
            x = vectors
            for step in progress(
                range(self.depth), desc=f"LiSSA {repetition + 1}/{self.repetitions}"
            ):
                inputs, targets = next(batches)
                # The kernel directly: the divergence check below also catches NaN/inf.
                hx = self.model_.kernels.mean_loss_hvp(inputs, targets, x) + self.damping * x
                x = vectors + x - hx / self.scale
                if step % 10 == 9 or step == self.depth - 1:
                    norm = float(xp.max(xp.sqrt(xp.sum(x * x, axis=0))))
                    if not math.isfinite(norm) or norm > bound:
                        raise LissaDivergenceError(self.scale, largest_eigenvalue(self), step + 1)
            total = x if total is None else total + x
        return total / (self.scale * self.repetitions)
