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
Written once over the namespace; nothing here builds a (b, d) matrix except
:func:`per_sample_grads_from_layers`, which exists to check the statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .arrays import join
from .measurements import LOSS, Measurement
from .model import InfluenceModel
from .plugin.protocol import Layer

__all__ = [
    "LayerBlock",
    "covering_layers",
    "layer_gradient_dots",
    "layer_gradient_matrices",
    "layer_gradient_squared_norms",
    "per_sample_grads_from_layers",
    "with_bias_input",
]

Array = Any


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
        raise ValueError(
            f"parameters {missing} belong to no layer the {model.backend} backend gives "
            f"layer-wise statistics for (it supports: {', '.join(kinds)} here); select only "
            f"supported layers, e.g. parameters={[layer.name for layer in layers]}"
        )
    sizes = dict(zip(layout.names, layout.sizes, strict=True))
    blocks = []
    for layer in layers:
        if sizes[layer.kernel] != layer.inputs * layer.outputs:
            raise ValueError(
                f"the {model.backend} backend describes layer {layer.name!r} as "
                f"{layer.inputs} x {layer.outputs}, but its kernel {layer.kernel} has "
                f"{sizes[layer.kernel]} entries"
            )
        bias = None if layer.bias is None else offsets[layer.bias]
        blocks.append(LayerBlock(layer, offsets[layer.kernel], bias))
    return blocks


def layer_gradient_matrices(
    xp: Any, blocks: Sequence[LayerBlock], stats: dict[str, tuple[Array, Array]]
) -> list[Array]:
    """Per layer, the per-sample gradient matrices Σ_t ã_itᵀ g_it: shape (b, p_in [+1], p_out)."""
    out = []
    for block in blocks:
        a, g = stats[block.layer.name]
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
    statistics (it builds the (b, d) matrix the layer-wise solvers avoid).
    """
    xp = model.xp
    single = model._single_batch(batch)
    blocks = covering_layers(model)
    stats = model.layer_statistics(single, measurement)
    pieces = []
    for block, matrix in zip(blocks, layer_gradient_matrices(xp, blocks, stats), strict=True):
        b, p_in, p_out = single.size, block.layer.inputs, block.layer.outputs
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
        a_l, a_r = with_bias_input(xp, block, a_l), with_bias_input(xp, block, a_r)
        if int(a_l.shape[1]) == 1 and int(a_r.shape[1]) == 1:
            part = xp.matmul(a_l[:, 0, :], xp.matrix_transpose(a_r[:, 0, :])) * xp.matmul(
                g_l[:, 0, :], xp.matrix_transpose(g_r[:, 0, :])
            )
        else:
            n_l, n_r = int(a_l.shape[0]), int(a_r.shape[0])
            m_l = xp.reshape(xp.matmul(xp.matrix_transpose(a_l), g_l), (n_l, -1))
            m_r = xp.reshape(xp.matmul(xp.matrix_transpose(a_r), g_r), (n_r, -1))
            part = xp.matmul(m_l, xp.matrix_transpose(m_r))
        total = part if total is None else total + part
    return total


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
        a = with_bias_input(xp, block, a)
        if int(a.shape[1]) == 1:
            part = xp.sum(a[:, 0, :] * a[:, 0, :], axis=1) * xp.sum(g[:, 0, :] * g[:, 0, :], axis=1)
        else:
            matrix = xp.reshape(xp.matmul(xp.matrix_transpose(a), g), (int(a.shape[0]), -1))
            part = xp.sum(matrix * matrix, axis=1)
        total = part if total is None else total + part
    return total
