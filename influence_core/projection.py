"""Seeded random projections of per-sample gradients, written once for every framework.

A projector turns the gradient g ∈ R^d of each sample into k ≪ d features
Pᵀg, with E[P Pᵀ] = I, so that dot products survive in expectation::

    E[(Pᵀa)·(Pᵀb)] = a·b,    sd[(Pᵀa)·(Pᵀb)] ≤ √(2/k) ‖a‖ ‖b‖

(Johnson–Lindenstrauss; for Gaussian entries the variance is
(‖a‖²‖b‖² + (a·b)²)/k exactly). TracIn, gradient similarity and TRAK store
and compare these k numbers per training point instead of d.

Two kinds, both seeded so that **one seed gives one matrix in every
framework**: P is defined over the canonical parameter layout
(:meth:`~influence_core.InfluenceModel.to_canonical`) and drawn on the host
with NumPy, block by block, then handed to the backend.

* :class:`RandomProjection`: a dense d × k Gaussian or Rademacher matrix,
  drawn in blocks of ``block_rows`` canonical rows (block j from the seed
  sequence ``(seed, j)``, so any block can be redrawn alone) and handed to the
  backend in slabs of at most 2^16 rows. The slabs are kept on the device when
  d·k fits in ``memory_budget`` (as one matrix in the backend's layout when
  its float64 draw takes at most a quarter of it); otherwise they are redrawn
  at every call, so the d × k matrix never exists whole. A redraw costs d·k
  random numbers, more than the product itself for small batches, so where
  the backend gives layer statistics one call projects many batches
  (:meth:`GradientProjector.features_of`): their statistics are held (within
  half the budget) and each slab, drawn once, meets every batch's gradient
  entries in its rows (:mod:`influence_core.gradient_ranges`), never a (b, d)
  block.
* :class:`KroneckerProjection`: per layer, P_l = P_in ⊗ P_out (LoGra; Choe et
  al. 2024, "What is Your Data Worth to GPT?"). Layer l's gradient
  G = Σ_t ã_tᵀ g_t (p_in+1 × p_out) becomes P_inᵀ G P_out = Σ_t (ã_t P_in)ᵀ(g_t P_out),
  computed from the layer's inputs and output gradients
  (:meth:`~influence_core.plugin.ModelKernels.layer_statistics`) without
  forming G: T(p_in k_in + p_out k_out + k_in k_out) multiply-adds per sample
  instead of the T p_in p_out of the gradient alone. A side no larger than
  its k is kept exactly (P = I). Unbiased like the dense one, with a larger
  variance (the entries of P_in ⊗ P_out are not independent). An embedding's
  side is row a_t of P_in, gathered; an elementwise layer's small
  (1 [+1], p) gradient is projected whole.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np

from .data import Batch
from .gradient_ranges import GradientRanges, Piece, overlapping, pieces
from .layerwise import (
    LayerBlock,
    covering_layers,
    layer_gradient_matrices,
    one_hot,
    with_bias_input,
)
from .measurements import Measurement
from .model import InfluenceModel
from .plugin.protocol import UnsupportedByBackendError

__all__ = [
    "GradientProjector",
    "KroneckerProjection",
    "RandomProjection",
    "projected_features",
    "resolve_projector",
]

Array = Any
Kind = Literal["gaussian", "rademacher"]


def _draw(seed: tuple[int, ...], rows: int, cols: int, kind: Kind) -> np.ndarray:
    """A (rows, cols) block with E[entry²] = 1/cols, from the seed sequence ``seed`` (float64)."""
    rng = np.random.default_rng(list(seed))
    if kind == "gaussian":
        return rng.standard_normal((rows, cols)) / np.sqrt(cols)
    signs = rng.integers(0, 2, size=(rows, cols), dtype=np.int8).astype(np.float64)
    return (2.0 * signs - 1.0) / np.sqrt(cols)


class GradientProjector(ABC):
    """What every projector does: k features per sample for a measurement, and its settings."""

    seed: int

    @abstractmethod
    def features(self, model: InfluenceModel, batch: Batch, measurement: Measurement) -> Array:
        """Pᵀ ∇_θ m(z_i) for each sample of ``batch``: shape (b, k), native."""

    def features_of(
        self, model: InfluenceModel, batches: Sequence[Batch], measurement: Measurement
    ) -> list[Array]:
        """:meth:`features` of several batches at once (a projector may share work across them)."""
        return [self.features(model, batch, measurement) for batch in batches]

    def samples_per_call(self, model: InfluenceModel) -> int:
        """How many samples a caller should hand :meth:`features_of` at once (0: batch by batch)."""
        return 0

    @abstractmethod
    def dim(self, model: InfluenceModel) -> int:
        """k, the number of features per sample for ``model``'s θ."""

    @abstractmethod
    def reseeded(self, seed: int) -> GradientProjector:
        """The same projector with another seed (one per model of an ensemble)."""

    @abstractmethod
    def get_params(self) -> dict[str, Any]:
        """The settings (JSON values) that determine the matrix."""


class RandomProjection(GradientProjector):
    """A seeded dense random projection P (d × k), drawn in blocks of canonical rows.

    Args:
        dim: k, the projected dimension.
        seed: the seed; block j of rows is drawn from ``(seed, j)``.
        kind: ``"gaussian"`` (N(0, 1/k)) or ``"rademacher"`` (±1/√k).
        block_rows: canonical rows per drawn block (part of the matrix's definition).
        memory_budget: bytes the matrix may take on the device; above it the
            matrix is redrawn, one slab of at most half the budget at a time,
            at every call instead of being kept.
    """

    def __init__(
        self,
        dim: int,
        *,
        seed: int = 0,
        kind: Kind = "gaussian",
        block_rows: int = 4096,
        memory_budget: int = 2**31,
    ) -> None:
        if int(dim) < 1:
            raise ValueError(f"dim must be a positive integer, got {dim}")
        if kind not in ("gaussian", "rademacher"):
            raise ValueError(f"kind must be 'gaussian' or 'rademacher', got {kind!r}")
        if int(block_rows) < 1:
            raise ValueError(f"block_rows must be positive, got {block_rows}")
        self.k = int(dim)
        self.seed = int(seed)
        self.kind: Kind = kind
        self.block_rows = int(block_rows)
        self.memory_budget = int(memory_budget)
        self._kept: tuple[Any, Array] | None = None
        self._layered: tuple[Any, list[Piece] | None] | None = None
        #: Rows of the largest slab drawn at once by the last streamed call (for tests).
        self.largest_slab_rows_ = 0

    def get_params(self) -> dict[str, Any]:
        return {
            "projector": "random",
            "dim": self.k,
            "seed": self.seed,
            "kind": self.kind,
            "block_rows": self.block_rows,
        }

    def reseeded(self, seed: int) -> RandomProjection:
        return RandomProjection(
            self.k,
            seed=seed,
            kind=self.kind,
            block_rows=self.block_rows,
            memory_budget=self.memory_budget,
        )

    def dim(self, model: InfluenceModel) -> int:
        return self.k

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Canonical rows ``start:stop`` of P (host float64), drawn block by block."""
        first, last = start // self.block_rows, (stop - 1) // self.block_rows
        blocks = [
            _draw((self.seed, j), self.block_rows, self.k, self.kind)
            for j in range(first, last + 1)
        ]
        whole = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
        offset = first * self.block_rows
        return whole[start - offset : stop - offset]

    def matrix(self, d: int) -> np.ndarray:
        """The whole canonical P for d parameters (host float64; for checks on small models)."""
        return self.rows(0, d)

    def fits(self, model: InfluenceModel) -> bool:
        """Whether the d × k matrix fits in ``memory_budget`` on the device (and is kept)."""
        return model.num_parameters * self.k * model.itemsize <= self.memory_budget

    #: Most canonical rows drawn on the host at once (float64): 2^16 × k × 8 bytes.
    SLAB_ROWS = 2**16

    def _slab_rows(self, model: InfluenceModel) -> int:
        budget = self.memory_budget // (2 * self.k * model.itemsize)
        rows = min(self.SLAB_ROWS, max(self.block_rows, budget))
        return max(self.block_rows, rows // self.block_rows * self.block_rows)

    def _slabs(self, model: InfluenceModel) -> Iterator[tuple[int, int, Array]]:
        """(start, stop, native P[start:stop]) over the canonical rows: kept, or drawn anew."""
        d, native = model.num_parameters, model.kernels.as_native
        if self.fits(model):
            key = (id(model.kernels), model.layout.names, d, str(model.dtype))
            if self._kept is None or self._kept[0] != key:
                step = self._slab_rows(model)
                slabs = [
                    (a, min(d, a + step), native(self.rows(a, min(d, a + step)), floating=True))
                    for a in range(0, d, step)
                ]
                self._kept = (key, slabs)
            yield from self._kept[1]
            return
        step = self._slab_rows(model)
        self.largest_slab_rows_ = 0
        for start in range(0, d, step):
            stop = min(d, start + step)
            self.largest_slab_rows_ = max(self.largest_slab_rows_, stop - start)
            yield start, stop, native(self.rows(start, stop), floating=True)

    def _whole(self, model: InfluenceModel) -> bool:
        """Small enough to keep as one matrix in the backend's layout (one matmul per batch)."""
        return model.num_parameters * self.k * 8 <= self.memory_budget // 4

    def project(self, model: InfluenceModel, grads: Array) -> Array:
        """Pᵀ g for each row of ``grads`` (b, d) in ``model``'s θ order: shape (b, k).

        A matrix whose host draw (d·k float64) fits in a quarter of the budget
        is kept whole in the backend's layout: one matmul per batch. A larger
        one is kept (or redrawn) in slabs of canonical rows, and the gradients
        are put in the canonical layout (a copy of the batch, none where the
        backend's layout is canonical) and multiplied slab by slab, so neither
        side needs the d × k matrix as one array.
        """
        xp = model.xp
        if self._whole(model):
            key = ("whole", id(model.kernels), model.layout.names, str(model.dtype))
            if self._kept is None or self._kept[0] != key:
                self._kept = (key, model.from_canonical(self.matrix(model.num_parameters)))
            return xp.matmul(grads, self._kept[1])
        canonical = xp.matrix_transpose(model.to_canonical(xp.matrix_transpose(grads)))
        total = None
        for start, stop, part in self._slabs(model):
            value = xp.matmul(canonical[:, start:stop], part)
            total = value if total is None else total + value
        return total

    def features(self, model: InfluenceModel, batch: Batch, measurement: Measurement) -> Array:
        if self._runs(model) is not None:
            return self.features_of(model, [batch], measurement)[0]
        return self.project(model, model.batch_per_sample_grads(batch, measurement))

    #: Samples per :meth:`features_of` call when the matrix is redrawn: each call draws it once.
    SAMPLES_PER_DRAW = 4096

    def samples_per_call(self, model: InfluenceModel) -> int:
        if self._runs(model) is None:
            return 0
        # each slab meets all held samples at once: (samples, slab rows) within a quarter budget
        joined = self._slab_rows(model) * model.itemsize
        return max(1, min(self.SAMPLES_PER_DRAW, self.memory_budget // 4 // joined))

    def _runs(self, model: InfluenceModel) -> list[Piece] | None:
        """θ's layer pieces when the matrix is redrawn and layer statistics cover θ, else None."""
        if self.fits(model):
            return None
        key = (id(model.kernels), model.layout.names)
        if self._layered is None or self._layered[0] != key:
            try:
                runs = pieces(covering_layers(model))
            except (UnsupportedByBackendError, ValueError):
                runs = None
            self._layered = (key, runs)
        return self._layered[1]

    def features_of(
        self, model: InfluenceModel, batches: Sequence[Batch], measurement: Measurement
    ) -> list[Array]:
        """Features of several batches, drawing a redrawn matrix once for all of them.

        Each batch's layer statistics are held (at most half of
        ``memory_budget`` together, and at most :meth:`samples_per_call`
        samples, since each slab meets all of them at once); then every slab
        of P is drawn once and multiplied by every held batch's gradient
        entries in its rows. Without layer statistics, or with the matrix
        kept: batch by batch.
        """
        runs = self._runs(model)
        if runs is None:
            return [
                self.project(model, model.batch_per_sample_grads(b, measurement)) for b in batches
            ]
        out: list[Array] = []
        held: list[GradientRanges] = []
        held_bytes = held_samples = 0
        for batch in batches:
            stats = model.layer_statistics(batch, measurement)
            bytes_ = sum(
                int(np.prod(x.shape)) * model.itemsize for pair in stats.values() for x in pair
            )
            if held and (
                held_bytes + bytes_ > self.memory_budget // 2
                or held_samples + batch.size > self.samples_per_call(model)
            ):
                out.extend(self._project_ranges(model, runs, held))
                held, held_bytes, held_samples = [], 0, 0
            held.append(GradientRanges(model, stats))
            held_bytes += bytes_
            held_samples += batch.size
        if held:
            out.extend(self._project_ranges(model, runs, held))
        return out

    def _project_ranges(
        self, model: InfluenceModel, runs: list[Piece], held: list[GradientRanges]
    ) -> list[Array]:
        """Pᵀg for every sample of ``held``: one draw of P, each slab against all of them."""
        xp = model.xp
        total = None
        for start, stop, part in self._slabs(model):
            for piece, lo, hi in overlapping(runs, start, stop):
                rows = part[piece.offset + lo - start : piece.offset + hi - start]
                entries = [ranges.entries(piece, lo, hi) for ranges in held]
                joined = entries[0] if len(entries) == 1 else xp.concat(entries, axis=0)
                value = xp.matmul(joined, rows)
                total = value if total is None else total + value
        out, begin = [], 0
        for ranges in held:
            out.append(total[begin : begin + ranges.size])
            begin += ranges.size
        return out


class KroneckerProjection(GradientProjector):
    """Per layer, P_in ⊗ P_out applied to the layer's inputs and output gradients (LoGra).

    Layer l (canonical order) gets P_in (p_in [+1] × k_in) from the seed
    sequence ``(seed, l, 0)`` and P_out (p_out × k_out) from ``(seed, l, 1)``,
    Gaussian N(0, 1/k); a side of size ≤ its k is kept exactly (identity).
    Features are layer by layer, each (k_in', k_out') flattened row by row.
    Needs the backend's layer-wise statistics (dense and convolution layers).

    Args:
        inputs: k_in, features per layer on the input side.
        outputs: k_out, features per layer on the output-gradient side.
        seed: the seed.
    """

    def __init__(self, inputs: int = 16, outputs: int = 16, *, seed: int = 0) -> None:
        if int(inputs) < 1 or int(outputs) < 1:
            raise ValueError(f"inputs and outputs must be positive, got {inputs}, {outputs}")
        self.k_in, self.k_out, self.seed = int(inputs), int(outputs), int(seed)
        self._kept: tuple[Any, list[tuple[LayerBlock, Array | None, Array | None]]] | None = None

    def get_params(self) -> dict[str, Any]:
        return {
            "projector": "kronecker",
            "inputs": self.k_in,
            "outputs": self.k_out,
            "seed": self.seed,
        }

    def reseeded(self, seed: int) -> KroneckerProjection:
        return KroneckerProjection(self.k_in, self.k_out, seed=seed)

    def _blocks(self, model: InfluenceModel) -> list[LayerBlock]:
        return sorted(covering_layers(model), key=lambda block: block.kernel_offset)

    def layer_matrices(self, model: InfluenceModel) -> list[tuple[np.ndarray, np.ndarray]]:
        """(P_in, P_out) per layer in canonical order (host float64; identity where exact)."""
        out = []
        for index, block in enumerate(self._blocks(model)):
            rows, cols = block.rows, block.layer.outputs
            p_in = (
                np.eye(rows)
                if rows <= self.k_in
                else _draw((self.seed, index, 0), rows, self.k_in, "gaussian")
            )
            p_out = (
                np.eye(cols)
                if cols <= self.k_out
                else _draw((self.seed, index, 1), cols, self.k_out, "gaussian")
            )
            out.append((p_in, p_out))
        return out

    def dim(self, model: InfluenceModel) -> int:
        return sum(p.shape[1] * q.shape[1] for p, q in self.layer_matrices(model))

    def _prepared(
        self, model: InfluenceModel
    ) -> list[tuple[LayerBlock, Array | None, Array | None]]:
        key = (id(model.kernels), model.layout.names, str(model.dtype))
        if self._kept is None or self._kept[0] != key:
            native = model.kernels.as_native
            kept = []
            for block, (p_in, p_out) in zip(
                self._blocks(model), self.layer_matrices(model), strict=True
            ):
                kept.append(
                    (
                        block,
                        None if block.rows <= self.k_in else native(p_in, floating=True),
                        None if block.layer.outputs <= self.k_out else native(p_out, floating=True),
                    )
                )
            self._kept = (key, kept)
        return self._kept[1]

    def features(self, model: InfluenceModel, batch: Batch, measurement: Measurement) -> Array:
        xp = model.xp
        stats = model.layer_statistics(batch, measurement)
        pieces = []
        for block, p_in, p_out in self._prepared(model):
            a, g = stats[block.layer.name]  # (b, T, p_in), (b, T, p_out)
            if not block.kronecker:  # G = [Σ a ⊙ g; Σ g] is small: project it whole
                (matrix,) = layer_gradient_matrices(xp, [block], stats)
                if p_in is not None:
                    matrix = xp.matmul(xp.matrix_transpose(p_in), matrix)
                projected = matrix if p_out is None else xp.matmul(matrix, p_out)
                pieces.append(xp.reshape(projected, (int(projected.shape[0]), -1)))
                continue
            if block.kind == "embedding":  # e_aᵀ P_in is row a of P_in: gathered, never one-hot
                b, t = int(g.shape[0]), int(g.shape[1])
                if p_in is None:
                    side = one_hot(xp, a, block.layer.inputs, g.dtype)
                else:
                    picked = xp.take(p_in, xp.reshape(a, (-1,)), axis=0)
                    side = xp.reshape(picked, (b, t, int(p_in.shape[1])))
            elif p_in is None:
                side = with_bias_input(xp, block, a)
            else:
                p = block.layer.inputs
                side = xp.matmul(a, p_in[:p, :])
                if block.bias_offset is not None:
                    side = side + p_in[p, :]
            out = g if p_out is None else xp.matmul(g, p_out)
            projected = xp.matmul(xp.matrix_transpose(side), out)  # (b, k_in, k_out)
            pieces.append(xp.reshape(projected, (int(projected.shape[0]), -1)))
        return pieces[0] if len(pieces) == 1 else xp.concat(pieces, axis=1)


def projected_features(
    model: InfluenceModel,
    data: Any,
    projector: GradientProjector | None,
    measurement: Measurement,
    batch_size: int | None = None,
) -> Iterator[tuple[Batch, Array]]:
    """Stream ``(batch, features (b, k))``: projected gradients of ``measurement``, or raw (b, d)."""
    batches = model.batches(data, batch_size)
    if projector is None:
        for batch in batches:
            yield batch, model.batch_per_sample_grads(batch, measurement)
        return
    limit = projector.samples_per_call(model)
    if limit <= 0:
        for batch in batches:
            yield batch, projector.features(model, batch, measurement)
        return
    group: list[Batch] = []
    for batch in batches:
        group.append(batch)
        if sum(b.size for b in group) >= limit:
            yield from zip(group, projector.features_of(model, group, measurement), strict=True)
            group = []
    if group:
        yield from zip(group, projector.features_of(model, group, measurement), strict=True)


def resolve_projector(
    projection_dim: int | None, seed: int, projector: GradientProjector | None
) -> GradientProjector | None:
    """An estimator's projector from its arguments: ``projection_dim=m`` means a dense one."""
    if projection_dim is not None and projector is not None:
        raise ValueError("give projection_dim or projector, not both")
    if projection_dim is None:
        if projector is not None and not isinstance(projector, GradientProjector):
            raise TypeError(
                f"projector must be a GradientProjector (RandomProjection, KroneckerProjection), "
                f"got {type(projector).__name__}"
            )
        return projector
    if int(projection_dim) < 1:
        raise ValueError(f"projection_dim must be a positive integer, got {projection_dim}")
    return RandomProjection(int(projection_dim), seed=seed)
