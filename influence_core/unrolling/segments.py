"""Approximate unrolling over segments of training (SOURCE; Bae, Lin, Lorraine & Grosse, 2024).

Between the influence functions, which read one trained model as if training
had converged, and exact unrolling (:class:`~influence_core.unrolling.ReplayedTraining`),
which replays every step: training is cut into L segments, segment l having
run K_l steps at learning rate η_l around a checkpoint θ_l. Within a segment
the Hessian and each sample's gradient are taken as constant, H_l and g_l(z)
at θ_l. A perturbation then passes the segment's K_l steps of SGD as
(I − η_l H_l)^{K_l} ≈ S_l = exp(−η_l K_l H_l), and the pushes of sample z add up
to Σ_k (I − η_l H_l)^k η_l g_l(z) ≈ (I − S_l) H_l⁻¹ g_l(z). The score, in the
influence functions' units (removing z raises the test loss by about score / n)::

    τ(z, z_test) = Σ_l ∇f(θ_T)ᵀ S_L ⋯ S_{l+1} (I − S_l) H_l⁻¹ g_l(z)

H_l is the EK-FAC (or K-FAC) curvature fitted at θ_l, so every matrix function
is elementwise in its eigenbasis (or, for a small model, the exact curvature
and its ``eigh``): φ_l(s) = (1 − e^{−η_l K_l s}) / s and
e^{−η_l K_l s} on the damped eigenvalues s = Λ + λ (the limit η_l K_l where
s = 0). One segment whose η K s is large for every s is the influence
function g_testᵀ (F̂ + λI)⁻¹ g(z) exactly; a small η K leaves the directions
training had no time to fit out of the score, which is what the influence
functions get wrong before convergence.

Cost: one solver fit per segment (a pass over the training data at θ_l, plus
the eigendecompositions), the test gradients once at the final weights, and
per segment one scoring pass over the training data from layer statistics (no
(b, d) block): L times a first-order influence calculator's, against exact
unrolling's replay of every step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from ..arrays import join
from ..data import chunks
from ..estimators.base import InfluenceCalculator
from ..ihvp.base import InverseHessianVectorProduct
from ..ihvp.exact import ExactIHVP
from ..ihvp.kfac import EKFACIHVP, KFACIHVP
from ..measurements import LOSS
from ..model import InfluenceModel
from ..progress import progress

__all__ = ["ApproximateUnrolling"]

Array = Any


class ApproximateUnrolling(InfluenceCalculator):
    """SOURCE scores over L training segments, each with its own curvature (see the module).

    A calculator like the others: ``influence``, ``self_influence``, ``top_k``
    (streamed), chunked resumable runs (:mod:`influence_core.runs`) and the
    evaluation module's LDS and ``select`` take it. Its prepared test side is
    one solved block per segment (L · d · n_test numbers); :meth:`influence`
    itself goes segment by segment and holds one.

    Args:
        model: the model at its final weights θ_T (where the test gradients are taken).
        checkpoints: θ_l, one per segment, oldest first (any form
            :meth:`InfluenceModel.checkpoint_loaded` takes).
        learning_rates: η_l, the learning rate each segment trained at.
        steps: K_l, the optimizer steps each segment took.
        solver: an unfitted :class:`EKFACIHVP`, :class:`KFACIHVP` or
            :class:`~influence_core.ExactIHVP` (small models: an ``eigh`` of the
            d × d curvature per segment) whose settings every segment's
            curvature takes (default ``EKFACIHVP()``).
        measurement: the test-side measurement (default: the loss).
        batch_size: batch size for ``(X, y)`` arrays.
        chunk_size: training samples per chunk when scores are streamed (each
            checkpoint is loaded once per chunk).
    """

    def __init__(
        self,
        model: InfluenceModel,
        checkpoints: Sequence[Any],
        learning_rates: Sequence[float],
        steps: Sequence[int],
        *,
        solver: InverseHessianVectorProduct | None = None,
        measurement: Any = None,
        batch_size: int | None = None,
        chunk_size: int = 4096,
    ) -> None:
        super().__init__(model, measurement=measurement, batch_size=batch_size)
        checkpoints, rates, steps = list(checkpoints), list(learning_rates), list(steps)
        if not checkpoints:
            raise ValueError("give at least one segment: checkpoints, learning_rates and steps")
        if not len(checkpoints) == len(rates) == len(steps):
            raise ValueError(
                f"one learning rate and one step count per checkpoint: got {len(checkpoints)} "
                f"checkpoints, {len(rates)} learning rates and {len(steps)} step counts"
            )
        if any(not float(r) > 0 for r in rates):
            raise ValueError(f"learning rates must be positive, got {rates}")
        if any(int(k) != k or int(k) < 1 for k in steps):
            raise ValueError(f"steps must be positive integers, got {steps}")
        solver = EKFACIHVP() if solver is None else solver
        if not isinstance(solver, KFACIHVP | ExactIHVP):
            raise TypeError(
                "approximate unrolling applies exp(−η K H) and (1 − exp(−η K H)) H⁻¹ in the "
                "curvature's eigenbasis: give an EKFACIHVP, KFACIHVP or ExactIHVP solver, got "
                f"{type(solver).__name__}"
            )
        if getattr(solver, "query_rank", None) is not None:
            raise ValueError(
                "approximate unrolling scores whole layer matrices: give no query_rank"
            )
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.checkpoints = checkpoints
        self.learning_rates = [float(r) for r in rates]
        self.steps = [int(k) for k in steps]
        self.solver = solver
        self.chunk_size = int(chunk_size)

    def get_params(self) -> dict[str, Any]:
        return {
            **super().get_params(),
            "segments": len(self.checkpoints),
            "checkpoints": [
                c if isinstance(c, str) else f"<in memory #{i}>"
                for i, c in enumerate(self.checkpoints)
            ],
            "learning_rates": self.learning_rates,
            "steps": self.steps,
            "solver": {"class": type(self.solver).__name__, **self.solver.get_params()},
        }

    def _fit(self, train_data: Any) -> None:
        """Fit each segment's curvature at its checkpoint on ``train_data``."""
        self.solvers_: list[Any] = []
        for checkpoint in progress(self.checkpoints, desc="segment curvatures"):
            with self.model.checkpoint_loaded(checkpoint):
                fresh = type(self.solver)(**self.solver.get_params())  # unfitted, same settings
                self.solvers_.append(fresh.fit(self.model, train_data))

    def _segments(self, test_data: Any) -> Iterator[tuple[int, Any, Array]]:
        """(l, solver_l, its solved test block (m, n_test)) for l = L … 1, latest first."""
        xp, model = self.model.xp, self.model
        last = self.solvers_[-1]
        grads = join(
            xp,
            [
                last.test_gradients(model, batch, self.measurement)
                for batch in model.batches(test_data, self.batch_size)
            ],
        )
        vectors = last.layer_matrices(grads)  # ∇f(θ_T) per layer, then S_L ⋯ S_{l+1} ∇f(θ_T)
        for j in range(len(self.solvers_) - 1, -1, -1):
            solver, reach = self.solvers_[j], self.learning_rates[j] * self.steps[j]
            yield j, solver, solver.flattened(solver.spectral(vectors, _accumulated(xp, reach)))
            if j > 0:
                vectors = solver.spectral(vectors, _decayed(xp, reach))

    def prepare_test(self, test_data: Any) -> list[Array]:
        """Each segment's solved test block, oldest first: a list of L (m, n_test)."""
        self._check_fitted()
        return [solved for _, _, solved in self._segments(test_data)][::-1]

    def _scores_from_prepared(self, prepared: Any, train_data: Any) -> Iterator[tuple[int, Array]]:
        """Scores per training chunk; every checkpoint is loaded once per chunk."""
        model = self.model
        for chunk in chunks(model.batches(train_data, self.batch_size), self.chunk_size):
            total = None
            for checkpoint, solver, solved in zip(
                self.checkpoints, self.solvers_, prepared, strict=True
            ):
                with model.checkpoint_loaded(checkpoint):
                    scores = self._stack(
                        (solver.training_side(model, b).scores(solved) for b in chunk), axis=1
                    )
                total = scores if total is None else total + scores
            yield chunk[0].start, total

    def influence(self, test_data: Any, train_data: Any = None) -> Array:
        """τ(z, z_test) for every test and training point: shape (n_test, n_train), native."""
        self._check_fitted()
        model = self.model
        train = self.training_data(train_data)
        total = None
        segments = progress(self._segments(test_data), desc="segments, latest first")
        for j, solver, solved in segments:  # one segment's solved block at a time
            with model.checkpoint_loaded(self.checkpoints[j]):
                scores = self._stack(
                    (
                        solver.training_side(model, batch).scores(solved)
                        for batch in model.batches(train, self.batch_size)
                    ),
                    axis=1,
                )
            total = scores if total is None else total + scores
        return total

    def self_influence(self, train_data: Any = None) -> Array:
        """τ(z, z) for every training point, its own loss at θ_T as the test: shape (n_train,).

        Each training batch is its own test block: its gradients at θ_T are
        propagated through the segments and met by its gradients at each
        checkpoint, so every checkpoint is loaded once per batch (cheap for
        in-memory states; a file checkpoint is read each time). With K-FAC or
        EK-FAC this runs layer by layer from the batch's statistics (one
        layer's (b, p, o) block at a time, never (b, d)). Equal to the
        diagonal of ``influence(train, train)``.
        """
        self._check_fitted()
        xp, model = self.model.xp, self.model
        train = self.training_data(train_data)
        last = self.solvers_[-1]
        parts = []
        batches = progress(model.batches(train, self.batch_size), desc="self-influence")
        if isinstance(last, KFACIHVP):  # layer by layer from statistics: no (b, d) block
            for batch in batches:
                parts.append(self._layered_self_influence(batch))
            return join(xp, parts)
        for batch in batches:  # the exact solver (small d): whole gradients
            vectors = last.layer_matrices(last.test_gradients(model, batch, LOSS))
            total = None
            for j in range(len(self.solvers_) - 1, -1, -1):
                solver, reach = self.solvers_[j], self.learning_rates[j] * self.steps[j]
                solved = solver.spectral(vectors, _accumulated(xp, reach))
                with model.checkpoint_loaded(self.checkpoints[j]):
                    own = solver.layer_matrices(solver.test_gradients(model, batch, LOSS))
                part = sum(
                    xp.sum(xp.reshape(g * v, (batch.size, -1)), axis=1)
                    for g, v in zip(own, solved, strict=True)
                )
                total = part if total is None else total + part
                if j > 0:
                    vectors = solver.spectral(vectors, _decayed(xp, reach))
            parts.append(total)
        return join(xp, parts)

    def _layered_self_influence(self, batch: Any) -> Array:
        """One batch's τ(z, z), layer by layer: the batch's statistics at θ_T and at every
        checkpoint are taken once (b·T·(p + o) numbers per layer), then each layer's (b, p, o)
        gradients are formed, propagated and met in turn, so one layer's block exists at a time."""
        xp, model = self.model.xp, self.model
        at_end = model.layer_statistics(batch, LOSS)
        at_checkpoints = []
        for checkpoint in self.checkpoints:
            with model.checkpoint_loaded(checkpoint):
                at_checkpoints.append(model.layer_statistics(batch, LOSS))
        last, total = self.solvers_[-1], None
        for i in range(len(last.blocks_)):
            vector = last.layer_matrix(model, i, at_end)
            for j in range(len(self.solvers_) - 1, -1, -1):
                solver, reach = self.solvers_[j], self.learning_rates[j] * self.steps[j]
                solved = solver.layer_spectral(i, vector, _accumulated(xp, reach))
                own = solver.layer_matrix(model, i, at_checkpoints[j])
                part = xp.sum(xp.reshape(own * solved, (batch.size, -1)), axis=1)
                total = part if total is None else total + part
                if j > 0:
                    vector = solver.layer_spectral(i, vector, _decayed(xp, reach))
        return total


def _accumulated(xp: Any, reach: float):
    """φ(s) = (1 − e^{−reach·s}) / s, and reach where s = 0: K steps of η's pushes, summed."""

    def function(s: Array) -> Array:
        positive = s > 0
        safe = xp.where(positive, s, xp.ones_like(s))
        return xp.where(positive, -xp.expm1(-reach * safe) / safe, xp.full_like(s, reach))

    return function


def _decayed(xp: Any, reach: float):
    """e^{−reach·s}: what K steps at learning rate η leave of a perturbation along eigenvalue s."""
    return lambda s: xp.exp(-reach * s)
