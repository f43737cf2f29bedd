"""One buffer reused for the large per-batch products of a pass over the data.

A fresh array above the C allocator's mmap threshold (glibc: at most 32 MiB)
is new pages from the operating system, each zeroed on its first touch, and
returned when it is freed. The layer-wise solvers form a (b, p, o) block per
layer and batch: on the benchmarks' 5.2M transformer a dense layer's at
b = 32, p = 257, o = 1024 is 33.7 MB, and as a fresh product it took 10.7 ms
where written into a reused buffer it took 3.3 ms (torch, 2 threads, the same
product). A :class:`Workspace` writes such products into one buffer, grown to
the largest asked for and dropped with the workspace, through the backend's
:meth:`~influence_core.plugin.ModelKernels.matmul_into`. A backend without it
(immutable arrays: JAX, TensorFlow) gets ``xp.matmul``.

A product the workspace returns is a view of its buffer: it holds until the
next product asked of the same workspace.
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Any

from array_api_compat import device as array_device
from array_api_compat import is_writeable_array

from .plugin.protocol import UnsupportedByBackendError

__all__ = ["Workspace", "shared_workspace"]

Array = Any


class Workspace:
    """x1 @ x2 (same leading axes, or x2 two-dimensional) written into one reused buffer."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._buffer: Array | None = None
        self._writes: bool | None = None  # writeable arrays, and a backend with matmul_into

    def matmul(self, x1: Array, x2: Array) -> Array:
        xp = self.model.xp
        if self._writes is None:
            self._writes = is_writeable_array(x1)
        if not self._writes or len(x1.shape) < len(x2.shape):  # x2's leading axes: broadcast
            return xp.matmul(x1, x2)
        shape = (*(int(s) for s in x1.shape[:-1]), int(x2.shape[-1]))
        size = math.prod(shape)
        buffer, device = self._buffer, array_device(x1)
        if (
            buffer is None
            or int(buffer.shape[0]) < size
            or buffer.dtype != x1.dtype
            or array_device(buffer) != device
        ):
            buffer = xp.empty((size,), dtype=x1.dtype, device=device)
        try:
            product = self.model.kernels.matmul_into(x1, x2, xp.reshape(buffer[:size], shape))
        except UnsupportedByBackendError:
            self._writes = False
            return xp.matmul(x1, x2)
        self._buffer = buffer
        return product


_current = threading.local()


def shared_workspace(owner: Any, model: Any) -> Workspace:
    """The workspace of ``owner``'s pass in progress on this thread, or a new one.

    ``owner`` (a solver) keeps only a weak reference: the workspace lives as
    long as the training sides holding it. A pass creates the next batch's side
    while the previous one is still held, so one workspace serves the whole
    pass and is freed with its last side; nothing stays allocated between
    calls. Per thread, so concurrent passes never share a buffer.
    """
    refs = getattr(_current, "refs", None)
    if refs is None:
        refs = _current.refs = weakref.WeakKeyDictionary()
    ref = refs.get(owner)
    workspace = ref() if ref is not None else None
    if workspace is None or workspace.model is not model:
        workspace = Workspace(model)
        refs[owner] = weakref.ref(workspace)
    return workspace
