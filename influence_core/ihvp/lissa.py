"""LiSSA: stochastic inverse-Hessian-vector products (Agarwal, Bullins, Hazan 2017)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..data import Batch, is_array_pair, leading_dim, rebatched, take_samples
from ..errors import (
    HESSIAN_ALTERNATIVES,
    ConvergenceWarning,
    LissaDivergenceError,
    NotPositiveDefiniteError,
    format_above,
)
from ..progress import progress
from ..tree import tree_map
from .base import (
    ITERATIVE_CURVATURE,
    PER_POINT_LIMIT,
    Array,
    InverseHessianVectorProduct,
    known_size,
)

__all__ = ["LISSA_DAMPING", "LISSA_MIN_SCALE", "LissaIHVP", "largest_eigenvalue"]

#: LiSSA's default damping λ, its own: 3e-3, where exact, CG and Arnoldi take
#: :data:`~influence_core.ihvp.DEFAULT_DAMPING` (1e-2). At its default depth and scale
#: LiSSA's series is truncated before it converges on the panel models of
#: ``benchmarks/defaults_panel.py`` (relative residual 0.12-0.18 at 1e-2, 0.25-0.37 at
#: 3e-3 on the digits softmax and MLP), so the truncation regularises as well, and less
#: damping is needed: at 1e-2 it missed the 95 % interval of its best damping (1e-3) on
#: the MLP and the conv net by 0.001-0.008 LDS on three of four independent seeds, and
#: 1e-3 missed softmax regression by 0.001-0.002. 3e-3 was chosen on seed 2 and is within
#: on every panel model on seed 3 (docs/choosing.md).
LISSA_DAMPING = 3e-3

#: The least scale s that ``scale=None`` chooses (LiSSA's fixed default until the panel's
#: transformer, whose largest damped eigenvalue, about 12, is above it).
LISSA_MIN_SCALE = 10.0

#: How often a chosen scale (``scale=None``) is raised 4x after the recursion diverged.
_SCALE_RETRIES = 2


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
    independent runs. Every mini-batch holds exactly ``batch_size`` samples,
    so every step's H_B is an unbiased estimate of H: mini-batches of ``(X, y)``
    arrays are drawn without replacement from a permutation seeded by ``seed``
    (reproducible); any other dataset (a ``DataLoader``, a ``tf.data.Dataset``,
    a list of batches) is cycled in its own order and re-cut into batches of
    ``batch_size``, a partial last batch continuing into the next pass.

    Error after J steps ≈ (1 − λ_min/s)^J plus the sampling noise: a small
    scale converges faster but must stay above the largest eigenvalue of every
    mini-batch's damped Hessian, which is checked: the iterates are bounded by
    s‖v‖/λ, and leaving that bound (or becoming non-finite) raises
    :class:`~influence_core.errors.LissaDivergenceError` with power-iteration
    estimates of λ_max (whole data and mini-batches) and a scale that works,
    or, when the iterate grew along negative curvature (its Rayleigh quotient
    on the whole data is ≤ 0, which no scale mends),
    :class:`~influence_core.errors.NotPositiveDefiniteError` at once.

    **The solver checks its own answer.** After each solve it measures the
    relative residual ‖(C + λI)x − v‖ / ‖v‖ (C its ``curvature``) of every column with one pass
    over up to ``check_samples`` training points (all of them when the data is
    that small; a seeded subset of arrays, or the first samples of a dataset,
    otherwise), keeps it in ``residuals_``, and warns with
    :class:`~influence_core.errors.ConvergenceWarning` when the largest exceeds
    ``tol`` (default 0.1, i.e. 10 %). ``tol=None`` skips the check.

    Args:
        damping: λ (default :data:`LISSA_DAMPING`, 3e-3: chosen by LDS on a panel).
        batch_size: samples per mini-batch (each step's HVP).
        scale: s, above every mini-batch's largest damped eigenvalue (the
            recursion diverges once one exceeds 2s). ``None`` (the default):
            max(:data:`LISSA_MIN_SCALE`, 1.5 × the largest λ_max(H_B + λI) over
            5 mini-batches by power iteration, 100 mini-batch HVPs), measured
            at the first solve and kept in ``scale_``; if the recursion still
            diverges (a mini-batch the estimate did not sample), the scale is
            raised 4x and the solve restarted, at most twice. A fixed 10 diverged on the panel's
            transformer (whole-data λ_max ≈ 12, more on a mini-batch); on the
            digits models (λ_max 0.15-0.32) the rule gives 10, as before.
        depth: J, recursion steps per repetition.
        repetitions: independent runs averaged.
        seed: seeds the mini-batch order of arrays.
        tol: the largest relative residual accepted without a warning.
        check_samples: training points the residual check uses at most.
        curvature: ``"ggn"`` (the default, :data:`~influence_core.ihvp.ITERATIVE_CURVATURE`:
            the Gauss–Newton matrix) or ``"hessian"`` (see
            :class:`~influence_core.ihvp.InverseHessianVectorProduct`).
        per_point_limit: the most estimated multiply-adds (d × training points ×
            per-sample HVPs of one solve) that self-influence or RelatIF may
            take; beyond it they are refused up front
            (:class:`~influence_core.errors.CostLimitError`). ``None``: no limit.
    """

    def __init__(
        self,
        *,
        damping: float = LISSA_DAMPING,
        batch_size: int | None = 64,
        scale: float | None = None,
        depth: int = 1000,
        repetitions: int = 1,
        seed: int = 0,
        tol: float | None = 0.1,
        check_samples: int = 4096,
        curvature: str = ITERATIVE_CURVATURE,
        per_point_limit: float | None = PER_POINT_LIMIT,
    ) -> None:
        super().__init__(damping=damping, batch_size=batch_size, curvature=curvature)
        if scale is not None and not (math.isfinite(float(scale)) and scale > 0):
            raise ValueError(f"LiSSA needs a finite scale > 0 (or None), got scale={scale}")
        for name, value in (("depth", depth), ("repetitions", repetitions)):
            if int(value) != value or value < 1:
                raise ValueError(f"LiSSA needs an integer {name} ≥ 1, got {name}={value}")
        if tol is not None and not (math.isfinite(float(tol)) and tol > 0):
            raise ValueError(f"tol must be a finite number > 0 (or None), got {tol}")
        self.scale = None if scale is None else float(scale)
        self.depth = int(depth)
        self.repetitions = int(repetitions)
        self.seed = int(seed)
        self.tol = None if tol is None else float(tol)
        self.check_samples = int(check_samples)
        self.per_point_limit = None if per_point_limit is None else float(per_point_limit)

    def get_params(self) -> dict[str, Any]:
        return {
            **super().get_params(),
            "scale": self.scale,
            "depth": self.depth,
            "repetitions": self.repetitions,
            "seed": self.seed,
            "tol": self.tol,
            "check_samples": self.check_samples,
            **(
                {}
                if self.per_point_limit == PER_POINT_LIMIT
                else {"per_point_limit": self.per_point_limit}
            ),
        }

    def _fit(self, model: Any, data: Any) -> None:
        # A chosen scale is measured at the first solve: fitting LiSSA reads no data.
        self.scale_: float | None = self.scale

    def _chosen_scale(self) -> float:
        """``scale``, or with ``None`` max(LISSA_MIN_SCALE, 1.5 × the largest mini-batch λ_max)."""
        if self.scale is not None:
            return self.scale
        return max(LISSA_MIN_SCALE, 1.5 * self._batch_eigenvalue())

    def samples_per_solve(self) -> int | None:
        """repetitions × depth mini-batches, plus the residual check's pass."""
        steps = self.repetitions * self.depth * (self.batch_size or self.model_.batch_size)
        if self.tol is None:
            return steps
        n_fit = known_size(self.model_, self.data_)
        return steps + min(self.check_samples, n_fit if n_fit is not None else self.check_samples)

    def _solve_cost_reason(self) -> str:
        return (
            f"repetitions={self.repetitions} × depth={self.depth} mini-batches of "
            f"{self.batch_size or self.model_.batch_size}, and the residual check"
        )

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

            def cycled() -> Iterator[Batch]:
                while True:
                    yield from self.model_.batches(self.data_, batch_size, whole=True)

            yield from rebatched(cycled(), batch_size, self.model_.xp)

    def _check_data(self) -> Any:
        """The data the residual is measured on: all of it, or ``check_samples`` of it."""
        limit = self.check_samples
        if is_array_pair(self.data_):
            n = leading_dim(self.data_[1])
            if n <= limit:
                return self.data_
            index = np.sort(np.random.default_rng([self.seed, 7]).choice(n, limit, replace=False))
            return take_samples(self.data_, index)
        taken, total = [], 0
        for batch in self.model_.batches(self.data_, self.batch_size, whole=True):
            taken.append((batch.inputs, batch.targets))
            total += batch.size
            if total >= limit:
                break
        return taken

    def _batch_eigenvalue(self) -> float:
        """The largest λ_max(H_B + λI) over a few mini-batches (power iteration; failure path)."""
        xp, kernels = self.xp, self.model_.kernels
        rng = np.random.default_rng(self.seed)
        largest = 0.0
        batches = self._minibatches(np.random.default_rng(self.seed))
        for _ in range(5):
            inputs, targets = next(batches)
            v = kernels.as_native(rng.normal(size=(self.model_.num_parameters, 1)), floating=True)
            for _ in range(20):
                v = v / xp.linalg.vector_norm(v)
                hv = self.model_.batch_curvature_vp(inputs, targets, v, self.curvature)
                hv = hv + self.damping * v
                value = abs(float(xp.sum(v * hv)))
                v = hv
            largest = max(largest, value)
        return largest

    def _solve_block(self, vectors: Array) -> Array:
        if getattr(self, "scale_", None) is None:  # scale=None: chosen at the first solve
            self.scale_ = self._chosen_scale()
        for attempt in range(_SCALE_RETRIES + 1):
            solution, step, diverged = self._recursion(vectors, self.scale_)
            if solution is not None:
                break
            self._refuse_negative_curvature(diverged)  # no scale mends it: raise at once
            if self.scale is not None or attempt == _SCALE_RETRIES:  # a fixed scale, or spent
                raise LissaDivergenceError(
                    self.scale_,
                    largest_eigenvalue(self),
                    step,
                    largest_batch_eigenvalue=self._batch_eigenvalue(),
                )
            # A chosen scale missed a mini-batch the power iteration did not sample: 4x, again.
            self.scale_ = 4.0 * self.scale_
        if self.tol is not None:
            self._check_residual(vectors, solution)
        return solution

    def _refuse_negative_curvature(self, diverged: Array) -> None:
        """Raise NotPositiveDefiniteError if the recursion grew along negative curvature.

        The recursion's iterate grows along an eigenvector of I − (H_B + λI)/s whose
        eigenvalue leaves [−1, 1]: above the scale (a larger scale mends it) or below
        zero (none does). Its Rayleigh quotient q = xᵀ(H + λI)x / xᵀx over the whole
        data tells the two apart, and q ≤ 0 proves H + λI is not positive definite.
        """
        xp = self.xp
        norms = xp.sqrt(xp.sum(diverged * diverged, axis=0))
        if not bool(xp.all(xp.isfinite(norms))):
            return  # overflowed: no direction to read; the divergence error says the rest
        column = int(xp.argmax(norms))
        x = diverged[:, column : column + 1] / norms[column]
        quotient = float(xp.sum(x * self.damped_hvp(x)))
        if quotient <= 0:
            ggn = self.curvature == "ggn"
            raise NotPositiveDefiniteError(
                quotient - self.damping,
                self.damping,
                how="Rayleigh quotient along the direction LiSSA's recursion diverged in",
                matrix="Gauss-Newton matrix G" if ggn else "Hessian H",
                advice=(
                    "the loss is not convex in the model's outputs, so use a factored solver "
                    "(EKFACIHVP, KFACIHVP)"
                    if ggn
                    else HESSIAN_ALTERNATIVES
                )
                + "; no LiSSA scale mends negative curvature",
            )

    def _recursion(self, vectors: Array, scale: float) -> tuple[Array | None, int, Array | None]:
        """(x_J / s averaged over the repetitions, J, None), or (None, the step it diverged
        at, the diverged iterate)."""
        xp = self.xp
        v_norm = float(xp.max(xp.sqrt(xp.sum(vectors * vectors, axis=0))))
        # ‖s (H + λI)⁻¹ v‖ ≤ s‖v‖/λ: far beyond it (or without damping, huge) means divergence.
        bound = 10.0 * scale * v_norm / (self.damping if self.damping > 0 else 1e-12) + 1.0
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
                hx = self.model_.batch_curvature_vp(inputs, targets, x, self.curvature)
                hx = hx + self.damping * x
                x = vectors + x - hx / scale
                if step % 10 == 9 or step == self.depth - 1:
                    norm = float(xp.max(xp.sqrt(xp.sum(x * x, axis=0))))
                    if not math.isfinite(norm) or norm > bound:
                        return None, step + 1, x
            total = x if total is None else total + x
        return total / (scale * self.repetitions), self.depth, None

    def _check_residual(self, vectors: Array, solution: Array) -> None:
        xp = self.xp
        check = self._check_data()
        residual = (
            self.model_.curvature_vp(check, solution, self.curvature, self.batch_size)
            + self.damping * solution
            - vectors
        )
        norms = xp.sqrt(xp.sum(vectors * vectors, axis=0))
        norms = xp.where(norms > 0, norms, xp.ones_like(norms))
        #: Relative residual ‖(C + λI)x − v‖/‖v‖ (C: H or G) of each column of the last solve.
        self.residuals_ = np.asarray(
            self.model_.to_numpy(xp.sqrt(xp.sum(residual * residual, axis=0)) / norms), dtype=float
        )
        worst = float(self.residuals_.max())
        if worst > self.tol:
            warnings.warn(
                f"LiSSA's answer is off: its relative residual ‖(C + λI)x − v‖/‖v‖ is "
                f"{format_above(worst, self.tol)} > tol={self.tol!r}. Raise depth (now {self.depth}) or repetitions, "
                f"lower the scale towards the largest eigenvalue (now scale={self.scale_:g}), or "
                "use ConjugateGradientIHVP or ExactIHVP",
                ConvergenceWarning,
                stacklevel=4,
            )
