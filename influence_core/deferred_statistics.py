"""Layer statistics whose convolution patches are formed only when something reads them.

A convolution's statistics a are its patches (b, T, kh·kw·in): kh·kw/stride²
times its input, one copy per batch. A first-order score against one test
point never needs them: with P the layer's solved test kernel,

    ⟨G_i, P⟩ = Σ_t a_it P · g_it,

and a_it P over every position t is the layer's own convolution of its input
x_i by P (:meth:`~influence_core.plugin.ModelKernels.conv2d_map`), the same
b·T·p·o multiply-adds as forming G_i, without the patches or the (b, p, o)
block. :class:`DeferredStatistics` holds what
:meth:`~influence_core.plugin.ModelKernels.layer_statistics_deferred` gives
(a convolution's input x in place of its patches) and forms a layer's patches
through :meth:`~influence_core.plugin.ModelKernels.conv2d_patches` the first
time ``stats[name]`` is read, so every reader of statistics works unchanged;
:meth:`deferred_input` and :meth:`gradients` read a convolution without
forming them. A backend without the capability gives the usual statistics,
and nothing is deferred.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from .plugin.protocol import Layer

__all__ = ["DeferredStatistics"]

Array = Any


class DeferredStatistics(Mapping):
    """``{layer name: (a, g)}`` whose ``"conv2d"`` entries form their patches on first read."""

    def __init__(
        self,
        model: Any,
        raw: Mapping[str, tuple[Array, Array]],
        layers: tuple[Layer, ...],
        batch_size: int,
        *,
        deferred: bool,
    ) -> None:
        self.model, self.batch_size = model, batch_size
        # Our own entries: a convolution's input is dropped once its patches replace it.
        self._entries: dict[str, tuple[Array, Array]] = dict(raw)
        self._layers = {layer.name: layer for layer in layers}
        self._deferred = (
            {layer.name for layer in layers if layer.kind == "conv2d"} if deferred else set()
        )
        self._formed: set[str] = set()
        for name in self._deferred:  # g as layer_statistics gives it; x is the backend's own
            shape, o = tuple(int(s) for s in raw[name][1].shape), self._layers[name].outputs
            if len(shape) != 3 or shape[0] != batch_size or shape[2] != o:
                raise ValueError(
                    f"the {model.backend} backend's deferred layer statistics of layer {name!r} "
                    f"(conv2d, p_out={o}) have g of shape {shape} for a batch of "
                    f"{batch_size}; expected (b={batch_size}, T, {o})"
                )

    def deferred_input(self, name: str) -> Array | None:
        """A convolution's input x for :meth:`~influence_core.plugin.ModelKernels.conv2d_map`
        while its patches are not formed; None otherwise."""
        if name in self._deferred and name not in self._formed:
            return self._entries[name][0]
        return None

    def gradients(self, name: str) -> Array:
        """g of a layer, (b, T, p_out), without forming its patches."""
        return self._entries[name][1]

    def __getitem__(self, name: str) -> tuple[Array, Array]:
        if name in self._deferred and name not in self._formed:
            from .model import check_layer_statistics

            layer = self._layers[name]
            x, g = self._entries[name]
            formed = {name: (self.model.kernels.conv2d_patches(layer, x), g)}
            check_layer_statistics([layer], formed, self.batch_size, self.model.backend)
            self._entries[name] = formed[name]  # x is no longer held here
            self._formed.add(name)
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
