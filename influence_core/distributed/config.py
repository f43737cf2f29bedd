"""Dask settings that matter for influence workloads on workers."""

from __future__ import annotations

from typing import Any

__all__ = ["worker_environment_config"]


def worker_environment_config() -> dict[str, Any]:
    """Dask config for new worker processes without ``MALLOC_TRIM_THRESHOLD_``: pass to ``dask.config.set``.

    Dask's nannies start workers with ``MALLOC_TRIM_THRESHOLD_=65536``. Any
    explicit value turns off glibc's dynamic mmap threshold (``mallopt``), so
    large temporaries (a batch's per-layer statistics, a (b, d) block) are
    allocated afresh every time. On this project's machine it made the EK-FAC
    run of ``benchmarks/distributed_self_influence.py`` 1.5× slower on one
    worker (``docs/distributed.md`` has the figures). Dask sets it to return
    memory to the OS sooner; keep it if that matters more to you::

        with dask.config.set(worker_environment_config()):
            cluster = LocalCluster(n_workers=2, threads_per_worker=1)

    (For a remote cluster, set the same on the machines that start the workers.)
    """
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    environ.pop("MALLOC-TRIM-THRESHOLD-", None)
    return {"distributed.nanny.pre-spawn-environ": environ}
