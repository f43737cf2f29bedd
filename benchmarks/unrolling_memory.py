"""Peak memory and time of a replayed run's metagradient against the number of steps T.

    .venv/bin/python benchmarks/unrolling_memory.py [--steps 40 200 800]

The 784-128-10 tanh MLP of ``lds_mlp.py`` (d = 101,770, torch float64) on its
synthetic data (n_train = 2000), SGD with momentum, batches of 100, one test
point; each T runs in a fresh process, which reports its peak RSS
(``ru_maxrss``) after one training run and again after the metagradient, and
both times. The states kept are (T/K + K) · 2d floats with K = ⌈√T⌉; keeping
every state instead would be T · 2d (1.6 MB per step here). ``--branching k``
runs REPLAY's k-ary scheme too (at most k states per level, ⌈log_k T⌉ levels).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def one(steps: int, branching: int | None = None) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    import lds_mlp

    from influence_core import InfluenceModel, set_progress
    from influence_core.unrolling import SGD, ReplayedTraining

    set_progress(False)
    torch.set_num_threads(2)
    X, y = lds_mlp.dataset()
    n = lds_mlp.N
    train = (X[:n].numpy(), y[:n].numpy())
    test = (X[n : n + 1].numpy(), y[n : n + 1].numpy())
    model = InfluenceModel(lds_mlp.network(), torch.nn.CrossEntropyLoss(reduction="none"))
    run = ReplayedTraining(  # 20 steps per epoch
        model,
        train,
        SGD(lr=0.05, momentum=0.9, weight_decay=1e-3),
        epochs=steps // 20,
        batch_size=100,
        branching=branching,
    )
    assert run.steps == steps, "T must be a multiple of 20"
    run.train()  # warms the kernels up: the second run is timed
    began = time.perf_counter()
    run.train()
    training = time.perf_counter() - began
    after_training = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    began = time.perf_counter()
    run.metagradient_scores(test)
    metagradient = time.perf_counter() - began
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "steps": steps,
        "checkpoint_every": run.checkpoint_every,
        "branching": branching,
        "levels": run.replay_levels_,
        "training_seconds": training,
        "metagradient_seconds": metagradient,
        "peak_rss_after_training_gb": after_training,
        "peak_rss_gb": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[40, 200, 800])
    parser.add_argument(
        "--branching",
        type=int,
        nargs="+",
        default=[0],
        help="0: the √T scheme; k ≥ 2: REPLAY's k-ary scheme (each is a row)",
    )
    parser.add_argument("--one", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1] or None)))
        return
    print(
        "| T | scheme | levels | training run (s) | metagradient (s) | ratio "
        "| peak RSS after training | peak RSS |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for steps, branching in ((t, b) for t in args.steps for b in args.branching):
        out = subprocess.run(
            [sys.executable, __file__, "--one", str(steps), str(branching)],
            capture_output=True,
            text=True,
        )
        if out.returncode:
            print(out.stderr[-2000:])
            raise SystemExit(out.returncode)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        scheme = f"k = {branching}" if branching else f"√T: K = {r['checkpoint_every']}"
        print(
            f"| {steps} | {scheme} | {r['levels']} | {r['training_seconds']:.1f} "
            f"| {r['metagradient_seconds']:.1f} "
            f"| {r['metagradient_seconds'] / r['training_seconds']:.1f}x "
            f"| {r['peak_rss_after_training_gb']:.2f} GB | {r['peak_rss_gb']:.2f} GB |",
            flush=True,
        )


if __name__ == "__main__":
    main()
