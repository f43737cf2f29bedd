"""Buffers reused by the batches of one pass: a convolution's patches are not fresh memory each batch.

The patches of a convolution are kh·kw times its input: 19 MB per batch of 256
for the 32-channel stride-2 layer of ``benchmarks/bench_layerwise.py``, hundreds
of MB for a ResNet's early layers. Allocated afresh every batch, each is new
pages from the operating system (zeroed on first touch), and on this project's
machines even the products that read them ran slower: a (256, 288, 64) by
(256, 64, 32) ``torch.matmul`` took 1.68 ms reading a freshly allocated operand
against 1.09 ms reading one reused over many calls (2 threads).

A :class:`BufferPool` hands out a buffer per key (layer, role, shape, dtype,
device) and hands it out again only once nothing else holds its storage: a
consumer that keeps the statistics of several batches (TRAK's held batches,
unrolled training's checkpoints) gets a new buffer for each, never one that
is still read. Whether a storage is held is its reference count
(``torch._C._storage_Use_Count``); where a torch lacks it, every buffer is fresh.

The pool of a pass lives as long as the statistics it gave out:
:class:`PooledStatistics` (the ``dict`` a kernel returns) holds it, and the
kernels only a weak reference. A pass holds one batch's statistics while it
computes the next, so the pool lives through the pass, alternating two
buffers per key, and is freed with the pass's last statistics: nothing stays
allocated between calls. Per thread, so concurrent passes never share one.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

__all__ = ["BufferPool", "PooledStatistics", "current_pool"]


def _use_count(tensor: torch.Tensor) -> int | None:
    """References to ``tensor``'s storage, less the one this call makes; None where unknown."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:  # pragma: no cover - every torch this project supports has it
        return None
    return int(count(tensor.untyped_storage()._cdata)) - 1


class BufferPool:
    """Buffers keyed by (key, shape, dtype, device), each handed out again once it is free."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[Any, ...], list[torch.Tensor]] = {}

    def take(
        self, key: Any, shape: tuple[int, ...], like: torch.Tensor
    ) -> tuple[torch.Tensor, bool]:
        """``(buffer, reused)``: a buffer of ``shape`` (``like``'s dtype and device) nothing else holds.

        A reused buffer holds what its last user left in it; a new one is uninitialised.
        """
        slot = (key, tuple(int(s) for s in shape), like.dtype, like.device)
        buffers = self._buffers.setdefault(slot, [])
        for buffer in buffers:
            if _use_count(buffer) == 1:  # the pool's own reference only
                return buffer, True
        buffer = like.new_empty(slot[1])
        if _use_count(buffer) is not None:  # a later batch can tell when it is free again
            buffers.append(buffer)
        return buffer, False


class PooledStatistics(dict):
    """Layer statistics that keep alive the pool their buffers came from (see the module docstring)."""

    def __init__(self, items: dict[str, Any], pool: BufferPool) -> None:
        super().__init__(items)
        self.pool = pool


_current = threading.local()  # per thread: {kernels: weak reference to their pass's pool}


def current_pool(owner: Any) -> BufferPool:
    """The pool of ``owner``'s (the kernels') pass in progress on this thread, or a new one."""
    pools = getattr(_current, "pools", None)
    if pools is None:
        pools = _current.pools = weakref.WeakKeyDictionary()
    ref = pools.get(owner)
    pool = ref() if ref is not None else None
    if pool is None:
        pool = BufferPool()
        pools[owner] = weakref.ref(pool)
    return pool
