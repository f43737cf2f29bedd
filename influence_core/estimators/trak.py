"""TRAK: attribution from projected gradients of an ensemble (Park et al. 2023)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from ..chunk_store import check_manifest, locked
from ..data import Batch, chunks
from ..errors import NotPositiveDefiniteError
from ..host_threads import host_threads
from ..io import FORMAT, data_fingerprint
from ..measurements import probability
from ..model import InfluenceModel
from ..progress import progress
from ..projection import GradientProjector, projected_features, resolve_projector
from .base import Array, InfluenceCalculator
from .trak_features import FeatureStore

__all__ = ["TRAK"]

#: ``weighting(xp, outputs, targets) -> (b,)``: the out-to-loss weight Q of each training point.
Weighting = Callable[[Any, Array, Array], Array]


def one_minus_probability(xp: Any, outputs: Array, targets: Array) -> Array:
    """Q = 1 − softmax(Φ(x))_y = −∂ℓ/∂f for the cross-entropy ℓ and the margin f (TRAK's Q)."""
    return 1.0 - probability().function(xp, outputs, targets)


class TRAK(InfluenceCalculator):
    """TRAK: a linearised, projected, ensembled datamodel of the model's output.

    For each model s of an ensemble (independently trained models, or
    checkpoints of one run), with φ_s(z) = P_sᵀ ∇_θ f(z; θ_s) the projected
    gradient of the measurement f (the margin by default), Φ_s the n × k
    matrix of the training points' φ_s, and Q_s = diag(q_s) the out-to-loss
    weights (q = 1 − p_y for the cross-entropy and the margin)::

        τ(z_test)_i = [ (1/M) Σ_s φ_s(z_test)ᵀ (Φ_sᵀ Φ_s + λI)⁻¹ φ_s(z_i) ] · [ (1/M) Σ_s q_s,i ]

    (Park, Georgiev, Ilyas, Leclerc, Madry, "TRAK: Attributing Model Behavior
    at Scale", ICML 2023, eq. (8)-(9) without the optional soft-thresholding).
    **Positive means proponent**: including z_i raises f(z_test). The
    ensemble average is the paper's; each model s gets its own projection
    (the projector reseeded with ``seed + s``).

    Fitting streams the training data once per model: features are computed
    batch by batch, ΦᵀΦ (k × k) is accumulated in float64 on the host, and
    the features are kept, in memory or, with ``features_dir``, as verified
    chunk files (memory then stays flat in n_train; a killed fit resumes from
    the chunks already written). The k × k inverse is taken on the host in
    float64 (an eigendecomposition); a singular ΦᵀΦ (k > n, or k = d with
    too few points) raises :class:`~influence_core.errors.NotPositiveDefiniteError`
    with its smallest eigenvalue: give ``damping`` λ > 0. Scores stream
    training chunks against the test side φ_s(z_test)ᵀ(Φ_sᵀΦ_s + λI)⁻¹,
    computed once by :meth:`prepare_test`.

    Differences from ``traker`` (``TRAKer``): it divides gradients by √d and
    rescales each model's (ΦᵀΦ)⁻¹ by its mean absolute entry; both are
    constants per model, so with one model the two agree up to a scale, and
    with λ = 0 the √d cancels.

    Args:
        model: the :class:`~influence_core.InfluenceModel`; its weights are the
            one model of the ensemble when ``checkpoints`` is ``None``.
        checkpoints: the ensemble: checkpoints of independently trained models or
            of one run (loaded one at a time; the model is restored afterwards).
        projection_dim: k for a seeded dense Gaussian projection; ``None``
            (with no ``projector``) uses the unprojected gradients (k = d).
        seed: seed of the projection (model s uses ``seed + s``).
        projector: any :class:`~influence_core.projection.GradientProjector`
            (a :class:`~influence_core.projection.KroneckerProjection` for
            per-layer projection from layer statistics).
        damping: λ ≥ 0 added to ΦᵀΦ.
        relative_damping: ρ ≥ 0: λ_s = damping + ρ · tr(Φ_sᵀΦ_s)/k, scale-free. A
            Kronecker projection of a softmax model's margin needs it (its last
            layer's features sum to zero over classes, so ΦᵀΦ is singular).
        measurement: f, the output explained (default ``"margin"``).
        weighting: Q: ``"margin"`` (1 − p_y, for a softmax model trained with
            cross-entropy), ``None`` (Q = 1), or ``weighting(xp, outputs, targets) -> (b,)``.
        features_dir: a directory to keep the training features in (resumable).
        batch_size: batch size for ``(X, y)`` arrays.
        chunk_size: training samples per stored chunk of features.
    """

    def __init__(
        self,
        model: InfluenceModel,
        checkpoints: Sequence[Any] | None = None,
        *,
        projection_dim: int | None = 2048,
        seed: int = 0,
        projector: GradientProjector | None = None,
        damping: float = 0.0,
        relative_damping: float = 0.0,
        measurement: Any = "margin",
        weighting: str | Weighting | None = "margin",
        features_dir: str | Path | None = None,
        batch_size: int | None = None,
        chunk_size: int = 4096,
    ) -> None:
        super().__init__(model, measurement=measurement, batch_size=batch_size)
        if projector is not None:
            projection_dim = None
        self.projector = resolve_projector(projection_dim, seed, projector)
        if checkpoints is not None:
            checkpoints = list(checkpoints)
            if not checkpoints:
                raise ValueError("checkpoints is empty; pass None to use the model's own weights")
        self.checkpoints = checkpoints
        # One projector per model, made once: a dense one keeps its matrix on the device.
        self._projectors = [
            None if self.projector is None else self.projector.reseeded(self.projector.seed + s)
            for s in range(self.num_models)
        ]
        for name, value in (("damping", damping), ("relative_damping", relative_damping)):
            if not (float(value) >= 0.0):
                raise ValueError(f"{name} must be ≥ 0, got {value}")
        self.damping = float(damping)
        self.relative_damping = float(relative_damping)
        if weighting == "margin":
            self.weighting: Weighting | None = one_minus_probability
        elif weighting is None or callable(weighting):
            self.weighting = weighting
        else:
            raise ValueError(
                f"weighting must be 'margin', None or a callable (xp, outputs, targets) -> (b,), "
                f"got {weighting!r}"
            )
        self._weighting_name = (
            weighting if weighting is None or isinstance(weighting, str) else "custom"
        )
        self.features_dir = None if features_dir is None else Path(features_dir)
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = int(chunk_size)

    def get_params(self) -> dict[str, Any]:
        return {
            **super().get_params(),
            "checkpoints": None
            if self.checkpoints is None
            else [
                c if isinstance(c, str) else f"<in memory #{i}>"
                for i, c in enumerate(self.checkpoints)
            ],
            "projector": None if self.projector is None else self.projector.get_params(),
            "damping": self.damping,
            "relative_damping": self.relative_damping,
            "weighting": self._weighting_name,
            "chunk_size": self.chunk_size,
        }

    # -- the ensemble --------------------------------------------------------------------
    @property
    def num_models(self) -> int:
        return 1 if self.checkpoints is None else len(self.checkpoints)

    def _models(self, desc: str | None = None) -> Iterator[tuple[int, GradientProjector | None]]:
        """Load each model in turn (restoring the weights after); yield (s, its projector)."""
        order = range(self.num_models)
        if desc is not None and self.num_models > 1:
            order = progress(order, desc=desc, total=self.num_models)
        for s in order:
            projector = self._projectors[s]
            loading = (
                nullcontext()
                if self.checkpoints is None
                else self.model.checkpoint_loaded(self.checkpoints[s])
            )
            with loading:
                yield s, projector

    def _features(self, projector: GradientProjector | None, batches: Sequence[Batch]) -> Array:
        """φ(z) of the measurement for a run of batches at the loaded weights: (len, k)."""
        if projector is not None:
            return self._stack(projector.features_of(self.model, batches, self.measurement))
        return self._stack(self.model.batch_per_sample_grads(b, self.measurement) for b in batches)

    def _weights(self, batches: Sequence[Batch]) -> Array:
        """Q of each training point at the loaded weights: (len,)."""
        xp = self.xp
        parts = []
        for b in batches:
            if self.weighting is None:
                parts.append(xp.ones((b.size,), dtype=self.model.dtype))
            else:
                outputs = self.model.kernels.outputs(b.inputs)
                parts.append(xp.reshape(self.weighting(xp, outputs, b.targets), (-1,)))
        return self._stack(parts)

    # -- fitting ----------------------------------------------------------------------
    def _fit(self, train_data: Any) -> None:
        store = FeatureStore(self.model, self.features_dir)
        guard = nullcontext() if self.features_dir is None else locked(self.features_dir)
        with guard:
            if self.features_dir is not None:
                check_manifest(
                    self.features_dir,
                    {
                        "format": FORMAT,
                        "run": "trak-features",
                        "settings": self.get_params(),
                        "parameter_names": list(self.model.parameter_names),
                        "train": data_fingerprint(self.model, train_data, self.batch_size),
                    },
                )
            #: (Φ_sᵀΦ_s + λI)⁻¹ per model s: native (k, k).
            self.kernels_: list[Array] = []
            #: The smallest eigenvalue of Φ_sᵀΦ_s per model s.
            self.smallest_eigenvalues_: list[float] = []
            self.dampings_: list[float] = []
            host = self.model.to_numpy
            for s, projector in self._models(desc="TRAK models"):
                store.check_checkpoint(s)
                gram = None
                stream = chunks(self.model.batches(train_data, self.batch_size), self.chunk_size)
                for c, chunk in enumerate(progress(stream, desc=f"TRAK features, model {s}")):
                    start, length = chunk[0].start, sum(b.size for b in chunk)
                    found = store.stored(s, c, start, length)
                    if found is None:
                        features, weights = self._features(projector, chunk), self._weights(chunk)
                        store.put(s, c, start, features, weights)
                    else:
                        features, weights = found
                        if s == 0:
                            store.chunks.append((start, length))
                    block = np.asarray(host(features), dtype=np.float64)
                    gram = block.T @ block if gram is None else gram + block.T @ block
                self.kernels_.append(self._inverse(gram, s))
        self.store_ = store

    def _inverse(self, gram: np.ndarray, s: int) -> Array:
        """(ΦᵀΦ + λI)⁻¹ in float64 on the host (eigh), checked positive definite."""
        with host_threads(self.model):
            values, vectors = np.linalg.eigh(gram)
        self.smallest_eigenvalues_.append(float(values[0]))
        damping = self.damping + self.relative_damping * float(np.trace(gram)) / len(values)
        #: λ_s, the damping each model's kernel was inverted with.
        self.dampings_.append(damping)
        damped = values + damping
        if damped[0] <= 1e-12 * max(float(damped[-1]), 1e-300):
            raise NotPositiveDefiniteError(
                float(values[0]),
                damping,
                how=f"smallest eigenvalue (model {s}, k = {len(values)} features)",
                matrix="feature kernel ΦᵀΦ",
                advice=(
                    "or project to fewer features than training points (projection_dim < n); "
                    "ΦᵀΦ is singular when k exceeds n or the gradients are dependent (a softmax's "
                    "margin gradients sum to zero over its bias)"
                ),
                scale=float(values[-1]),
            )
        inverse = (vectors / damped) @ vectors.T
        return self.model.kernels.as_native(inverse, floating=True)

    # -- scores ------------------------------------------------------------------------
    def prepare_test(self, test_data: Any) -> list[Array]:
        """φ_s(z_test)ᵀ (Φ_sᵀΦ_s + λI)⁻¹ for every model s: a list of (n_test, k)."""
        self._check_fitted()
        xp = self.xp
        prepared = []
        for s, projector in self._models():
            stream = projected_features(
                self.model, test_data, projector, self.measurement, self.batch_size
            )
            test = self._stack(g for _, g in stream)
            prepared.append(xp.matmul(test, self.kernels_[s]))
        return prepared

    def _is_fitted_data(self, train: Any) -> bool:
        return train is self.train_data_

    def _stored_chunks(self) -> Iterator[tuple[int, list[tuple[Array, Array]]]]:
        """(start, [(Φ_s,c, Q_s,c) for every model s]) per stored chunk."""
        for c, (start, _) in enumerate(self.store_.chunks):
            yield start, [self.store_.get(s, c) for s in range(self.num_models)]

    def _fresh_chunks(self, train: Any) -> Iterator[tuple[int, list[tuple[Array, Array]]]]:
        """The same for data the calculator was not fitted on: features taken per chunk."""
        for chunk in chunks(self.model.batches(train, self.batch_size), self.chunk_size):
            per_model = [
                (self._features(projector, chunk), self._weights(chunk))
                for _, projector in self._models()
            ]
            yield chunk[0].start, per_model

    def _chunks_of(self, train: Any) -> Iterator[tuple[int, list[tuple[Array, Array]]]]:
        return self._stored_chunks() if self._is_fitted_data(train) else self._fresh_chunks(train)

    def _mean_weights(self, per_model: list[tuple[Array, Array]]) -> Array:
        total = per_model[0][1]
        for _, weights in per_model[1:]:
            total = total + weights
        return total / self.num_models

    def _scores_from_prepared(self, prepared: Any, train_data: Any) -> Iterator[tuple[int, Array]]:
        xp = self.xp
        for start, per_model in self._chunks_of(train_data):
            total = None
            for test, (features, _) in zip(prepared, per_model, strict=True):
                part = xp.matmul(test, xp.matrix_transpose(features))
                total = part if total is None else total + part
            scale = xp.reshape(self._mean_weights(per_model), (1, -1)) / self.num_models
            yield start, total * scale

    def self_influence(self, train_data: Any = None) -> Array:
        """τ(z_i)_i: (1/M) Σ_s φ_s(z_i)ᵀ(Φ_sᵀΦ_s + λI)⁻¹φ_s(z_i) · q̄_i, shape (n_train,)."""
        xp = self.xp
        train = self.training_data(train_data)
        parts = []
        for _, per_model in self._chunks_of(train):
            total = None
            for s, (features, _) in enumerate(per_model):
                part = xp.sum(xp.matmul(features, self.kernels_[s]) * features, axis=1)
                total = part if total is None else total + part
            parts.append(total * self._mean_weights(per_model) / self.num_models)
        return self._stack(parts)
