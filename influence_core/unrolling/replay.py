"""Attribution through training: exact metagradients of a replayed training run.

The estimators elsewhere read one trained model and approximate how training
would have changed. Here training itself is the function differentiated
(MAGIC, Ilyas & Engstrom, 2025; its REPLAY keeps memory low by recomputing
states): the run is fixed (initial θ₀, a seeded batch order, the optimizer),
each training sample i carries a weight wᵢ (1: the run as trained, 0: the
sample left out), and the score is the exact derivative of a test
measurement at the final weights with respect to wᵢ.

**The run.** T steps on batches B_t; each step reads the batch's weighted
mean gradient and the optimizer's state (:mod:`.optimizers`: SGD with
momentum, Adam; PyTorch's conventions)::

    g_t = (1/|B_t|) Σ_{i ∈ B_t} wᵢ ∇ℓ(zᵢ, θ_t)
    (θ_{t+1}, s_{t+1}) = step(θ_t, s_t, g_t)

**The metagradient**, by reverse mode through the run: adjoints θ̄_T = ∇f(θ_T),
s̄_T = 0, and for t = T − 1, …, 0, with the optimizer's adjoint of its step
giving ḡ_t (the adjoint of g_t), the direct part of θ̄_t and s̄_t::

    w̄ᵢ  += ⟨∇ℓ(zᵢ, θ_t), ḡ_t⟩ / |B_t|        for i ∈ B_t
    θ̄_t  = (direct part) + H_t ḡ_t            H_t = ∂g_t/∂θ, the batch's weighted Hessian

For SGD (m_{t+1} = β m_t + g_t + μ θ_t, θ_{t+1} = θ_t − η m_{t+1}):
ḡ_t = m̄_{t+1} − η θ̄_{t+1}, θ̄_t = θ̄_{t+1} + (H_t + μ I) ḡ_t, m̄_t = β ḡ_t.

Every quantity is a protocol call at a replayed θ_t: one Hessian-vector
product and one batch of per-sample gradient products (forward mode where
the backend has it, no (b, d) block) per step, for a whole block of
test measurements at once (ḡ_t is d × q). The score follows the library's
convention, **τ(zᵢ, z_test) = −∂f_test(θ_T)/∂wᵢ**: positive is a proponent
(removing zᵢ, Δwᵢ = −1, raises the test loss by about τ).

**Memory** (REPLAY with one level of checkpoints): the forward pass keeps
(θ_t, s_t) every K steps (K = ⌈√T⌉ by default); the reverse pass recomputes
one segment of K states at a time. Peak: (T/K + K) · (1 + |s|) · d floats (|s|: 1
for SGD, 2 for Adam), plus the
d × q adjoints; time: two forward runs and one reverse pass (an HVP and a
batch of per-sample gradient products per step).

Exact when training is deterministic and smooth in θ (no dropout, no data
augmentation drawn at random, differentiable activations). The weights of the
reverse pass must be 0 or 1 (a batch's weighted Hessian is then the kept
samples' mean Hessian times their fraction); the forward pass takes any w.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..arrays import join
from ..data import is_array_pair, leading_dim, take_samples
from ..errors import FingerprintMismatchError
from ..estimators.top_k import RunningTopK, TopK
from ..io import METADATA, load_result, save_result
from ..measurements import LOSS, Measurement, resolve_measurement
from ..model import InfluenceModel
from ..progress import progress
from .optimizers import Optimizer, check_optimizer, optimizer_settings

__all__ = ["ReplayedTraining"]

#: The ``method`` a saved result of metagradients records.
METHOD = "replayed_training_metagradient"
#: Where, under ``save_to``, a reverse pass keeps its progress (removed once the result is saved).
PROGRESS = "reverse_pass"
PROGRESS_METHOD = "replayed_training_reverse_pass"

Array = Any


class ReplayedTraining:
    """A deterministic training run that can be replayed with per-sample weights and differentiated.

    Args:
        model: the :class:`~influence_core.InfluenceModel`; its current θ is
            the run's initialisation θ₀ (copied now; the model is never changed).
        train_data: ``(X, y)`` arrays (NumPy or native): the run indexes samples.
        optimizer: :class:`~influence_core.unrolling.SGD`, :class:`~influence_core.unrolling.Adam`
            or :class:`~influence_core.unrolling.AdamW`, with a constant rate or a
            schedule (one rate per step).
        epochs: passes over the training data.
        batch_size: samples per step (the last batch of an epoch may be smaller).
        seed: the batch order, drawn once from ``numpy.random.default_rng(seed)``
            (a new permutation every epoch); every replay uses the same order.
        checkpoint_every: K, states kept every K steps in the reverse pass
            (default ⌈√T⌉).
        branching: k ≥ 2 for REPLAY's k-ary scheme instead: at most k states
            kept per level over ⌈log_k T⌉ levels, each level replaying its
            segment once (T · levels recomputed steps); ``None`` (default):
            the two-level √T scheme.
        measurement: what a test point's score explains, as for every
            calculator: ``"loss"`` (default), ``"logit"``, ``"probability"``,
            ``"margin"``, a :class:`~influence_core.Measurement` or a native
            ``f(outputs, targets)``; τ = ∂f/∂wᵢ for a raised f (a proponent
            raises it), −∂f/∂wᵢ for a loss-like one. Self-influence is always
            of the training loss.

    ``train()`` gives θ_T; ``retrain(indices)`` trains on a subset (the rest
    weighted 0) with the same order, a ``retrain`` for
    :mod:`influence_core.evaluation`; ``metagradient_scores(test)`` gives
    τ of shape (n_test, n_train).
    """

    def __init__(
        self,
        model: InfluenceModel,
        train_data: Any,
        optimizer: Optimizer,
        *,
        epochs: int,
        batch_size: int,
        seed: int = 0,
        checkpoint_every: int | None = None,
        branching: int | None = None,
        measurement: Any = None,
    ) -> None:
        check_optimizer(optimizer)
        optimizer_settings(optimizer)  # the fingerprint needs them: refused now, not at a save
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
        if isinstance(optimizer.lr, tuple | list) and len(optimizer.lr) < self.steps:
            raise ValueError(
                f"the learning-rate schedule has {len(optimizer.lr)} rates but the run takes "
                f"{self.steps} steps ({epochs} epochs of {-(-self.n // batch_size)} batches): "
                "give one rate per step"
            )
        if branching is not None and int(branching) < 2:
            raise ValueError(f"branching must be ≥ 2 (a k-ary replay), got {branching}")
        self.branching = None if branching is None else int(branching)
        if self.branching is not None:  # the top level keeps k states, and each piece recurses
            checkpoint_every = checkpoint_every or -(-self.steps // self.branching)
        self.checkpoint_every = checkpoint_every or max(1, math.isqrt(self.steps - 1) + 1)
        self.initial = model.get_parameters()
        self.measurement = resolve_measurement(measurement)

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

    def _step(
        self, theta: Array, state: tuple, t: int, w: np.ndarray
    ) -> tuple[Array, tuple, Array]:
        """(θ_{t+1}, state_{t+1}, g_t)."""
        g = self._gradient(theta, t, w)
        theta, state = self.optimizer.step(self.model.xp, theta, state, g, t)
        return theta, state, g

    def _states(
        self, w: np.ndarray, keep_every: int, *, show: bool = False
    ) -> Iterator[tuple[int, Array, tuple]]:
        """(t, θ_t, the optimizer's state_t) for t = 0, K, 2K, … and, last, t = T."""
        theta = self.initial
        state = self.optimizer.init(self.model.xp, theta)
        steps = range(self.steps)
        for t in progress(steps, desc="training run", total=self.steps) if show else steps:
            if t % keep_every == 0:
                yield t, theta, state
            theta, state, _ = self._step(theta, state, t, w)
        yield self.steps, theta, state

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

    def checkpoints(self, every: int, weights: Any = None) -> list[Any]:
        """The model's state after every ``every`` steps and at the end: TracIn's checkpoints of this run.

        θ_t for t = every, 2·every, …, and T, each as
        :meth:`~influence_core.InfluenceModel.save_state` gives it (what
        :class:`~influence_core.TracIn` loads); pair them with the optimizer's
        ``lr``.
        """
        if every < 1:
            raise ValueError(f"every must be ≥ 1, got {every}")
        states = []
        for t, theta, _ in self._states(self._weights(weights), every):
            if t > 0:
                with self.model.parameters_set_to(theta):
                    states.append(self.model.save_state())
        return states

    def settings(self, weights: Any = None) -> dict[str, Any]:
        """What defines the run (JSON values): the optimizer, epochs, batch size, seed, order, weights."""
        w = self._weights(weights)
        order = np.concatenate(self.order).astype(np.int64)
        return {
            "optimizer": optimizer_settings(self.optimizer),
            "steps": self.steps,
            "batch_sizes": sorted({int(b.size) for b in self.order}),
            "order_sha256": hashlib.sha256(order.tobytes()).hexdigest(),
            "weights_sha256": hashlib.sha256(w.tobytes()).hexdigest(),
            "measurement": self.measurement.name,
        }

    # -- reverse ------------------------------------------------------------------
    def metagradient_scores(
        self, test_data: Any, weights: Any = None, *, save_to: str | Path | None = None
    ) -> Array:
        """τ(zᵢ, z_test) = −∂ℓ(z_test, θ_T)/∂wᵢ for every test and training point: (n_test, n_train).

        One forward run keeping a state every K steps, then per segment (last
        first) a replay of its K states and the reverse steps of the module
        docstring, for all test points at once. ``weights`` (0 or 1 each,
        default all 1) is the run differentiated.

        ``save_to``: a directory of :mod:`influence_core.io` (``.npz`` +
        JSON, no pickle). Scores saved there are loaded instead of recomputed,
        after checking they belong to this run: the same initial weights,
        training and test data (fingerprints) and :meth:`settings`; anything
        else raises :class:`~influence_core.errors.FingerprintMismatchError`.
        While it runs, the reverse pass saves its adjoints and scores after
        every segment (``save_to/reverse_pass``; d × q floats per state plus
        the scores): a killed run resumes from the last finished segment,
        after the same checks, and the progress is removed once the result is saved.
        """
        if save_to is not None and (Path(save_to) / METADATA).exists():
            return self._load_scores(Path(save_to), test_data, weights)
        progress_dir = None if save_to is None else Path(save_to) / PROGRESS
        scores = self._metagradient_scores(test_data, weights, self.measurement, progress_dir)
        if save_to is not None:
            with self.model.parameters_set_to(self.initial):  # fingerprints of θ₀
                save_result(
                    save_to,
                    {"scores": scores},
                    method=METHOD,
                    model=self.model,
                    parameters=self.settings(weights),
                    data={"train": self.data, "test": test_data},
                )
            shutil.rmtree(progress_dir, ignore_errors=True)  # the whole result supersedes it
        return scores

    def _load_scores(self, directory: Path, test_data: Any, weights: Any) -> Array:
        saved = self._load_checked(directory, test_data, weights, METHOD, "metagradients")
        return self.model.kernels.as_native(saved.arrays["scores"], floating=True)

    def _load_checked(
        self, directory: Path, test_data: Any, weights: Any, method: str, what: str
    ) -> Any:
        """A saved result of this run (θ₀, data and :meth:`settings` checked), or a refusal."""
        with self.model.parameters_set_to(self.initial):
            saved = load_result(
                directory,
                model=self.model,
                data={"train": self.data, "test": test_data},
                method=method,
            )
        expected = json.loads(json.dumps(self.settings(weights)))  # as JSON gives it back
        recorded = saved.metadata["parameters"]
        if recorded != expected:
            differing = sorted(k for k in expected.keys() | recorded.keys()
                               if expected.get(k) != recorded.get(k))  # fmt: skip
            raise FingerprintMismatchError(
                f"{directory} holds the {what} of another run: {', '.join(differing)} "
                "differ from this one's; use another directory or recompute"
            )
        return saved

    def _save_progress(
        self, directory: Path, done: int, theta_bar: Array, bars: tuple, scores: np.ndarray,
        test_data: Any, weights: Any,
    ) -> None:  # fmt: skip
        """The reverse pass after ``done`` segments: its adjoints and the scores so far."""
        arrays = {
            "theta_bar": theta_bar,
            "scores": scores,
            "done": np.array(done),
            "scheme": np.array([self.checkpoint_every, self.branching or 0]),
        }
        arrays.update({f"bar_{i}": bar for i, bar in enumerate(bars)})
        with self.model.parameters_set_to(self.initial):
            save_result(
                directory,
                arrays,
                method=PROGRESS_METHOD,
                model=self.model,
                parameters=self.settings(weights),
                data={"train": self.data, "test": test_data},
            )

    def _metagradient_scores(
        self,
        test_data: Any,
        weights: Any,
        measurement: Measurement = LOSS,
        progress_dir: Path | None = None,
    ) -> Array:
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
            # ∇ of the loss-like form m (−f for a raised measurement): θ̄_T, (q, d)
            test_grads = join(
                xp, [g for _, g in model.iter_measurement_grads(test_data, measurement)]
            )
        theta_bar = xp.permute_dims(test_grads, (1, 0))  # (d, q)
        bars = tuple(xp.zeros_like(theta_bar) for _ in kept_states[0][2])
        scores = np.zeros((int(test_grads.shape[0]), self.n))
        done = 0
        if progress_dir is not None and (progress_dir / METADATA).exists():  # a killed pass
            saved = self._load_checked(
                progress_dir, test_data, weights, PROGRESS_METHOD, "reverse pass"
            )
            scheme = [self.checkpoint_every, self.branching or 0]
            if saved.arrays["scheme"].tolist() != scheme:
                raise FingerprintMismatchError(
                    f"{progress_dir} holds a reverse pass in segments of "
                    f"{int(saved.arrays['scheme'][0])} steps (branching "
                    f"{int(saved.arrays['scheme'][1]) or None}), this run's are {scheme[0]} "
                    f"({self.branching}): rerun with the same checkpoint_every and branching"
                )
            native = model.kernels.as_native
            done, scores = int(saved.arrays["done"]), np.array(saved.arrays["scores"])
            theta_bar = native(saved.arrays["theta_bar"], floating=True)
            bars = tuple(native(saved.arrays[f"bar_{i}"], floating=True) for i in range(len(bars)))
        segments = list(reversed(kept_states))
        #: The deepest level of replay the last reverse pass reached (1: the kept states alone).
        self.replay_levels_ = 0
        for index, (start, theta, state) in enumerate(progress(segments, desc="reverse pass")):
            if index < done:  # resumed: this segment's adjoints are in the saved progress
                continue
            stop = min(start + self.checkpoint_every, self.steps)
            theta_bar, bars = self._reverse(
                start, stop, theta, state, w, theta_bar, bars, scores, 1
            )
            if progress_dir is not None and index + 1 < len(segments):
                self._save_progress(
                    progress_dir, index + 1, theta_bar, bars, scores, test_data, weights
                )
        return xp.asarray(-scores, dtype=model.dtype)

    def _reverse(
        self, start: int, stop: int, theta: Array, state: tuple, w: np.ndarray,
        theta_bar: Array, bars: tuple, scores: np.ndarray, level: int,
    ) -> tuple[Array, tuple]:  # fmt: skip
        """The reverse steps stop − 1 … start from the state at ``start``; scores added in place.

        A segment of at most ``branching`` steps (or any, without ``branching``)
        is replayed once, its states kept, and reversed. A longer one is
        replayed once keeping ``branching`` boundary states, and each piece
        is reversed the same way, last first (REPLAY's k-ary scheme).
        """
        xp, k = self.model.xp, self.branching
        self.replay_levels_ = max(self.replay_levels_, level)
        if k is None or stop - start <= k:
            replayed = []  # (θ_t, state_t, g_t) of the segment, recomputed from its first state
            for t in range(start, stop):
                following = self._step(theta, state, t, w)
                replayed.append((theta, state, following[2]))
                theta, state = following[0], following[1]
            for t in reversed(range(start, stop)):
                theta_t, state_t, g_t = replayed[t - start]
                g_bar, direct, bars = self.optimizer.adjoint(
                    xp, theta_t, state_t, g_t, t, theta_bar, bars
                )
                rows, curvature = self._through_the_gradient(theta_t, t, w, g_bar)
                theta_bar = direct + curvature
                scores[:, self.order[t]] += rows
            return theta_bar, bars
        piece = -(-(stop - start) // k)
        boundaries = []  # (t, θ_t, state_t) at start, start + piece, …: at most k states
        for t in range(start, stop):
            if (t - start) % piece == 0:
                boundaries.append((t, theta, state))
            theta, state, _ = self._step(theta, state, t, w)
        for first, theta_first, state_first in reversed(boundaries):
            last = min(first + piece, stop)
            theta_bar, bars = self._reverse(
                first, last, theta_first, state_first, w, theta_bar, bars, scores, level + 1
            )
        return theta_bar, bars

    def top_k(
        self, test_data: Any, k: int = 5, weights: Any = None, *, save_to: str | Path | None = None
    ) -> TopK:
        """The k strongest proponents and opponents of each test point by metagradient.

        The same :class:`~influence_core.TopK` record as every calculator's
        (highest score first; ties to the lower index). The reverse pass
        accumulates every training point's score over the steps it appears
        in, so the (n_test, n_train) scores exist on the host while it runs.
        """
        scores = self.metagradient_scores(test_data, weights, save_to=save_to)
        xp = self.model.xp
        proponents = RunningTopK(xp, min(k, self.n), largest=True)
        opponents = RunningTopK(xp, min(k, self.n), largest=False)
        proponents.update(scores, 0)
        opponents.update(scores, 0)
        return TopK(proponents.indices, proponents.values, opponents.indices, opponents.values)

    def self_influence(self, block_size: int = 128, weights: Any = None) -> Array:
        """τ(zᵢ, zᵢ) = −∂ℓ(zᵢ, θ_T)/∂wᵢ for every training point: shape (n_train,).

        Each block of ``block_size`` training points is a block of test
        measurements of one reverse pass (its (block, n_train) scores are
        read for their diagonal, then dropped): ⌈n / block_size⌉ reverse
        passes in all.
        """
        if block_size < 1:
            raise ValueError(f"block_size must be ≥ 1, got {block_size}")
        values = np.zeros(self.n)
        blocks = range(0, self.n, block_size)
        for start in progress(blocks, desc="self-influence", total=len(blocks)):
            rows = np.arange(start, min(start + block_size, self.n))
            scores = self.model.to_numpy(
                self._metagradient_scores(self._batch(rows), weights, LOSS)
            )
            values[rows] = scores[np.arange(rows.size), rows]
        return self.model.xp.asarray(values, dtype=self.model.dtype)

    def _through_the_gradient(
        self, theta: Array, t: int, w: np.ndarray, g_bar: Array
    ) -> tuple[np.ndarray, Array]:
        """The adjoint ḡ_t (d, q) through g_t: the batch's wᵢ adjoints (q, b) and H_t ḡ_t (d, q)."""
        model, batch = self.model, self.order[t]
        kept = batch[w[batch] == 1.0]
        with model.parameters_set_to(theta):
            products = model.per_sample_grad_products(self._batch(batch), g_bar)  # (b, q)
            rows = model.to_numpy(products).T / batch.size
            curvature = self._curvature(kept, batch.size, g_bar)
        return rows, curvature

    def _curvature(self, kept: np.ndarray, batch_size: int, vectors: Array) -> Array:
        """H_t V of the batch's weighted mean loss (the kept samples' mean × their share)."""
        if kept.size == 0:
            return self.model.xp.zeros_like(vectors)
        hvp = self.model.hvp(self._batch(kept), vectors, batch_size=kept.size)
        return hvp * (kept.size / batch_size)
