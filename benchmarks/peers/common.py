"""Shared by every runner (NumPy and the standard library only): data, workloads, timing, output.

Each runner runs one workload per process (so peak memory is that workload's)
and writes a JSON record plus the scores it computed (``.npy``) to the
results directory; ``report.py`` turns them into ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parents[1] / "results" / "peers"
SETUP = RESULTS / "setup.npz"
PROFILES = RESULTS / "profiles.md"  # profile_close_calls.py → report.py
DAMPING = 1e-2  # H + λI is positive definite for every parameter set (1e-3 is not, for "all")
CG_ITERATIONS = 10
LISSA_DEPTH, LISSA_SCALE = 100, 0.5  # full-batch LiSSA (deterministic); λ_max(H_last) ≈ 0.28
ARNOLDI_RANK, ARNOLDI_ITERATIONS = 50, 100
CHECKPOINT_RATE = 1.0
TOP_K = 10
SLOW_S = 30.0

#: name → (what, θ): "last" = the last layer (d = 330), "all" = every parameter (d = 2410);
#: workloads ending in "_conv" use the conv net (d = 2970) instead of the MLP.
WORKLOADS: dict[str, tuple[str, str]] = {
    "grads_all": ("per-sample gradients of every training point (n × d)", "all"),
    "exact_last": ("exact influence, test × train + self-influence", "last"),
    "exact_all": ("exact influence, test × train + self-influence", "all"),
    "cg_last": (f"CG influence ({CG_ITERATIONS} iterations), test × train", "last"),
    "lissa_last": (
        f"LiSSA influence (full batch, depth {LISSA_DEPTH}, scale {LISSA_SCALE}), test × train",
        "last",
    ),
    "arnoldi_last": (f"Arnoldi influence (rank {ARNOLDI_RANK}), test × train + self", "last"),
    "tracin_all": ("TracInCP, 5 checkpoints, test × train + self-influence", "all"),
    "topk_last": (f"exact influence, the top-{TOP_K} proponents of each test point", "last"),
    "tracin_conv": (
        "TracInCP on the conv net, 5 checkpoints, test × train + self-influence",
        "all",
    ),
}
#: Canonical (Keras) layouts: the MLP 64-32-10 tanh (d = 2410) and the conv net on 8×8×1
#: images, Conv2D(8, 3×3, relu) → Flatten → Dense(10) (d = 2970).
SHAPES = [(64, 32), (32,), (32, 10), (10,)]
CONV_SHAPES = [(3, 3, 1, 8), (8,), (288, 10), (10,)]


def unflatten(theta: np.ndarray) -> list[np.ndarray]:
    """Canonical flat θ → [kernel, bias, kernel, bias] of the MLP or the conv net (by size)."""
    shapes = CONV_SHAPES if theta.size == sum(int(np.prod(s)) for s in CONV_SHAPES) else SHAPES
    out, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        out.append(theta[start : start + size].reshape(shape))
        start += size
    return out


def is_conv(workload: str) -> bool:
    return workload.endswith("_conv")


def load_setup(workload: str = "") -> dict[str, np.ndarray]:
    """Data, θ and checkpoints of the workload's model (conv: images 8×8×1 and the conv net's θ)."""
    with np.load(SETUP, allow_pickle=False) as stored:
        s = {k: stored[k] for k in stored.files}
    if is_conv(workload):
        s["theta"], s["checkpoints"] = s.pop("theta_conv"), s.pop("checkpoints_conv")
        s["X_train"], s["X_test"] = (s[k].reshape(-1, 8, 8, 1) for k in ("X_train", "X_test"))
    return s


def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Wall times of ``repeats`` calls after one warm-up call, and the last result.

    A warm-up slower than ``SLOW_S`` counts as the only measurement: the slowest
    peers take minutes per call, and their median of one is still far from ours.
    """
    start = time.perf_counter()
    result = fn()
    first = time.perf_counter() - start
    if first > SLOW_S:
        return [first], result
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write(
    library: str,
    backend: str,
    workload: str,
    times: list[float],
    scores: dict[str, np.ndarray],
    note: str = "",
) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{workload}__{library}__{backend}".replace(" ", "_")
    for name, value in scores.items():
        np.save(RESULTS / f"{stem}__{name}.npy", np.asarray(value, dtype=np.float64))
    record = {
        "library": library,
        "backend": backend,
        "workload": workload,
        "times": times,
        "median_s": statistics.median(times),
        "peak_mb": peak_memory_mb(),
        "scores": sorted(scores),
        "note": note,
        "python": sys.version.split()[0],
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=2))
    print(
        f"{workload:14s} {library:15s} {backend:10s} {record['median_s'] * 1e3:9.1f} ms  {record['peak_mb']:7.0f} MB"
    )
