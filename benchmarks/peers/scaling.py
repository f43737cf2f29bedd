"""How influence_core's time and peak memory grow with n_train and with d (project venv).

    scaling.py            every point, each in its own process; writes results/peers/scaling.md
    scaling.py N WHICH    one point (used by the above): prints a JSON record

Streaming mode: the exact (H + λI)⁻¹ (the Hessian built batch by batch), the
top-10 proponents of 100 test points and the self-influence of every training
point, without ever holding an n × d gradient matrix or an n_test × n_train
score matrix. Generated data (digits training points resampled with Gaussian noise, σ = 0.05)
through the benchmark MLP; PyTorch backend, float64.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import warnings

import numpy as np
from common import DAMPING, RESULTS, TOP_K, load_setup, peak_memory_mb, unflatten

N_TRAIN = (1_000, 3_000, 10_000, 30_000, 100_000)
D_AT = 3_000  # n_train for the last-layer → all-parameter comparison


def point(n: int, which: str) -> dict:
    from influence_core import (
        ExactIHVP,
        FirstOrderInfluenceCalculator,
        InfluenceModel,
        get_registry,
    )
    from influence_core.app.demo import SPEC

    s = load_setup()
    rng = np.random.default_rng(n)
    rows = rng.integers(0, len(s["y_train"]), size=n + 100)  # digits, resampled with noise
    X = np.clip(s["X_train"][rows] + rng.normal(scale=0.05, size=(n + 100, 64)), 0.0, 1.0)
    y = s["y_train"][rows]
    train, test = (X[:n], y[:n]), (X[n:], y[n:])
    data_mb = X.nbytes / 2**20
    reference = (
        get_registry()
        .by_name("torch")
        .load_reference_models()(SPEC, unflatten(s["theta"]), "float64")
    )
    full = InfluenceModel(reference.model, reference.loss_fn, batch_size=512)
    model = full.with_parameters(full.last_layer().name) if which == "last" else full
    before = peak_memory_mb()
    start = time.perf_counter()
    calc = FirstOrderInfluenceCalculator(model, ExactIHVP(damping=DAMPING)).fit(train)
    calc.top_k(test, k=TOP_K)
    calc.self_influence()
    seconds = time.perf_counter() - start
    return {
        "n_train": n,
        "which": which,
        "d": model.num_parameters,
        "seconds": seconds,
        "peak_mb": peak_memory_mb(),
        "before_mb": before,
        "data_mb": data_mb,
    }


def main() -> None:
    plan = [(n, "last") for n in N_TRAIN] + [(D_AT, "all")]
    rows = []
    for n, which in plan:
        done = subprocess.run(
            [sys.executable, __file__, str(n), which], capture_output=True, text=True, check=True
        )
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    lines = [
        "## Scaling: influence_core in streaming mode",
        "",
        "Exact (H + λI)⁻¹, top-10 proponents of 100 test points and self-influence of every training point; "
        "generated data, PyTorch, float64, batches of 512, one cold call in a fresh process per row, so fixed costs "
        "(first calls into torch.func, the Hessian of d² entries) are included (`benchmarks/peers/scaling.py`). "
        "*peak* is the process's maximum resident set; *before* is the same just before the computation (framework, "
        "model and the data already loaded), so *peak − before* is what the computation itself used.",
        "",
        "| n_train | θ | d | time | time per training point | peak | before | peak − before | data (inputs) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n_train']:,} | {r['which']} | {r['d']} | {r['seconds']:.2f} s | "
            f"{1e3 * r['seconds'] / r['n_train']:.1f} ms | {r['peak_mb']:.0f} MB | {r['before_mb']:.0f} MB | "
            f"{r['peak_mb'] - r['before_mb']:.0f} MB | {r['data_mb']:.0f} MB |"
        )
    (RESULTS / "scaling.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    if len(sys.argv) == 3:
        print(json.dumps(point(int(sys.argv[1]), sys.argv[2])))
    else:
        main()
