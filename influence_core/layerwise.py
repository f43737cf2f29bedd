"""Layer-wise per-sample gradients, built from each layer's inputs and output gradients.

For a layer z = a W + b applied at T positions (one for a dense layer on
vectors, one per output pixel for a convolution on its patches), the backend
returns a (b, T, p_in) and g = ∂ℓ/∂z (b, T, p_out)
(:meth:`~influence_core.plugin.ModelKernels.layer_statistics`); sample i's
gradient is::

    ∇_W ℓ_i = Σ_t a_itᵀ g_it   (p_in, p_out, the canonical kernel)
    ∇_b ℓ_i = Σ_t g_it

With the bias folded in as a constant input 1 (ã = [a, 1]), the layer's
gradient is the one matrix Σ_t ã_itᵀ g_it of shape (p_in + 1, p_out): the
form the Kronecker-factored solvers work in (:mod:`influence_core.ihvp.kfac`).
Two more kinds (:class:`~influence_core.plugin.Layer`) build their gradients
differently: an **embedding** z = W[a] has integer inputs a (b, T) and
∇W = Σ_t e_{a_t} g_tᵀ, rows of W selected by the tokens (never formed densely
on the scoring paths: rows are gathered or summed per token); an
**elementwise** layer z = a ⊙ w + b (normalisation's affine parameters) has
∇w = Σ_t a_t ⊙ g_t and ∇b = Σ_t g_t, a (1 [+1], p) matrix per sample.
Written once over the namespace; nothing here builds a (b, d) matrix except
:func:`per_sample_grads_from_layers`, which exists to check the statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .arrays import join
from .measurements import LOSS, Measurement
from .model import InfluenceModel
from .plugin.protocol import Layer

__all__ = [
    "BLOCKS",
    "DIAGONAL_KINDS",
    "KINDS",
    "Coverage",
    "LayerBlock",
    "coverage",
    "covering_layers",
    "embedding_rows",
    "gradients_from_statistics",
    "layer_gradient_dots",
    "layer_gradient_matrices",
    "layer_gradient_squared_norms",
    "per_sample_grads_from_layers",
    "with_bias_input",
]

Array = Any

#: The layer kinds the core builds gradients and curvature blocks for.
KINDS = ("dense", "conv2d", "embedding", "elementwise", "parameter")

#: Kinds whose gradient is a small (1 [+1], p) matrix and whose block is diagonal.
DIAGONAL_KINDS = ("elementwise", "parameter")

#: The curvature block each kind gets from K-FAC and EK-FAC (``docs/methods.md``).
BLOCKS = {
    "dense": "Kronecker A ⊗ S (EK-FAC: eigenvalues corrected in its eigenbasis)",
    "conv2d": "Kronecker A ⊗ S over patches (EK-FAC: eigenvalues corrected)",
    "embedding": "Kronecker with diagonal A, the token frequencies (EK-FAC: corrected)",
    "elementwise": "diagonal: the exact diagonal of the Fisher (K-FAC and EK-FAC alike)",
    "parameter": "diagonal: the exact diagonal of the Fisher, from per-sample gradients",
}

#: Entries of the (left, positions, right, positions) token-match array formed at once.
_MATCH_ENTRIES = 1 << 24


class Coverage(NamedTuple):
    """Which layer and curvature block one parameter of θ got (:func:`coverage`)."""

    layer: str
    kind: str
    block: str


@dataclass(frozen=True)
class LayerBlock:
    """Where one layer's parameters sit in the canonical flat θ.

    Attributes:
        layer: the backend's :class:`~influence_core.plugin.Layer`.
        kernel_offset: start of the canonical kernel (p_in·p_out entries, row-major).
        bias_offset: start of the bias (p_out entries), or ``None``.
    """

    layer: Layer
    kernel_offset: int
    bias_offset: int | None

    @property
    def rows(self) -> int:
        """p_in + 1 with a bias (its constant input), else p_in."""
        return self.layer.inputs + (self.bias_offset is not None)

    @property
    def kind(self) -> str:
        return self.layer.kind

    @property
    def kronecker(self) -> bool:
        """Dense, convolution and embedding layers: G_i = Σ_t ã_tᵀ g_t (one-hot ã for an embedding)."""
        return self.layer.kind not in DIAGONAL_KINDS


def covering_layers(model: InfluenceModel) -> list[LayerBlock]:
    """The backend's layers of θ and their canonical offsets; every selected parameter covered.

    Raises ``ValueError`` naming the parameters no supported layer holds.
    """
    layout = model.layout
    offsets, start = {}, 0
    for i in layout.canonical_order:
        offsets[layout.names[i]] = start
        start += layout.sizes[i]
    layers = model.kernels.layers()
    covered = {layer.kernel for layer in layers} | {layer.bias for layer in layers if layer.bias}
    missing = [name for name in layout.names if name not in covered]
    if missing:
        kinds = sorted({layer.kind for layer in layers}) or ["none"]
        gaps = model.kernels.layer_gaps()
        why = "".join(f"; {name}: {gaps[name]}" for name in missing if name in gaps)
        raise ValueError(
            f"parameters {missing} belong to no layer the {model.backend} backend gives "
            f"layer-wise statistics for (it supports: {', '.join(kinds)} here){why}; select "
            f"only supported layers, e.g. parameters={[layer.name for layer in layers]}"
        )
    sizes = dict(zip(layout.names, layout.sizes, strict=True))
    blocks = []
    for layer in layers:
        if layer.kind not in KINDS:
            raise ValueError(
                f"the {model.backend} backend gives layer {layer.name!r} the kind "
                f"{layer.kind!r}; the core knows {', '.join(KINDS)}"
            )
        if layer.kind in ("embedding", "parameter") and layer.bias is not None:
            raise ValueError(
                f"the {model.backend} backend gives {layer.kind} layer {layer.name!r} a bias; "
                f"a layer of kind {layer.kind!r} has none"
            )
        if sizes[layer.kernel] != layer.inputs * layer.outputs:
            raise ValueError(
                f"the {model.backend} backend describes layer {layer.name!r} as "
                f"{layer.inputs} x {layer.outputs}, but its kernel {layer.kernel} has "
                f"{sizes[layer.kernel]} entries"
            )
        bias = None if layer.bias is None else offsets[layer.bias]
        blocks.append(LayerBlock(layer, offsets[layer.kernel], bias))
    return blocks


def coverage(model: InfluenceModel) -> dict[str, Coverage]:
    """Per selected parameter: its layer, the layer's kind and its K-FAC/EK-FAC block (:data:`BLOCKS`).

    Raises ``ValueError`` naming any parameter no layer covers.
    """
    out = {}
    for block in covering_layers(model):
        layer = block.layer
        for name in (layer.kernel, layer.bias):
            if name is not None:
                out[name] = Coverage(layer.name, layer.kind, BLOCKS[layer.kind])
    return {name: out[name] for name in model.layout.names}


def one_hot(xp: Any, indices: Array, rows: int, dtype: Any) -> Array:
    """e_{a}: shape ``indices.shape + (rows,)`` (an embedding's inputs as a dense layer's)."""
    return xp.astype(indices[..., None] == xp.arange(rows, dtype=indices.dtype), dtype)


def embedding_rows(model: InfluenceModel, indices: Array, g: Array) -> tuple[Array, Array, Array]:
    """A batch's embedding gradients as their nonzero rows: ``(samples, tokens, rows)``.

    Row u is Σ_t g_it over the positions t of sample ``samples[u]`` that hold
    token ``tokens[u]``: G_i = Σ_u e_{tokens[u]} rows[u]ᵀ over the u of sample
    i, with at most b·T rows (never the (b, vocabulary, width) block). The
    (sample, token) pairs are numbered on the host (small integers); the
    sums run on the backend (:meth:`~influence_core.plugin.ModelKernels.segment_sum`).
    """
    b, t = int(g.shape[0]), int(g.shape[1])
    host = np.asarray(model.to_numpy(indices), np.int64).reshape(b, t)
    keys = np.arange(b, dtype=np.int64)[:, None] * (int(host.max(initial=0)) + 1) + host
    unique, inverse = np.unique(keys.reshape(-1), return_inverse=True)
    first = np.zeros(len(unique), np.int64)
    first[inverse[::-1]] = np.arange(b * t, dtype=np.int64)[::-1]  # a position of each pair
    native = model.kernels.as_native
    rows = model.kernels.segment_sum(
        model.xp.reshape(g, (b * t, int(g.shape[2]))), native(inverse.reshape(-1)), len(unique)
    )
    return native(first // t), native(host.reshape(-1)[first]), rows


def layer_gradient_matrices(
    xp: Any, blocks: Sequence[LayerBlock], stats: dict[str, tuple[Array, Array]]
) -> list[Array]:
    """Per layer, the per-sample gradient matrices Σ_t ã_itᵀ g_it: shape (b, p_in [+1], p_out).

    An elementwise layer's is ``[Σ_t a ⊙ g; Σ_t g]`` (b, 1 [+1], p). An
    embedding's is dense here, (b, rows, width): for checks and small tables
    only (the solvers gather and sum its rows by token instead).
    """
    out = []
    for block in blocks:
        a, g = stats[block.layer.name]
        if block.kind in DIAGONAL_KINDS:
            kernel = xp.sum(a * g, axis=1)[:, None, :]
        elif block.kind == "embedding":
            a = one_hot(xp, a, block.layer.inputs, g.dtype)
            kernel = xp.matmul(xp.matrix_transpose(a), g)
        else:
            kernel = xp.matmul(xp.matrix_transpose(a), g)  # (b, p_in, p_out), summed over positions
        if block.bias_offset is not None:
            bias = xp.sum(g, axis=1)[:, None, :]
            kernel = xp.concat([kernel, bias], axis=1)
        out.append(kernel)
    return out


def per_sample_grads_from_layers(
    model: InfluenceModel, batch: Any, measurement: Measurement = LOSS
) -> Array:
    """∇_θ ℓ(z_i) for each sample of ``batch`` (b, d), in the backend's θ order, from layer statistics.

    Equal to :meth:`InfluenceModel.per_sample_grads` (with a ``measurement``,
    to :meth:`InfluenceModel.batch_per_sample_grads` of it); here to check the
    statistics, and for the test side of the layer-wise solvers, which is
    (n_test, d) anyway (it needs no vmap, so it works where the model cannot
    be vectorised over samples: a padded Hugging Face batch).
    """
    single = model._single_batch(batch)
    blocks = covering_layers(model)
    stats = model.layer_statistics(single, measurement)
    return gradients_from_statistics(model, blocks, stats)


def embedding_gradients(
    model: InfluenceModel, block: LayerBlock, stats: dict[str, tuple[Array, Array]]
) -> Array:
    """An embedding's per-sample table gradients (b, vocabulary, width), its rows summed per
    (sample, token) and placed with one ``segment_sum`` (no (b, T, vocabulary) one-hot)."""
    indices, g = stats[block.layer.name]
    b, rows, width = int(g.shape[0]), block.layer.inputs, block.layer.outputs
    samples, tokens, summed = embedding_rows(model, indices, g)
    placed = model.kernels.segment_sum(summed, samples * rows + tokens, b * rows)
    return model.xp.reshape(placed, (b, rows, width))


def gradients_from_statistics(
    model: InfluenceModel, blocks: Sequence[LayerBlock], stats: dict[str, tuple[Array, Array]]
) -> Array:
    """The (b, d) per-sample gradients, in θ order, that the layers' statistics describe.

    An embedding's rows are summed per (sample, token) and placed with one
    ``segment_sum`` (no (b, T, vocabulary) one-hot array).
    """
    xp = model.xp
    pieces = []
    for block in blocks:
        if block.kind == "embedding":
            table = embedding_gradients(model, block, stats)
            b = int(table.shape[0])
            pieces.append((block.kernel_offset, xp.reshape(table, (b, -1))))
            continue
        (matrix,) = layer_gradient_matrices(xp, [block], stats)
        b, p_in, p_out = int(matrix.shape[0]), block.layer.inputs, block.layer.outputs
        kernel = xp.reshape(matrix[:, :p_in, :], (b, p_in * p_out))
        pieces.append((block.kernel_offset, kernel))
        if block.bias_offset is not None:
            pieces.append((block.bias_offset, matrix[:, p_in, :]))
    pieces.sort(key=lambda piece: piece[0])
    canonical = join(xp, [piece for _, piece in pieces], axis=1)  # (b, d), canonical
    return xp.matrix_transpose(model.from_canonical(xp.matrix_transpose(canonical)))


def with_bias_input(xp: Any, block: LayerBlock, a: Array) -> Array:
    """ã = [a, 1] when the layer has a bias (its gradient is then Σ_t ã_tᵀ g_t), else a."""
    if block.bias_offset is None:
        return a
    return xp.concat([a, xp.ones_like(a[:, :, :1])], axis=2)


def layer_gradient_dots(
    xp: Any,
    blocks: Sequence[LayerBlock],
    left: dict[str, tuple[Array, Array]],
    right: dict[str, tuple[Array, Array]],
) -> Array:
    """∇ℓ(z_i)·∇ℓ(z_j) for every pair (i of ``left``, j of ``right``): shape (n_left, n_right).

    Summed over layers without the (b, d) gradients. A layer applied once
    (T = 1, a dense layer) contributes (Ã_L Ã_Rᵀ) ⊙ (G_L G_Rᵀ), since
    ⟨ãᵀg, ã'ᵀg'⟩_F = (ã·ã')(g·g'): (p + o) multiply-adds per pair instead of
    p·o. A layer applied at T > 1 positions (a convolution) forms each
    sample's gradient matrix Σ_t ã_tᵀ g_t and takes the dot products of those.
    """
    total = None
    for block in blocks:
        (a_l, g_l), (a_r, g_r) = left[block.layer.name], right[block.layer.name]
        if block.kind == "embedding":
            part = _embedding_dots(xp, a_l, g_l, a_r, g_r)
        elif block.kronecker and int(a_l.shape[1]) == 1 and int(a_r.shape[1]) == 1:
            a_l, a_r = with_bias_input(xp, block, a_l), with_bias_input(xp, block, a_r)
            part = xp.matmul(a_l[:, 0, :], xp.matrix_transpose(a_r[:, 0, :])) * xp.matmul(
                g_l[:, 0, :], xp.matrix_transpose(g_r[:, 0, :])
            )
        else:
            (m_l,) = layer_gradient_matrices(xp, [block], {block.layer.name: (a_l, g_l)})
            (m_r,) = layer_gradient_matrices(xp, [block], {block.layer.name: (a_r, g_r)})
            m_l = xp.reshape(m_l, (int(m_l.shape[0]), -1))
            m_r = xp.reshape(m_r, (int(m_r.shape[0]), -1))
            part = xp.matmul(m_l, xp.matrix_transpose(m_r))
        total = part if total is None else total + part
    return total


def _embedding_dots(xp: Any, a_l: Array, g_l: Array, a_r: Array, g_r: Array) -> Array:
    """⟨G_i, G_j⟩ of two embedding gradients: Σ_{t,s} [a_it = a_js] g_it·g_js, shape (n_l, n_r).

    Left rows are taken in chunks so the (rows, T_l, n_r, T_r) match array
    stays under ``_MATCH_ENTRIES``; nothing of the vocabulary's size is formed.
    """
    n_l, t_l, width = int(g_l.shape[0]), int(g_l.shape[1]), int(g_l.shape[2])
    n_r, t_r = int(g_r.shape[0]), int(g_r.shape[1])
    right = xp.reshape(g_r, (n_r * t_r, width))
    step = max(1, _MATCH_ENTRIES // max(t_l * n_r * t_r, 1))
    parts = []
    for begin in range(0, n_l, step):
        idx, g = a_l[begin : begin + step], g_l[begin : begin + step]
        rows = int(g.shape[0])
        same = xp.astype(idx[:, :, None, None] == a_r[None, None, :, :], g.dtype)
        products = xp.reshape(
            xp.matmul(xp.reshape(g, (rows * t_l, width)), xp.matrix_transpose(right)),
            (rows, t_l, n_r, t_r),
        )
        parts.append(xp.sum(same * products, axis=(1, 3)))
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)


def layer_gradient_squared_norms(
    xp: Any, blocks: Sequence[LayerBlock], stats: dict[str, tuple[Array, Array]]
) -> Array:
    """‖∇ℓ(z_i)‖² for each sample, from layer statistics: shape (b,).

    (‖ã‖²)(‖g‖²) per dense layer (T = 1); the squared Frobenius norm of
    Σ_t ã_tᵀ g_t otherwise.
    """
    total = None
    for block in blocks:
        a, g = stats[block.layer.name]
        if block.kind == "embedding":
            same = xp.astype(a[:, :, None] == a[:, None, :], g.dtype)
            part = xp.sum(same * xp.matmul(g, xp.matrix_transpose(g)), axis=(1, 2))
        elif block.kronecker and int(a.shape[1]) == 1:
            a = with_bias_input(xp, block, a)
            part = xp.sum(a[:, 0, :] * a[:, 0, :], axis=1) * xp.sum(g[:, 0, :] * g[:, 0, :], axis=1)
        else:
            (matrix,) = layer_gradient_matrices(xp, [block], {block.layer.name: (a, g)})
            matrix = xp.reshape(matrix, (int(a.shape[0]), -1))
            part = xp.sum(matrix * matrix, axis=1)
        total = part if total is None else total + part
    return total
