"""Per-sample gradients one range of canonical θ at a time, from layer statistics.

A dense projection Pᵀg needs every entry of g once, against the rows of P
that it meets. When P is too large to keep and is drawn slab by slab
(:class:`~influence_core.projection.RandomProjection`), its cost is the draw,
d·k random numbers per pass; drawn per batch of per-sample gradients, a
(b, d) block bounded by the memory budget, the draw is repeated for every
few samples. From the layers' statistics instead (a, g per layer, never
(b, d)), any range [lo, hi) of a layer's canonical entries is formed on
demand for many batches at once, so one draw of P serves all of them:

* a dense or convolution kernel (p_in, p_out), row-major: the input rows
  i₀ = ⌊lo/p_out⌋ … i₁ = ⌈hi/p_out⌉ give Σ_t a_t[i₀:i₁]ᵀ g_t, (b, i₁−i₀, p_out),
  flattened and trimmed to [lo, hi);
* an embedding's table (vocabulary, width): the (sample, token) rows of
  :func:`~influence_core.layerwise.embedding_rows` whose token falls in the
  range, placed with one ``segment_sum``;
* an elementwise or ``"parameter"`` layer, and any bias: its small
  (b, p) gradient, sliced.

Written once over the namespace; the work is b·(hi − lo) per range (T times
more for a layer applied at T positions), the same as forming the gradient.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .layerwise import DIAGONAL_KINDS, LayerBlock, embedding_rows
from .model import InfluenceModel

__all__ = ["GradientRanges", "Piece", "pieces"]

Array = Any


@dataclass(frozen=True)
class Piece:
    """One contiguous run of canonical θ: a layer's kernel or its bias."""

    block: LayerBlock
    bias: bool
    offset: int
    size: int


def pieces(blocks: Sequence[LayerBlock]) -> list[Piece]:
    """Every layer's kernel and bias as runs of canonical θ, in canonical order."""
    out = []
    for block in blocks:
        layer = block.layer
        out.append(Piece(block, False, block.kernel_offset, layer.inputs * layer.outputs))
        if block.bias_offset is not None:
            out.append(Piece(block, True, block.bias_offset, layer.outputs))
    return sorted(out, key=lambda piece: piece.offset)


def overlapping(runs: Sequence[Piece], start: int, stop: int) -> Iterator[tuple[Piece, int, int]]:
    """(piece, lo, hi) for each piece meeting canonical rows [start, stop); lo, hi within the piece."""
    for piece in runs:
        lo, hi = max(start, piece.offset), min(stop, piece.offset + piece.size)
        if lo < hi:
            yield piece, lo - piece.offset, hi - piece.offset


class GradientRanges:
    """One batch's per-sample gradients, formed range by range from its layer statistics.

    Args:
        model: the model (its namespace and kernels).
        stats: ``{layer: (a, g)}`` of one batch (:meth:`InfluenceModel.layer_statistics`).
    """

    def __init__(self, model: InfluenceModel, stats: dict[str, tuple[Array, Array]]) -> None:
        self.model, self.xp, self.stats = model, model.xp, stats
        self._small: dict[str, Array] = {}
        self._rows: dict[str, tuple[np.ndarray, np.ndarray, Array]] = {}
        first = next(iter(stats.values()))[1]
        self.size = int(first.shape[0])

    def entries(self, piece: Piece, lo: int, hi: int) -> Array:
        """Entries [lo, hi) of ``piece`` for every sample: shape (b, hi − lo)."""
        block, xp = piece.block, self.xp
        a, g = self.stats[block.layer.name]
        if piece.bias:
            return self._small_part(block, bias=True)[:, lo:hi]
        if block.kind in DIAGONAL_KINDS:
            return self._small_part(block, bias=False)[:, lo:hi]
        width = block.layer.outputs
        first, last = lo // width, -(-hi // width)
        if block.kind == "embedding":
            matrix = self._embedding(block, first, last)
        else:
            matrix = xp.matmul(xp.matrix_transpose(a[:, :, first:last]), g)  # (b, rows, p_out)
        flat = xp.reshape(matrix, (self.size, (last - first) * width))
        return flat[:, lo - first * width : hi - first * width]

    def _small_part(self, block: LayerBlock, *, bias: bool) -> Array:
        """(b, p): a bias's Σ_t g_t, or an elementwise kernel's Σ_t a_t ⊙ g_t."""
        key = block.layer.name + ("/bias" if bias else "")
        if key not in self._small:
            xp = self.xp
            a, g = self.stats[block.layer.name]
            self._small[key] = xp.sum(g, axis=1) if bias else xp.sum(a * g, axis=1)
        return self._small[key]

    def _embedding(self, block: LayerBlock, first: int, last: int) -> Array:
        """Rows ``first:last`` of the table's gradient for every sample: (b, last − first, width)."""
        xp, name = self.xp, block.layer.name
        if name not in self._rows:
            indices, g = self.stats[name]
            samples, tokens, rows = embedding_rows(self.model, indices, g)
            to_numpy = self.model.to_numpy
            self._rows[name] = (
                np.asarray(to_numpy(samples), np.int64),
                np.asarray(to_numpy(tokens), np.int64),
                rows,
            )
        samples, tokens, rows = self._rows[name]
        width, count = block.layer.outputs, last - first
        picked = np.flatnonzero((tokens >= first) & (tokens < last))
        if picked.size == 0:
            return xp.zeros((self.size, count, width), dtype=rows.dtype)
        native = self.model.kernels.as_native
        placed = self.model.kernels.segment_sum(
            xp.take(rows, native(picked), axis=0),
            native(samples[picked] * count + tokens[picked] - first),
            self.size * count,
        )
        return xp.reshape(placed, (self.size, count, width))
