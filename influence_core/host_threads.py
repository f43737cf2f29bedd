"""Host linear algebra (NumPy's BLAS/LAPACK) with no more threads than the framework uses.

The core decomposes small dense matrices on the host in float64 (K-FAC's
factors, TRAK's kernel). NumPy's BLAS starts as many threads as there are
cores, whatever the framework was told: with ``torch.set_num_threads(1)``
(data-loader workers, one process per core, a shared machine) its threads
compete with everything else, and a 1025 × 1025 ``eigh`` measured 0.75-2.8 s
with two threads against 0.44-0.48 s with one on a loaded 2-core machine
(``benchmarks/bench_host_threads.py``). :func:`host_threads` bounds them to
the backend's count (:meth:`~influence_core.plugin.ModelKernels.host_threads`)
through ``threadpoolctl`` when it is installed; otherwise it does nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["host_threads"]


@contextmanager
def host_threads(model: Any) -> Iterator[int | None]:
    """Inside the block, NumPy's BLAS uses at most the backend's thread count (``None``: as it is)."""
    limit = model.kernels.host_threads()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        limit = None
    if limit is None:
        yield None
        return
    with threadpool_limits(limits=int(limit), user_api="blas"):
        yield int(limit)
