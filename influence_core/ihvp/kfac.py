"""K-FAC and EK-FAC: Kronecker-factored curvature per layer, from layer-wise statistics.

For a layer z = a W + b, write ã = [a, 1] (the bias as a constant input) and
g = ∂ℓ/∂z. A sample's gradient of the layer is the matrix
G_i = Σ_t ã_itᵀ g_it ((p_in + 1) × p_out, :mod:`influence_core.layerwise`), and
the Fisher F = E_i[vec G_i vec G_iᵀ] is approximated block-diagonally (one
block per layer) by

* **K-FAC** (Martens and Grosse, ICML 2015; Grosse and Martens, ICML 2016 for
  convolutions): F ≈ A ⊗ S with A = E_{i,t}[ã ãᵀ] (averaged over samples and
  positions) and S = E_i[Σ_t g gᵀ]. With A = Q_A diag(λ_A) Q_Aᵀ and
  S = Q_S diag(λ_S) Q_Sᵀ, (A ⊗ S + λI)⁻¹ vec V = vec(Q_A [(Q_Aᵀ V Q_S) ⊘ (λ_A λ_Sᵀ + λ)] Q_Sᵀ).
* **EK-FAC** (George, Laurent, Bouthillier, Ballas, Vincent, NeurIPS 2018;
  used for influence by Grosse et al. 2023): the same eigenbases, with the
  eigenvalues replaced by the Fisher's own second moments in them,
  Λ = E_i[(Q_Aᵀ G_i Q_S)²] (elementwise square), which is the best diagonal
  in that basis; the same solve with Λ in place of λ_A λ_Sᵀ.

g comes from labels sampled from the model's predictive distribution,
y ~ softmax(Φ(x)) (``fisher="true"``, seeded: the Fisher of the model, which is
the Gauss–Newton matrix for a softmax cross-entropy loss), or from the
training labels (``fisher="empirical"``: E[∇ℓ ∇ℓᵀ], which is what the
per-sample gradients give, and deterministic). Damping λ defaults to 1e-3 for
every layer (:data:`FACTORED_DAMPING`, chosen by LDS on a panel of models);
``damping=None`` takes c × the mean eigenvalue of each layer instead
(kronfluence's heuristic at c = ``relative_damping`` = 0.1). Eigendecompositions run on the host in float64 and are
retried with a growing jitter if LAPACK does not converge (``jitter_`` records
it), so an ill-conditioned factor never fails the fit.

**Low-rank query side** (``query_rank=r``, as kronfluence's
``query_gradient_low_rank``): each test point's solved layer matrix
P = (F̂ + λI)⁻¹ G_test ((p_in + 1) × p_out) is kept as a rank-r factorisation
P_r = L R (on the host in float64: the exact truncated SVD for a small layer,
a seeded randomized range finder with power iterations for a large one, see
:func:`_low_rank`), r (p + o) numbers instead of p o, and a training sample
scores as Σ_t (ã_t L)·(R g_t) without forming P. Its error is recorded exactly:
‖P − P_r‖_F / ‖P‖_F, per layer in ``query_truncation_``: the worst over every
test point solved since the fit, whatever the batches (for the SVD, (Σ_{j>r} σ_j² / Σ_j σ_j²)^{1/2}, the
optimum); the score error of layer l is at most ‖G_train,l‖_F ‖P_l − P_r,l‖_F
(Cauchy–Schwarz). A layer where r (p + o) ≥ p o keeps P whole. Self-influence
does not use it. It saves scoring time on dense layers (T = 1); on a
convolution with many positions T, scoring Σ_t over r-vectors costs more than
the whole matrix does, and the saving is the prepared test side's memory.

Cost: one pass over the data for A and S (K-FAC), two for EK-FAC; memory per
layer, (p_in + 1)² + p_out² for the factors and (p_in + 1) · p_out for Λ,
never per n, and no (b, d) matrix: a solve of k right-hand sides costs two
small matrix products per layer. The backend needs the optional
``layers``/``layer_statistics`` capability (and ``outputs`` for the true
Fisher); every selected parameter must belong to a supported layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import numpy as np
from array_api_compat import device as array_device
from array_api_compat import is_writeable_array

from ..data import Batch
from ..host_threads import host_threads
from ..layerwise import (
    LayerBlock,
    coverage,
    covering_layers,
    embedding_gradients,
    embedding_rows,
    gradients_from_statistics,
    layer_gradient_matrices,
)
from ..model import InfluenceModel
from ..pass_order import is_one_shot
from ..progress import progress
from ..sums import dataset_sum
from ..workspace import Workspace, shared_workspace
from .base import Array, InverseHessianVectorProduct, TrainingSide

__all__ = ["EKFACIHVP", "KFACIHVP"]

Fisher = Literal["true", "empirical"]

#: Default damping λ of K-FAC and EK-FAC, the same for every layer. Chosen on the panel of
#: ``benchmarks/defaults_panel.py`` (docs/choosing.md): within the 95 % interval of the best
#: damping on all four panel models, for both. The former default, 0.1 × each layer's mean
#: eigenvalue (kronfluence's heuristic, ``damping=None``), lost 0.14 LDS on the
#: 0.1M-parameter MLP (0.590 against 0.733) and was outside the interval on three of four.
FACTORED_DAMPING = 1e-3

#: c in λ_l = c × mean(Λ_l) of each layer, when ``damping=None``.
DEFAULT_RELATIVE_DAMPING = 0.1


class KFACIHVP(InverseHessianVectorProduct):
    """(F̂ + λI)⁻¹ with F̂ the block-diagonal Kronecker-factored Fisher (see the module docstring).

    Args:
        damping: λ for every layer (default :data:`FACTORED_DAMPING`, 1e-3); ``None``
            takes ``relative_damping`` × the mean eigenvalue of each layer's curvature.
        relative_damping: c in λ_l = c × mean(Λ_l) when ``damping`` is ``None``.
        fisher: ``"true"`` (labels sampled from the model, seeded) or ``"empirical"``.
        seed: seed of the sampled labels.
        batch_size: batch size for ``(X, y)`` arrays.
        query_rank: keep each solved test layer matrix at this rank (see the
            module docstring); ``None`` keeps it whole.
    """

    #: EK-FAC corrects the eigenvalues with a second pass; K-FAC keeps λ_A λ_Sᵀ.
    corrects_eigenvalues = False

    def __init__(
        self,
        *,
        damping: float | None = FACTORED_DAMPING,
        relative_damping: float = DEFAULT_RELATIVE_DAMPING,
        fisher: Fisher = "true",
        seed: int = 0,
        batch_size: int | None = None,
        query_rank: int | None = None,
    ) -> None:
        super().__init__(damping=0.0 if damping is None else damping, batch_size=batch_size)
        if query_rank is not None and (int(query_rank) != query_rank or query_rank < 1):
            raise ValueError(f"query_rank must be an integer ≥ 1 or None, got {query_rank}")
        self.query_rank = None if query_rank is None else int(query_rank)
        self.damping = None if damping is None else self.damping  # type: ignore[assignment]
        if not (math.isfinite(float(relative_damping)) and relative_damping > 0):
            raise ValueError(
                f"relative_damping must be a finite number > 0, got {relative_damping}"
            )
        self.relative_damping = float(relative_damping)
        if fisher not in ("true", "empirical"):
            raise ValueError(f"fisher must be 'true' or 'empirical', got {fisher!r}")
        self.fisher = fisher
        self.seed = int(seed)

    def get_params(self) -> dict[str, Any]:
        return {
            "damping": self.damping,
            # The rule that set λ when damping is None (so a saved fit says which it was).
            **({"relative_damping": self.relative_damping} if self.damping is None else {}),
            "fisher": self.fisher,
            "seed": self.seed,
            "batch_size": self.batch_size,
            **({} if self.query_rank is None else {"query_rank": self.query_rank}),
        }

    # -- fitting --------------------------------------------------------------------
    def _targets(self, model: InfluenceModel, batch: Batch) -> Array:
        """The labels g is taken at: the training labels, or a seeded sample y ~ softmax(Φ(x))."""
        if self.fisher == "empirical":
            return batch.targets
        xp = model.xp
        if not xp.isdtype(batch.targets.dtype, "integral"):
            raise ValueError(
                "fisher='true' samples class labels from softmax(outputs), for integer class "
                "targets and a cross-entropy loss; for other targets use fisher='empirical'"
            )
        logits = np.asarray(model.to_numpy(model.kernels.outputs(batch.inputs)), np.float64)
        if logits.ndim != 2:
            raise ValueError(
                f"fisher='true' samples one class label per sample from softmax(outputs) of shape "
                f"(b, c), but the model returns shape {logits.shape} (a sequence model?): how its "
                "loss pairs positions with labels (a language model's shift) is the loss's own. "
                "Use fisher='empirical', the Fisher at the training labels"
            )
        p = np.exp(logits - logits.max(axis=1, keepdims=True))  # host copies may be read-only
        p /= p.sum(axis=1, keepdims=True)
        rng = np.random.default_rng([self.seed, batch.start])  # the same labels on every pass
        u = rng.random((p.shape[0], 1))
        sampled = np.minimum((np.cumsum(p, axis=1) < u).sum(axis=1), p.shape[1] - 1)
        return model.kernels.as_native(sampled.astype(np.int64))

    def _statistics(
        self, model: InfluenceModel, batch: Batch, *, checked: bool = True
    ) -> dict[str, tuple[Array, Array]]:
        """One batch's layer statistics at the Fisher's labels; NaN/inf names the samples.

        ``checked=False`` leaves the scan to the pass's sums (:func:`_check_sums`).
        """
        targets = self._targets(model, batch)
        stats = model.layer_statistics(batch, targets=targets)
        if checked and model.check_finite:
            _check_statistics(model, batch, stats)
        return stats

    def settings(self) -> KFACIHVP:
        """An unfitted copy with the same settings (small: what a statistic needs on a worker)."""
        return type(self)(**self.get_params())

    def _fit(self, model: InfluenceModel, data: Any) -> None:
        self.query_truncation_: list[float] | None = None
        blocks = covering_layers(model)
        self.blocks_: list[LayerBlock] = blocks
        # Σ ã ãᵀ and Σ g gᵀ per layer: in this process, or summed over shards (influence_core.sums).
        sums = dataset_sum(model, data, _factor_sums, solver=self.settings())
        n = int(sums["n"])
        self.n_train_ = n
        host = model.to_numpy
        self.eigenvectors_a_, self.eigenvectors_s_ = [], []
        self.eigenvalues_: list[Array] = []
        self.jitter_: list[float] = []
        values_a, values_s = [], []
        native = model.kernels.as_native
        with host_threads(model):  # one layer at a time, with a progress bar (layers done, ETA)
            decompositions = [
                _decompose(block, sums, j, n, host) if block.kronecker else None
                for j, block in enumerate(progress(blocks, desc="K-FAC eigendecompositions"))
            ]
        for j, block in enumerate(blocks):
            if not block.kronecker:  # a diagonal block: E[G²] from the first pass, no bases
                self.jitter_.append(0.0)
                values_a.append(None)
                values_s.append(None)
                self.eigenvectors_a_.append(None)
                self.eigenvectors_s_.append(None)
                continue
            la, qa, jitter_a, ls, qs, jitter_s = decompositions[j]
            self.jitter_.append(max(jitter_a, jitter_s))
            values_a.append(la)
            values_s.append(ls)
            self.eigenvectors_a_.append(None if qa is None else native(qa, floating=True))
            self.eigenvectors_s_.append(native(qs, floating=True))
        diagonal = {j: sums[f"squares.{j}"] / n for j, b in enumerate(blocks) if not b.kronecker}
        del sums
        if self.corrects_eigenvalues:
            corrected = self._corrected_eigenvalues(model, data, blocks)
        else:
            corrected = {
                j: native(np.outer(la, ls), floating=True)
                for j, (la, ls) in enumerate(zip(values_a, values_s, strict=True))
                if la is not None
            }
        self.eigenvalues_ = [{**corrected, **diagonal}[j] for j in range(len(blocks))]
        self.coverage_ = coverage(model)
        self.layer_damping_ = [
            float(self.damping)
            if self.damping is not None
            else self.relative_damping * float(np.mean(np.asarray(host(values), np.float64)))
            for values in self.eigenvalues_
        ]

    def _corrected_eigenvalues(
        self, model: InfluenceModel, data: Any, blocks: list[LayerBlock]
    ) -> dict[int, Array]:
        """Λ = E_i[(Q_Aᵀ G_i Q_S)²] per Kronecker layer j: a second pass over the data (or shards)."""
        if not any(block.kronecker for block in blocks):
            return {}
        sums = dataset_sum(
            model,
            data,
            _eigenvalue_sums,
            solver=self.settings(),
            eigenvectors_a=list(self.eigenvectors_a_),
            eigenvectors_s=list(self.eigenvectors_s_),
        )
        return {
            j: sums[f"squares.{j}"] / self.n_train_ for j, b in enumerate(blocks) if b.kronecker
        }

    # -- saving ---------------------------------------------------------------------
    def _fitted_arrays(self) -> dict[str, Array]:
        arrays = {}
        for j in range(len(self.eigenvalues_)):
            for side in ("a", "s"):  # absent where the basis is I (diagonal and embedding blocks)
                vectors = getattr(self, f"eigenvectors_{side}_")[j]
                if vectors is not None:
                    arrays[f"layer{j}.eigenvectors_{side}"] = vectors
            arrays[f"layer{j}.eigenvalues"] = self.eigenvalues_[j]
        arrays["layer_damping"] = self.model_.kernels.as_native(
            np.asarray(self.layer_damping_, np.float64), floating=True
        )
        return arrays

    def _restore(self, arrays: dict[str, Array]) -> None:
        self.blocks_ = covering_layers(self.model_)
        count = len(self.blocks_)
        self.eigenvectors_a_ = [arrays.get(f"layer{j}.eigenvectors_a") for j in range(count)]
        self.eigenvectors_s_ = [arrays.get(f"layer{j}.eigenvectors_s") for j in range(count)]
        self.eigenvalues_ = [arrays[f"layer{j}.eigenvalues"] for j in range(count)]
        self.layer_damping_ = [float(v) for v in self.model_.to_numpy(arrays["layer_damping"])]
        self.coverage_ = coverage(self.model_)

    # -- solving --------------------------------------------------------------------
    def damped_hvp(self, vectors: Array) -> Array:
        """(F̂ + λI) V: the factored curvature this solver inverts (not the Hessian)."""
        return self._apply(vectors, inverse=False)

    def _solve_block(self, vectors: Array) -> Array:
        return self._apply(vectors, inverse=True)

    def _matrices(self, canonical: Array) -> list[Array]:
        """A canonical block (d, k) as each layer's (k, p_in [+1], p_out) matrices."""
        return list(self._each_matrix(canonical))

    def _each_matrix(self, canonical: Array) -> Iterator[Array]:
        """:meth:`_matrices`, one layer at a time."""
        xp = self.xp
        k = int(canonical.shape[1])
        for block in self.blocks_:
            p_in, p_out = block.layer.inputs, block.layer.outputs
            start = block.kernel_offset
            kernel = xp.reshape(canonical[start : start + p_in * p_out, :], (p_in, p_out, k))
            matrix = xp.permute_dims(kernel, (2, 0, 1))
            if block.bias_offset is not None:
                bias = canonical[block.bias_offset : block.bias_offset + p_out, :]
                matrix = xp.concat([matrix, xp.matrix_transpose(bias)[:, None, :]], axis=1)
            yield matrix

    def _canonical(self, matrices: list[Array]) -> Array:
        """The inverse of :meth:`_matrices`: a canonical block (d, k)."""
        xp = self.xp
        pieces = []
        for block, matrix in zip(self.blocks_, matrices, strict=True):
            p_in, p_out = block.layer.inputs, block.layer.outputs
            k = int(matrix.shape[0])
            kernel = xp.reshape(matrix[:, :p_in, :], (k, p_in * p_out))
            pieces.append((block.kernel_offset, xp.matrix_transpose(kernel)))
            if block.bias_offset is not None:
                pieces.append((block.bias_offset, xp.matrix_transpose(matrix[:, p_in, :])))
        pieces.sort(key=lambda piece: piece[0])
        return xp.concat([piece for _, piece in pieces], axis=0)

    def _rotated(self, matrices: list[Array]) -> list[Array]:
        """Q_Aᵀ G Q_S for each layer's (k, p, o) matrices (a basis that is I is skipped)."""
        return [
            _into_bases(self.xp, m, qa, qs)
            for m, qa, qs in zip(matrices, self.eigenvectors_a_, self.eigenvectors_s_, strict=True)
        ]

    def _back(self, rotated: list[Array]) -> list[Array]:
        """Q_A R Q_Sᵀ: the inverse of :meth:`_rotated`."""
        return [
            _out_of_bases(self.xp, r, qa, qs)
            for r, qa, qs in zip(rotated, self.eigenvectors_a_, self.eigenvectors_s_, strict=True)
        ]

    def _scales(self) -> list[Array]:
        return [self._scale(j) for j in range(len(self.eigenvalues_))]

    def _scale(self, j: int) -> Array:
        """Λ + λ of layer j, in its eigenbasis."""
        return self.eigenvalues_[j] + self.layer_damping_[j]

    def _apply(self, vectors: Array, *, inverse: bool) -> Array:
        self._check_fitted()
        model = self.model_
        rotated = self._rotated(self._matrices(model.to_canonical(vectors)))
        scaled = [r / s if inverse else r * s for r, s in zip(rotated, self._scales(), strict=True)]
        return model.from_canonical(self._canonical(self._back(scaled)))

    # -- matrix functions of the fitted curvature (approximate unrolling) ----------------
    def layer_matrices(self, grads: Array) -> list[Array]:
        """Gradients (b, d) in θ order as each layer's (b, p_in [+1], p_out) matrices."""
        self._check_fitted()
        return self._matrices(self.model_.to_canonical(self.xp.matrix_transpose(grads)))

    def spectral(self, matrices: list[Array], function: Callable[[Array], Array]) -> list[Array]:
        """Q φ(Λ + λ) Qᵀ applied to each layer's (k, p, o) matrices: φ elementwise on the damped
        eigenvalues in each layer's eigenbasis (EK-FAC: the corrected ones). φ(s) = 1/s is the solve.
        """
        self._check_fitted()
        rotated = self._rotated(matrices)
        return self._back([r * function(s) for r, s in zip(rotated, self._scales(), strict=True)])

    def layer_matrix(self, model: InfluenceModel, j: int, stats: dict[str, Any]) -> Array:
        """Layer j's per-sample gradient matrices (b, p_in [+1], p_out) from a batch's statistics
        (an embedding's rows placed by ``segment_sum``, never a one-hot product): one layer at
        a time, never the batch's (b, d)."""
        block = self.blocks_[j]
        if block.kind == "embedding":
            return embedding_gradients(model, block, stats)
        return layer_gradient_matrices(self.xp, [block], stats)[0]

    def layer_spectral(self, j: int, matrix: Array, function: Callable[[Array], Array]) -> Array:
        """:meth:`spectral` of layer j alone: Q φ(Λ + λ) Qᵀ on its (k, p, o) matrices."""
        xp, qa, qs = self.xp, self.eigenvectors_a_[j], self.eigenvectors_s_[j]
        return _out_of_bases(xp, _into_bases(xp, matrix, qa, qs) * function(self._scale(j)), qa, qs)

    def flattened(self, matrices: list[Array]) -> Array:
        """Each layer's (k, p, o) matrices flattened layer after layer, (m, k): what
        :meth:`training_side` scores meet (the layout of :meth:`solved_test_side`)."""
        return self._flat(matrices)

    # -- the layer-wise form the calculators use -------------------------------------------
    # The test side is (F̂ + λI)⁻¹ g_test as each layer's (p_in [+1], p_out) matrix, flattened
    # layer after layer to (d, n_test). A training batch then scores layer by layer,
    # Σ_l vec(G_l)ᵀ P_l, with G_l = Σ_t ã_tᵀ g_t from the layer-wise statistics: one layer's
    # per-sample gradients exist at a time, never the batch's (b, d).
    def _flat(self, matrices: list[Array]) -> Array:
        xp = self.xp
        k = int(matrices[0].shape[0])
        return xp.matrix_transpose(xp.concat([xp.reshape(m, (k, -1)) for m in matrices], axis=1))

    def query_ranks(self) -> list[int | None]:
        """Per layer, the rank its solved test matrices are kept at (``None``: whole)."""
        self._check_fitted()
        ranks: list[int | None] = []
        for block in self.blocks_:
            p, o = block.rows, block.layer.outputs
            low = self.query_rank is not None and block.kind in ("dense", "conv2d")
            r = min(self.query_rank, p, o) if low else None
            ranks.append(r if r is not None and r * (p + o) < p * o else None)
        return ranks

    def test_side(self, grads: Array) -> Array:
        """(F̂ + λI)⁻¹ gᵢ as per-layer matrices, flattened: shape (m, n) for gradients (n, d).

        m = d when whole; with ``query_rank`` a layer contributes its factors
        L ((p, r), σ folded in) and R ((r, o)) instead, r (p + o) rows.
        """
        self._check_fitted()
        canonical = self.model_.to_canonical(self.xp.matrix_transpose(grads))
        matrices = self._each_matrix(canonical)
        return self._flattened(self._solve_matrix(j, m) for j, m in enumerate(matrices))

    def solved_test_side(
        self, model: InfluenceModel, batch: Any, measurement: Any, *, joint: bool = False
    ) -> Array:
        """:meth:`test_side` of a test batch, straight from its layer statistics.

        Each layer's gradient matrices are built, solved and flattened in turn:
        the batch's (b, d) gradients and their canonical copy never exist. An
        embedding is solved on its nonzero rows (one per (sample, token) pair,
        at most b·T) and placed once, so the peak is the solved block and one
        layer's temporaries.

        ``joint=True`` leaves each whole dense and convolution layer in its
        eigenbasis, P̃ = (Q_Aᵀ G Q_S) ⊘ (Λ + λ) = Q_Aᵀ P Q_S (the rotation back
        is skipped): what :meth:`_LayerwiseTrainingSide.scores_and_quadratic_forms`
        meets with a training sample's R_i = Q_Aᵀ G_i Q_S, the rotation its
        self-influence needs anyway. Other blocks are as without it.
        """
        self._check_fitted()
        stats = model.layer_statistics(batch, measurement)
        if model.check_finite:
            _check_statistics(model, batch, stats)
        return self._flattened(
            self._solve_layer(model, j, block, stats, joint) for j, block in enumerate(self.blocks_)
        )

    def allocated_test_side(self, n: int) -> Array | None:
        """An (m, n) block in the namespace when its arrays are writeable (torch, NumPy).

        Left uninitialised (``empty``): every row is written, and columns past the
        test points (n is an upper bound for a loader) are sliced off.
        """
        self._check_fitted()
        like = self._scale(0)
        if not is_writeable_array(self.xp.zeros((1,), dtype=like.dtype, device=array_device(like))):
            return None
        rows = sum(
            block.rows * block.layer.outputs
            if rank is None
            else rank * (block.rows + block.layer.outputs)
            for block, rank in zip(self.blocks_, self.query_ranks(), strict=True)
        )
        return self.xp.empty((rows, n), dtype=like.dtype, device=array_device(like))

    def solved_test_side_into(
        self,
        model: InfluenceModel,
        batch: Any,
        measurement: Any,
        out: Array,
        column: int,
        *,
        joint: bool = False,
    ) -> None:
        """:meth:`solved_test_side`, each layer written into ``out`` as it is solved."""
        self._check_fitted()
        stats = model.layer_statistics(batch, measurement)
        if model.check_finite:
            _check_statistics(model, batch, stats)
        solved = (
            self._solve_layer(model, j, block, stats, joint) for j, block in enumerate(self.blocks_)
        )
        self._flattened(solved, out=out, column=column)

    def _joined(self, j: int) -> bool:
        """Whether the joint pass scores layer j in its eigenbasis.

        A whole (not low-rank) dense or convolution layer, with two bases (an
        embedding's Q_A is I), and training sides that are the layer-wise ones
        (a subclass scoring through per-sample gradients keeps the usual block).
        """
        block = self.blocks_[j]
        return (
            type(self).training_side is KFACIHVP.training_side
            and self.query_ranks()[j] is None
            and block.kind in ("dense", "conv2d")
            and self.eigenvectors_a_[j] is not None
        )

    def _solve_matrix(self, j: int, matrix: Array) -> Array:
        """(F̂_j + λI)⁻¹ for layer j's (k, p, o) matrices: Q_A ((Q_Aᵀ M Q_S) ⊘ (Λ + λ)) Q_Sᵀ."""
        xp, qa, qs = self.xp, self.eigenvectors_a_[j], self.eigenvectors_s_[j]
        return _out_of_bases(xp, _into_bases(xp, matrix, qa, qs) / self._scale(j), qa, qs)

    def _solve_layer(
        self,
        model: InfluenceModel,
        j: int,
        block: LayerBlock,
        stats: dict[str, Any],
        joint: bool = False,
    ) -> Array:
        """Layer j's solved test matrices (k, p, o) from the batch's statistics (``joint``: P̃).

        A Kronecker layer is rotated as the training side is (:func:`_rotated_matrices`:
        the statistics first when T (p² + o²) < p² o + p o², 4x fewer multiply-adds
        on the transformer's 1024-wide layers than rotating the formed G).
        """
        if block.kind != "embedding":
            qa, qs = self.eigenvectors_a_[j], self.eigenvectors_s_[j]
            if not (block.kronecker and qa is not None):
                return self._solve_matrix(j, layer_gradient_matrices(self.xp, [block], stats)[0])
            solved = _rotated_matrices(self.xp, block, stats, qa, qs)
            solved /= self._scale(j)  # in place: a fresh product (an immutable namespace rebinds)
            if joint and self._joined(j):
                return solved
            return _out_of_bases(self.xp, solved, qa, qs)
        xp, qs = self.xp, self.eigenvectors_s_[j]  # Q_A = I: each token's row is solved alone
        indices, g = stats[block.layer.name]
        b, rows, width = int(g.shape[0]), block.rows, block.layer.outputs
        samples, tokens, summed = embedding_rows(model, indices, g)
        scale = xp.take(self._scale(j), tokens, axis=0)
        solved = _out_of_bases(xp, _into_bases(xp, summed, None, qs) / scale, None, qs)
        placed = model.kernels.segment_sum(solved, samples * rows + tokens, b * rows)
        return xp.reshape(placed, (b, rows, width))

    def _flattened(
        self, solved: Iterable[Array], out: Array | None = None, column: int = 0
    ) -> Array:
        """Each layer's solved (k, p, o) matrices (factored with ``query_rank``), flattened (m, k).

        Layers arrive one at a time, so only one layer's temporaries are alive
        beside the pieces already flattened. Given ``out`` (writeable, (m, ·)),
        each layer is written into ``out[:, column : column + k]`` instead, and
        no pieces are kept.
        """
        xp, pieces, truncation, row = self.xp, [], [], 0
        for matrix, rank in zip(solved, self.query_ranks(), strict=True):
            k = int(matrix.shape[0])
            if rank is None:
                blocks = [xp.reshape(matrix, (k, -1))]
                truncation.append(0.0)
            else:
                left, right, error = _low_rank(self.model_, matrix, rank)
                blocks = [xp.reshape(left, (k, -1)), xp.reshape(right, (k, -1))]
                truncation.append(error)
            if out is None:
                pieces += blocks
                continue
            for block in blocks:
                size = int(block.shape[1])
                out[row : row + size, column : column + k] = xp.matrix_transpose(block)
                row += size
        if self.query_rank is not None:  # the worst over every test batch solved since the fit
            seen = getattr(self, "query_truncation_", None)
            self.query_truncation_ = (
                truncation
                if seen is None
                else [max(a, b) for a, b in zip(seen, truncation, strict=True)]
            )
        if out is not None:
            return out
        return xp.matrix_transpose(xp.concat(pieces, axis=1))

    def train_side(self, grads: Array) -> Array:
        """Gradients (b, d) as per-layer matrices, flattened like :meth:`test_side`: (b, d)."""
        self._check_fitted()
        if self.query_rank is not None:
            raise ValueError(
                "with query_rank the test side holds low-rank factors, not matrices a flat "
                "gradient can meet; score training batches through training_side()"
            )
        xp = self.xp
        matrices = self._matrices(self.model_.to_canonical(xp.matrix_transpose(grads)))
        return xp.matrix_transpose(self._flat(matrices))

    def test_gradients(self, model: InfluenceModel, batch: Any, measurement: Any) -> Array:
        """The test batch's gradients from its layer statistics (one forward and backward, no vmap)."""
        stats = model.layer_statistics(batch, measurement)
        if model.check_finite:
            _check_statistics(model, batch, stats)
        return gradients_from_statistics(model, covering_layers(model), stats)

    def training_side(self, model: InfluenceModel, batch: Any) -> TrainingSide:
        """A training batch from its layer-wise statistics (at its own labels): no (b, d) gradients.

        Its statistics are not scanned for NaN/inf here: every product it gives
        is checked per layer and names the samples (``_check``), and NaN/inf in
        a statistic reaches that product. Scanning the statistics as well read
        every patch of every convolution once more per batch (about 0.2x a
        plain pass of the conv net in ``benchmarks/bench_layerwise.py``).
        """
        self._check_fitted()
        stats = model.layer_statistics(batch, deferred=True)
        return _LayerwiseTrainingSide(self, model, batch, stats)


class _LayerwiseTrainingSide(TrainingSide):
    """One training batch as layer statistics; each layer's G = Σ_t ãᵀg is formed when needed."""

    def __init__(
        self, solver: KFACIHVP, model: InfluenceModel, batch: Batch, stats: dict[str, Any]
    ) -> None:
        self.solver, self.model, self.batch, self.stats = solver, model, batch, stats
        self.xp = solver.xp
        # The (b, p, o) products of every batch of this pass, in one reused buffer.
        self.workspace = shared_workspace(solver, model)

    def scores(self, solved: Array) -> Array:
        """Σ_l vec(G_l)ᵀ P_l, one layer at a time: shape (n_test, b).

        A layer applied once per sample (T = 1: dense on vectors) never forms G_l:
        vec(ã gᵀ)ᵀ vec(P) = ãᵀ P g, so its scores are (ã P) ⊙ g summed over the
        outputs, O(b p o n) with no (b, p, o) array. With T > 1 positions,
        forming G_l (b p o T) and one product (b p o n) is cheaper than T of those.
        A low-rank layer (P = L R) scores Σ_t (ã_t L)·(R g_t): O(b T r (p + o) n).
        """
        xp, total, start = self.xp, None, 0
        n = int(solved.shape[1])
        for block, rank in zip(self.solver.blocks_, self.solver.query_ranks(), strict=True):
            size = _layer_size(block, rank)
            part = self._layer_scores(block, rank, solved[start : start + size, :], n)
            start += size
            self._check(part, block)  # NaN/inf in the statistics, or overflow in the products
            total = part if total is None else total + part
        return xp.matrix_transpose(total)

    def scores_and_quadratic_forms(self, joint: Array) -> tuple[Array, Array]:
        """Σ_l ⟨R_il, P̃_l⟩ and Σ_l ‖R_il ⊙ (Λ_l + λ)^(-1/2)‖², R_il = Q_Aᵀ G_il Q_S, from one rotation.

        ``joint`` is :meth:`KFACIHVP.solved_test_side` with ``joint=True``, where a
        dense or convolution layer's rows hold P̃ = Q_Aᵀ P Q_S, and ⟨R_i, P̃⟩ = ⟨G_i, P⟩
        (the bases are orthogonal). Over positions (T > 1) R_i (b, p, o) is
        formed once, meets P̃ in one product (b p o n), and is then scaled in
        place for the self-influence; :meth:`scores` and :meth:`quadratic_forms`
        apart form G_i = Σ_t ãᵀg as well (T p o per sample). Applied once per
        sample (T = 1), R_i = u vᵀ with u = Q_Aᵀ ã and v = Q_Sᵀ g: the scores are
        (u P̃) · v and the self-influence Σ (u² W) v², W = 1 ⊘ (Λ + λ). Every
        other block is scored as :meth:`scores` and :meth:`quadratic_forms` do.
        """
        solver, xp = self.solver, self.xp
        n, start, scores, forms = int(joint.shape[1]), 0, None, None
        for j, (block, rank) in enumerate(zip(solver.blocks_, solver.query_ranks(), strict=True)):
            size = _layer_size(block, rank)
            rows = joint[start : start + size, :]
            start += size
            weights = 1.0 / solver._scale(j)
            if solver._joined(j):
                score, form = self._joint_layer(j, block, rows, weights)
            else:
                score = self._layer_scores(block, rank, rows, n)
                qa, qs = solver.eigenvectors_a_[j], solver.eigenvectors_s_[j]
                form = _rotated_squares(
                    self.model, block, self.stats, qa, qs, weights, self.workspace
                )
            self._check(score, block)
            self._check(xp.reshape(form, (-1, 1)), block)
            scores = score if scores is None else scores + score
            forms = form if forms is None else forms + form
        return xp.matrix_transpose(scores), forms

    def _joint_layer(
        self, j: int, block: LayerBlock, rotated_test: Array, weights: Array
    ) -> tuple[Array, Array]:
        """A dense or convolution layer's (scores (b, n), self-influence (b,)) in its eigenbasis."""
        xp, solver = self.xp, self.solver
        qa, qs = solver.eigenvectors_a_[j], solver.eigenvectors_s_[j]
        n = int(rotated_test.shape[1])
        pair = _rank_one_rotations(xp, block, self.stats, qa, qs)
        if pair is not None:
            u, v = pair
            b, o = int(u.shape[0]), block.layer.outputs
            test = xp.reshape(rotated_test, (block.rows, o * n))
            projected = xp.reshape(xp.matmul(u, test), (b, o, n))
            return (
                xp.sum(projected * v[:, :, None], axis=1),
                xp.sum(xp.matmul(u * u, weights) * (v * v), axis=1),
            )
        rotated = _rotated_matrices(xp, block, self.stats, qa, qs, self.workspace)
        b = int(rotated.shape[0])
        score = xp.matmul(xp.reshape(rotated, (b, -1)), rotated_test)
        rotated *= xp.sqrt(weights)  # in place, after the product (an immutable namespace rebinds)
        flat = xp.reshape(rotated, (b, 1, -1))
        return score, xp.matmul(flat, xp.matrix_transpose(flat))[:, 0, 0]

    def _layer_scores(self, block: LayerBlock, rank: int | None, rows: Array, n: int) -> Array:
        """One layer's scores (b, n) against its rows of the solved test block."""
        if rank is None:
            return self._whole_scores(block, rows, n)
        p = block.rows
        return self._low_rank_scores(block, rows[: p * rank, :], rows[p * rank :, :], rank, n)

    def _inputs(self, block: LayerBlock) -> Array:
        """ã, the layer's inputs with the bias's constant 1 appended: (b, T, p)."""
        xp = self.xp
        a = self.stats[block.layer.name][0]
        if block.bias_offset is None:
            return a
        ones = xp.ones((int(a.shape[0]), int(a.shape[1]), 1), dtype=a.dtype)
        return xp.concat([a, ones], axis=2)

    def _whole_scores(self, block: LayerBlock, P: Array, n: int) -> Array:
        xp = self.xp
        if block.kind == "embedding":
            return self._embedding_scores(block, P, n)
        if n == 1 and self.stats.deferred_input(block.layer.name) is not None:
            return self._mapped_scores(block, P)
        a, g = self.stats[block.layer.name]
        if block.kronecker and int(a.shape[1]) == 1:
            b, p_out = int(a.shape[0]), block.layer.outputs
            projected = xp.reshape(
                xp.matmul(self._inputs(block)[:, 0, :], xp.reshape(P, (block.rows, p_out * n))),
                (b, p_out, n),
            )
            return xp.sum(projected * g[:, 0, :, None], axis=1)  # (b, n)
        if block.kronecker:  # kernel and bias scored apart: no concatenated (b, p + 1, o) copy
            b, size = int(a.shape[0]), block.layer.inputs * block.layer.outputs
            kernel = xp.reshape(self.workspace.matmul(xp.matrix_transpose(a), g), (b, size))
            scores = xp.matmul(kernel, P[:size, :])
            if block.bias_offset is None:
                return scores
            return scores + xp.matmul(xp.sum(g, axis=1), P[size:, :])
        (matrix,) = layer_gradient_matrices(xp, [block], self.stats)
        return xp.matmul(xp.reshape(matrix, (int(matrix.shape[0]), -1)), P)

    def _mapped_scores(self, block: LayerBlock, P: Array) -> Array:
        """A convolution's scores against one test point, its patches never formed: (b, 1).

        Σ_t (a_t K) · g_t + (Σ_t g_t) · P_bias, with a_t K over every position t
        the layer's own convolution of its input by the solved kernel K
        (:meth:`~influence_core.plugin.ModelKernels.conv2d_map`, b·T·p·o
        multiply-adds, as many as forming G). Against n test points the
        convolution costs n times that, and forming G once from the patches
        was faster already at two (``benchmarks/bench_layerwise.py``: 1.75-2.27x
        the plain pass through two maps, 1.63-1.76x through G).
        """
        xp, layer = self.xp, block.layer
        name, size = layer.name, layer.inputs * layer.outputs
        g = self.stats.gradients(name)
        kernel = xp.reshape(P[:size, :], (layer.inputs, layer.outputs))
        mapped = self.model.kernels.conv2d_map(layer, self.stats.deferred_input(name), kernel)
        b = int(g.shape[0])
        scores = xp.sum(xp.reshape(mapped * g, (b, -1)), axis=1)[:, None]
        if block.bias_offset is None:
            return scores
        return scores + xp.matmul(xp.sum(g, axis=1), P[size:, :])

    def _embedding_scores(self, block: LayerBlock, P: Array, n: int) -> Array:
        """vec(G_i)ᵀ P for an embedding, G_i = Σ_t e_{a_it} g_itᵀ: shape (b, n).

        A table with no more rows than a sample has positions (a positional
        table) forms its dense per-sample gradients (b, rows · width), no larger
        than g, and meets P in one product. A larger one (a vocabulary) never
        does: each (sample, token) pair's summed row r_u meets the rows of P
        for its token, Σ_u r_uᵀ P[token_u] (one batched product), summed per
        sample. A token repeated within a sample is gathered once.
        """
        xp, model = self.xp, self.model
        indices, g = self.stats[block.layer.name]
        b, rows, width = int(g.shape[0]), block.rows, block.layer.outputs
        if rows <= int(g.shape[1]):
            dense = embedding_gradients(model, block, self.stats)
            return xp.matmul(xp.reshape(dense, (b, rows * width)), P)
        samples, tokens, summed = embedding_rows(model, indices, g)
        table = xp.reshape(P, (rows, width * n))
        # The gathered rows in chunks of at most _GATHER_ENTRIES: at b = 32, T = 64,
        # width 256 and 50 test points one gather was 105 MB, new pages every batch.
        pairs = int(tokens.shape[0])
        step = max(1, _GATHER_ENTRIES // max(width * n, 1))
        per_pair = xp.concat(
            [
                xp.matmul(
                    summed[start : start + step, None, :],
                    xp.reshape(
                        xp.take(table, tokens[start : start + step], axis=0), (-1, width, n)
                    ),
                )[:, 0, :]
                for start in range(0, pairs, step)
            ],
            axis=0,
        )
        return model.kernels.segment_sum(per_pair, samples, b)

    def _low_rank_scores(
        self, block: LayerBlock, left: Array, right: Array, rank: int, n: int
    ) -> Array:
        """Σ_t Σ_r (ã_t L)_r (R g_t)_r per test point, with L (p, r) and R (r, o) per column."""
        xp = self.xp
        a = self._inputs(block)
        g = self.stats[block.layer.name][1]
        b, T = int(a.shape[0]), int(a.shape[1])
        p, o = block.rows, block.layer.outputs
        # left: (p·r, n) → (p, r·n); right: (r·o, n) → (r, o, n) → (o, r·n).
        L = xp.reshape(left, (p, rank * n))
        R = xp.reshape(xp.permute_dims(xp.reshape(right, (rank, o, n)), (1, 0, 2)), (o, rank * n))
        aL = xp.matmul(xp.reshape(a, (b * T, p)), L)  # (b T, r n)
        gR = xp.matmul(xp.reshape(g, (b * T, o)), R)
        return xp.sum(xp.reshape(aL * gR, (b, T * rank, n)), axis=1)

    def _check(self, values: Array, block: LayerBlock) -> None:
        """NaN/inf in a layer's scores or quadratic forms (b, ·) names the samples."""
        if self.model.check_finite and not self.model._all_finite(values):
            flat = self.xp.reshape(values, (int(values.shape[0]), -1))
            raise self.model.non_finite_error(
                f"per-sample gradients of layer {block.layer.name!r}",
                self.model._bad_rows(flat, self.batch.start),
            )

    def _weighted(self, power: int) -> Array:
        """Σ_l Σ_jk R_jk² / (Λ + λ)_jk^power per sample, R = Q_Aᵀ G_l Q_S: shape (b,)."""
        solver, xp, total = self.solver, self.xp, None
        for j, (block, scale) in enumerate(zip(solver.blocks_, solver._scales(), strict=True)):
            qa, qs = solver.eigenvectors_a_[j], solver.eigenvectors_s_[j]
            part = _rotated_squares(
                self.model, block, self.stats, qa, qs, 1.0 / scale**power, self.workspace
            )
            self._check(xp.reshape(part, (-1, 1)), block)
            total = part if total is None else total + part
        return total

    def quadratic_forms(self) -> Array:
        """Σ_l Σ (Q_Aᵀ G_l Q_S)² ⊘ (Λ + λ): gᵀ (F̂ + λI)⁻¹ g without forming it."""
        return self._weighted(1)

    def solved_norms(self) -> Array:
        return self.xp.sqrt(self._weighted(2))


#: The most entries of the solved block an embedding's pairwise scores gather at once
#: (2²¹ floats, 8 MiB in float32: below the C allocator's mmap threshold, so the
#: chunks reuse memory instead of taking new pages; see :mod:`influence_core.workspace`).
_GATHER_ENTRIES = 1 << 21
#: Test matrices converted to the host at once in :func:`_low_rank` (bounds its memory).
_LOW_RANK_CHUNK = 8
#: Oversampling and power iterations of the randomized range finder (Halko et al. 2011).
_OVERSAMPLE, _POWER_ITERATIONS = 10, 2


def _low_rank(model: InfluenceModel, matrices: Array, rank: int) -> tuple[Array, Array, float]:
    """Rank-r factors of each (p, o) matrix: L (k, p, r) with σ folded in, R (k, r, o).

    On the host in float64, ``_LOW_RANK_CHUNK`` matrices at a time. A matrix
    with min(p, o) ≤ 2 (r + oversampling) takes the exact truncated SVD
    (Eckart–Young: the best rank r). A larger one takes a seeded randomized
    range finder with two power iterations (Halko, Martinsson, Tropp 2011):
    Q spans (P Pᵀ)² P Ω, and L R is the best rank-r factorisation of Q Qᵀ P,
    at O(p o r) instead of O(p o min(p, o)); its error is within a small
    factor of the optimum. Either way the recorded error is the exact one of
    the factors returned, ‖P − L R‖_F / ‖P‖_F (from the dropped singular values
    for the SVD, from the residual for the range finder); the worst over the
    k matrices is returned.
    """
    native = model.kernels.as_native
    k = int(matrices.shape[0])
    lefts, rights, worst = [], [], 0.0
    rng = np.random.default_rng(0)
    for begin in range(0, k, _LOW_RANK_CHUNK):
        host = np.asarray(model.to_numpy(matrices[begin : begin + _LOW_RANK_CHUNK]), np.float64)
        p, o = host.shape[1], host.shape[2]
        if min(p, o) <= 2 * (rank + _OVERSAMPLE):
            u, sigma, vt = np.linalg.svd(host, full_matrices=False)
            left, right = u[:, :, :rank] * sigma[:, None, :rank], vt[:, :rank, :]
            dropped, total = np.sum(sigma[:, rank:] ** 2, axis=1), np.sum(sigma**2, axis=1)
        else:
            omega = rng.standard_normal((o, rank + _OVERSAMPLE))
            basis = np.linalg.qr(host @ omega)[0]
            for _ in range(_POWER_ITERATIONS):
                basis = np.linalg.qr(np.swapaxes(host, 1, 2) @ basis)[0]
                basis = np.linalg.qr(host @ basis)[0]
            small = np.swapaxes(basis, 1, 2) @ host  # (c, r + oversampling, o)
            u, sigma, vt = np.linalg.svd(small, full_matrices=False)
            left = (basis @ u[:, :, :rank]) * sigma[:, None, :rank]
            right = vt[:, :rank, :]
            dropped = np.sum((host - left @ right) ** 2, axis=(1, 2))
            total = np.sum(host**2, axis=(1, 2))
        error = np.sqrt(dropped / np.where(total > 0, total, 1.0))
        worst = max(worst, float(error.max()))
        lefts.append(native(np.ascontiguousarray(left), floating=True))
        rights.append(native(np.ascontiguousarray(right), floating=True))
    xp = model.xp
    return xp.concat(lefts, axis=0), xp.concat(rights, axis=0), worst


def _factor_sums(model: InfluenceModel, data: Any, *, solver: KFACIHVP) -> dict[str, Any]:
    """The statistic of K-FAC's first pass: Σ ã ãᵀ, Σ g gᵀ and the positions per layer, and n."""
    xp = model.xp
    blocks = covering_layers(model)
    sums: dict[str, Any] = {"n": 0}
    batches = model.batches(data, solver.batch_size, whole=True)  # statistics: no (b, d)
    total = model.num_batches(data, solver.batch_size)
    scanned = is_one_shot(data)  # read once: scanned as it goes, to name the samples
    for batch in progress(batches, desc="K-FAC factors", total=total):
        stats = solver._statistics(model, batch, checked=scanned)  # else its sums are checked
        for j, block in enumerate(blocks):
            a, g = stats[block.layer.name]
            if not block.kronecker:  # the diagonal block's E[G²], exactly
                (matrix,) = layer_gradient_matrices(xp, [block], stats)
                _add(sums, f"squares.{j}", xp.sum(matrix * matrix, axis=0))
                continue
            rows = int(a.shape[0]) * int(a.shape[1])
            g = xp.reshape(g, (rows, block.layer.outputs))
            if block.kind == "embedding":  # A = E[e eᵀ] is diagonal: the token counts
                ones = xp.ones((rows, 1), dtype=g.dtype)
                aa = model.kernels.segment_sum(ones, xp.reshape(a, (rows,)), block.layer.inputs)
                _add(sums, f"a.{j}", aa)
            else:
                # aᵀa as its upper strips, and with a bias Σ_t ã_t: the bias column [ã, 1]
                # is joined on the host (_factor), not copied into every batch's inputs.
                a = xp.reshape(a, (rows, block.layer.inputs))
                for i, strip in enumerate(_gram_strips(xp, a)):
                    _add(sums, f"a.{j}.{i}", strip)
                if block.bias_offset is not None:
                    _add(sums, f"a.{j}.sum", xp.sum(a, axis=0))
            for i, strip in enumerate(_gram_strips(xp, g)):
                _add(sums, f"s.{j}.{i}", strip)
            sums[f"positions.{j}"] = sums.get(f"positions.{j}", 0) + rows
        sums["n"] += batch.size
    _check_sums(model, data, solver, sums, "K-FAC's factors", scanned=scanned)
    return sums


def _eigenvalue_sums(
    model: InfluenceModel,
    data: Any,
    *,
    solver: KFACIHVP,
    eigenvectors_a: list[Array],
    eigenvectors_s: list[Array],
) -> dict[str, Any]:
    """The statistic of EK-FAC's second pass: Σ_i (Q_Aᵀ G_i Q_S)² per layer."""
    blocks = covering_layers(model)
    sums: dict[str, Any] = {}
    workspace = Workspace(model)  # every batch's R_i in one buffer
    batches = model.batches(data, solver.batch_size, whole=True)  # statistics: no (b, d)
    total = model.num_batches(data, solver.batch_size)
    for batch in progress(batches, desc="EK-FAC eigenvalues", total=total):
        stats = solver._statistics(model, batch, checked=False)  # the sums are checked
        for j, block in enumerate(blocks):
            if block.kronecker:
                square = _summed_rotated_squares(
                    model, block, stats, eigenvectors_a[j], eigenvectors_s[j], workspace
                )
                _add(sums, f"squares.{j}", square)
    _check_sums(model, data, solver, sums, "EK-FAC's eigenvalues", scanned=False)
    return sums


def _check_sums(
    model: InfluenceModel,
    data: Any,
    solver: KFACIHVP,
    sums: dict[str, Any],
    what: str,
    *,
    scanned: bool,
) -> None:
    """NaN/inf in a pass's statistics, found in its sums; the samples named by a second scan.

    NaN or infinity in any sample's inputs or output gradients reaches the
    sums of that pass (a Gram's diagonal holds Σ a², an eigenvalue sum Σ R²),
    so one check of each layer's sums per pass replaces a scan of every batch's
    statistics (on the 5.2M transformer that scan read each layer's inputs
    and output gradients once more, per batch). Only when a sum is not finite
    is the data read again, batch by batch, to name the samples
    (:func:`_check_statistics`); finite statistics whose sums are not
    overflowed them. Data that can be read only once (a generator) was
    ``scanned`` batch by batch as it went, as before.
    """
    if not model.check_finite:
        return
    bad = sorted(
        {
            int(key.split(".")[1])
            for key, value in sums.items()
            if key != "n" and not key.startswith("positions.") and not model._all_finite(value)
        }
    )
    if not bad:
        return
    blocks = covering_layers(model)
    names = [blocks[j].layer.name or "(the model itself)" for j in bad]
    if not scanned:
        for batch in model.batches(data, solver.batch_size, whole=True):
            _check_statistics(model, batch, solver._statistics(model, batch, checked=False))
    raise FloatingPointError(
        f"{what} of layer(s) {names} overflowed in {model.dtype} although every sample's "
        "inputs and output gradients are finite: use float64, or scale the inputs down"
    )


#: A factor at least this wide has its Gram matrix formed in strips (:func:`_gram_strips`).
_GRAM_SPLIT_WIDTH, _GRAM_STRIPS = 512, 4


def _gram_strips(xp: Any, a: Array) -> list[Array]:
    """aᵀa for a (rows, p) as its upper strips: [a_iᵀ a[:, e_i:]] (aᵀa itself below 512).

    aᵀa is symmetric, so strip i is a_iᵀ a[:, e_i:] (the columns from its own
    on) and the blocks below the diagonal are never formed: with 4 strips,
    10/16 of the multiply-adds of one product (a 2048 × 1025 block: 7.7
    against 10.6 ms, torch, 2 threads; K-FAC's first pass on the 5.2M
    transformer spends most of its products on 1024-wide factors). The
    strips are summed as they are over the data and mirrored once, on the
    host (:func:`_factor`): mirroring every batch's copied p² entries.
    """
    p = int(a.shape[1])
    if p < _GRAM_SPLIT_WIDTH:
        return [xp.matmul(xp.matrix_transpose(a), a)]
    edges = [p * i // _GRAM_STRIPS for i in range(_GRAM_STRIPS + 1)]
    return [
        xp.matmul(xp.matrix_transpose(a[:, edges[i] : edges[i + 1]]), a[:, edges[i] :])
        for i in range(_GRAM_STRIPS)
    ]


def _factor(sums: dict[str, Any], key: str, host: Any) -> np.ndarray:
    """The summed factor ``key`` (float64, host) from its strips, with its bias row and column.

    Strips i = 0, 1, ... are the upper blocks [e_i:e_(i+1), e_i:] (:func:`_gram_strips`);
    with ``key.sum`` (Σ_t ã_t over the positions) the bias's [ã, 1] row and
    column are joined: [[Σ ã ãᵀ, Σ ã], [Σ ãᵀ, positions]].
    """
    strips = []
    while f"{key}.{len(strips)}" in sums:
        strips.append(np.asarray(host(sums[f"{key}.{len(strips)}"]), np.float64))
    p = strips[0].shape[1]
    upper, start = np.zeros((p, p)), 0
    for strip in strips:
        upper[start : start + strip.shape[0], start:] = strip
        start += strip.shape[0]
    matrix = np.triu(upper) + np.triu(upper, 1).T
    if f"{key}.sum" not in sums:
        return matrix
    total = np.asarray(host(sums[f"{key}.sum"]), np.float64)
    positions = float(sums[f"positions.{key.split('.')[1]}"])
    return np.block([[matrix, total[:, None]], [total[None, :], np.full((1, 1), positions)]])


def _add(sums: dict[str, Any], key: str, value: Any) -> None:
    """sums[key] += value: in place where the namespace allows (every value is fresh)."""
    if key in sums:
        sums[key] += value  # an immutable namespace rebinds it
    else:
        sums[key] = value


def _check_statistics(
    model: InfluenceModel, batch: Batch, stats: dict[str, tuple[Array, Array]]
) -> None:
    """NaN/inf in any layer's inputs or output gradients: raise, naming the samples."""
    xp = model.xp
    for name, (a, g) in stats.items():
        for what, values in (("inputs", a), ("output gradients", g)):
            if not xp.isdtype(values.dtype, "real floating"):  # an embedding's indices
                continue
            if not model._all_finite(values):
                flat = xp.reshape(values, (int(values.shape[0]), -1))
                raise model.non_finite_error(
                    f"layer statistics ({what} of layer {name!r})",
                    model._bad_rows(flat, batch.start),
                )


def _layer_size(block: LayerBlock, rank: int | None) -> int:
    """A layer's rows in the solved test block: p o whole, r (p + o) at query rank r."""
    p, o = block.rows, block.layer.outputs
    return p * o if rank is None else rank * (p + o)


def _rank_one_rotations(
    xp: Any, block: LayerBlock, stats: dict[str, tuple[Array, Array]], qa: Array, qs: Array
) -> tuple[Array, Array] | None:
    """(u, v) = (Q_Aᵀ ã, Q_Sᵀ g) for a layer applied once per sample (T = 1); else None.

    Its gradient is then the rank-one G = ã gᵀ, so R = Q_Aᵀ G Q_S = u vᵀ:
    nothing of shape (b, p, o) is needed.
    """
    a, g = stats[block.layer.name]
    if block.kind not in ("dense", "conv2d") or int(a.shape[1]) != 1:
        return None
    b = int(a.shape[0])
    a = a[:, 0, :]
    if block.bias_offset is not None:
        a = xp.concat([a, xp.ones((b, 1), dtype=a.dtype)], axis=1)
    return xp.matmul(a, qa), xp.matmul(g[:, 0, :], qs)


def _rank_one_factors(
    xp: Any, block: LayerBlock, stats: dict[str, tuple[Array, Array]], qa: Array, qs: Array
) -> tuple[Array, Array] | None:
    """(u², v²) of :func:`_rank_one_rotations` (R² = u² (v²)ᵀ), or None when T > 1."""
    pair = _rank_one_rotations(xp, block, stats, qa, qs)
    if pair is None:
        return None
    u, v = pair
    return u * u, v * v


def _rotated_matrices(
    xp: Any,
    block: LayerBlock,
    stats: dict[str, tuple[Array, Array]],
    qa: Array,
    qs: Array,
    workspace: Workspace | None = None,
) -> Array:
    """R_i = Q_Aᵀ G_i Q_S per sample, (b, p, o), for a layer with T > 1 positions.

    Q_Aᵀ G Q_S = Σ_t (Q_Aᵀ ã_t)(Q_Sᵀ g_t)ᵀ: rotating the statistics first costs
    T (p² + o²) + T p o per sample, rotating the formed G costs T p o + p² o + p o²;
    the cheaper order is taken (the first for a wide convolution: 4x fewer
    multiply-adds at p = 2305, o = 256, T = 64). With a ``workspace`` the
    first order's (b, p, o) product is written into its buffer (a view, valid
    until its next product).
    """
    a, g = stats[block.layer.name]
    T, p, o = int(a.shape[1]), block.rows, block.layer.outputs
    if T * (p * p + o * o) < p * p * o + p * o * o:
        if block.bias_offset is None:
            ua = xp.matmul(a, qa)
        else:  # [ã, 1] Q_A = ã Q_A[:-1] + Q_A[-1]: no copy of the inputs with a ones column
            ua = xp.matmul(a, qa[:-1, :])
            ua += qa[-1, :]  # in place (an immutable namespace rebinds it)
        product = xp.matmul if workspace is None else workspace.matmul
        rotated = product(xp.matrix_transpose(ua), xp.matmul(g, qs))
    else:
        (matrix,) = layer_gradient_matrices(xp, [block], stats)
        rotated = xp.matmul(xp.matmul(xp.matrix_transpose(qa), matrix), qs)
    return rotated


def _rotated_squares(
    model: InfluenceModel,
    block: LayerBlock,
    stats: dict[str, tuple[Array, Array]],
    qa: Array | None,
    qs: Array | None,
    weights: Array,
    workspace: Workspace | None = None,
) -> Array:
    """Σ_jk (Q_Aᵀ G_i Q_S)²_jk · weights_jk per sample: shape (b,).

    With T = 1, Σ_k ((u²) W)_k v²_k: O(b (p² + p o)) instead of O(b p² o). An
    embedding's rows are rotated one (sample, token) row at a time
    (:func:`~influence_core.layerwise.embedding_rows`) and weighted by their token's row.
    """
    xp = model.xp
    if block.kind == "embedding":
        samples, tokens, rows = embedding_rows(model, *stats[block.layer.name])
        rotated = xp.matmul(rows, qs)
        weighted = xp.sum(rotated * rotated * xp.take(weights, tokens, axis=0), axis=1)
        b = int(stats[block.layer.name][1].shape[0])
        return model.kernels.segment_sum(weighted[:, None], samples, b)[:, 0]
    if not block.kronecker:
        (matrix,) = layer_gradient_matrices(xp, [block], stats)
        return xp.sum(xp.reshape(matrix * matrix * weights, (int(matrix.shape[0]), -1)), axis=1)
    factors = _rank_one_factors(xp, block, stats, qa, qs)
    if factors is not None:
        u2, v2 = factors
        return xp.sum(xp.matmul(u2, weights) * v2, axis=1)
    # Σ_jk R²_jk W_jk = ‖R ⊙ √W‖²: R scaled in place (a fresh product; an immutable
    # namespace rebinds it), then one dot product per sample. R², R² W and their sum
    # were three passes over the (b, p, o) block and two fresh ones of its size.
    scaled = _rotated_matrices(xp, block, stats, qa, qs, workspace)
    scaled *= xp.sqrt(weights)
    flat = xp.reshape(scaled, (int(scaled.shape[0]), 1, -1))
    return xp.matmul(flat, xp.matrix_transpose(flat))[:, 0, 0]


def _summed_rotated_squares(
    model: InfluenceModel,
    block: LayerBlock,
    stats: dict[str, tuple[Array, Array]],
    qa: Array | None,
    qs: Array,
    workspace: Workspace | None = None,
) -> Array:
    """Σ_i (Q_Aᵀ G_i Q_S)² over the batch, (p, o): EK-FAC's correction; (u²)ᵀ(v²) when T = 1.

    For an embedding (Q_A = I), row v is Σ_i ((Σ_{t: a_it = v} g_it) Q_S)²:
    the rows a sample shares a token on are summed before squaring.
    """
    xp = model.xp
    if block.kind == "embedding":
        _, tokens, rows = embedding_rows(model, *stats[block.layer.name])
        rotated = xp.matmul(rows, qs)
        return model.kernels.segment_sum(rotated * rotated, tokens, block.layer.inputs)
    factors = _rank_one_factors(xp, block, stats, qa, qs)
    if factors is not None:
        u2, v2 = factors
        return xp.matmul(xp.matrix_transpose(u2), v2)
    rotated = _rotated_matrices(xp, block, stats, qa, qs, workspace)
    rotated *= rotated  # in place: a fresh product (an immutable namespace rebinds it)
    return xp.sum(rotated, axis=0)


def _into_bases(xp: Any, matrices: Array, qa: Array | None, qs: Array | None) -> Array:
    """Q_Aᵀ M Q_S for (k, p, o) matrices; a basis given as ``None`` is I."""
    if qa is not None:
        matrices = xp.matmul(xp.matrix_transpose(qa), matrices)
    return matrices if qs is None else xp.matmul(matrices, qs)


def _out_of_bases(xp: Any, matrices: Array, qa: Array | None, qs: Array | None) -> Array:
    """Q_A M Q_Sᵀ for (k, p, o) matrices; a basis given as ``None`` is I."""
    if qa is not None:
        matrices = xp.matmul(qa, matrices)
    return matrices if qs is None else xp.matmul(matrices, xp.matrix_transpose(qs))


class EKFACIHVP(KFACIHVP):
    """EK-FAC: K-FAC's eigenbases with corrected eigenvalues Λ = E_i[(Q_Aᵀ G_i Q_S)²].

    Same arguments as :class:`KFACIHVP`; :meth:`fit` makes a second pass over
    the data for Λ.
    """

    corrects_eigenvalues = True


def _decompose(block: LayerBlock, sums: dict[str, Any], j: int, n: int, host: Any) -> tuple:
    """(λ_A, Q_A, jitter, λ_S, Q_S, jitter) of layer j's factors (Q_A ``None`` for an embedding)."""
    positions = int(sums[f"positions.{j}"])
    if block.kind == "embedding":  # A = diag(token frequencies): its basis is I
        la, qa, jitter_a = np.asarray(host(sums[f"a.{j}"]), np.float64)[:, 0] / positions, None, 0.0
    else:
        la, qa, jitter_a = _eigh(_factor(sums, f"a.{j}", host) / positions)
    ls, qs, jitter_s = _eigh(_factor(sums, f"s.{j}", host) / n)
    return la, qa, jitter_a, ls, qs, jitter_s


def _eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Eigenvalues (clipped at 0), eigenvectors and the jitter a converged decomposition needed."""
    matrix = 0.5 * (matrix + matrix.T)
    scale = max(float(np.trace(matrix)) / max(len(matrix), 1), np.finfo(np.float64).tiny)
    jitter = 0.0
    for attempt in range(6):
        try:
            shifted = matrix if jitter == 0.0 else matrix + jitter * np.eye(len(matrix))
            values, vectors = np.linalg.eigh(shifted)
            if np.all(np.isfinite(values)):
                return np.maximum(values - jitter, 0.0), vectors, jitter
        except np.linalg.LinAlgError:
            pass
        jitter = scale * 10.0 ** (attempt - 12)
    raise np.linalg.LinAlgError(  # pragma: no cover - six jittered retries all failed
        f"eigh did not converge even with jitter {jitter:.3g} x I"
    )
