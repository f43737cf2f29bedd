"""Host eigendecompositions with NumPy's default BLAS threads against the framework's count.

    .venv/bin/python benchmarks/bench_host_threads.py [--size 1025] [--repeats 5]

K-FAC/EK-FAC decompose each layer's factors on the host in float64. This
times ``numpy.linalg.eigh`` of a size × size SPD matrix (a dense layer's
1024 inputs + bias) with NumPy's BLAS as it starts (one thread per core)
and bounded to 1 thread (``torch.set_num_threads(1)``, what
``influence_core.host_threads`` then applies), alternating, and prints the
median of each and their ratio. Run it on an idle machine and beside a
load (e.g. the test suite): the bound matters under contention.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1025)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    A = rng.standard_normal((args.size, args.size))
    A = A @ A.T / args.size
    default = max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
    times: dict[str, list[float]] = {"default": [], "one": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        np.linalg.eigh(A)
        times["default"].append(time.perf_counter() - start)
        with threadpool_limits(limits=1, user_api="blas"):
            start = time.perf_counter()
            np.linalg.eigh(A)
            times["one"].append(time.perf_counter() - start)
    d, o = statistics.median(times["default"]), statistics.median(times["one"])
    print(f"eigh {args.size}x{args.size}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
    print(f"| BLAS threads | median (s) |\n|---|---:|\n| {default} (default) | {d:.3f} |")
    print(f"| 1 | {o:.3f} |\n\nratio default / one thread: {d / o:.2f}")


if __name__ == "__main__":
    main()
