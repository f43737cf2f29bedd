"""Peak memory of per-sample-gradient scoring against ``InfluenceModel(gradient_memory=)``.

    .venv/bin/python benchmarks/bench_gradient_memory.py [--n-train 1024] [--batch 256]

TracIn through per-sample gradients (``layerwise=False``: the path a model
whose layers have no statistics takes) on a 5.2M-parameter torch MLP
(1024-2048-1512-10, float32): influence of 8 test points and self-influence
over n_train points in batches of ``--batch``. Each setting runs in its own
process; reported: wall time, peak RSS (``ru_maxrss``) and the largest block of
per-sample gradients the kernels returned. With ``gradient_memory=None`` a
batch of 256 is one (256, 5.2M) block (5.3 GB in float32, and about as much
again inside ``vmap`` before it is joined); the default bound (1 GiB) cuts it
into sub-batches of 51.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

SETTINGS = {"unbounded": None, "default (1 GiB)": 2**30, "256 MiB": 2**28}


def run(memory: int | None, n_train: int, batch: int) -> dict[str, float]:
    import numpy as np
    import torch

    from influence_core import InfluenceModel, TracIn

    torch.manual_seed(0)
    torch.set_num_threads(2)
    net = torch.nn.Sequential(
        torch.nn.Linear(1024, 2048),
        torch.nn.Tanh(),
        torch.nn.Linear(2048, 1512),
        torch.nn.Tanh(),
        torch.nn.Linear(1512, 10),
    )
    model = InfluenceModel(
        net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=batch, gradient_memory=memory
    )
    largest = [0]
    kernel = model.kernels.per_sample_grads

    def measured(inputs, targets):
        largest[0] = max(largest[0], int(targets.shape[0]))
        return kernel(inputs, targets)

    model.kernels.per_sample_grads = measured
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n_train, 1024)).astype(np.float32)
    y = rng.integers(0, 10, n_train)
    start = time.perf_counter()
    tracin = TracIn(model, [model.save_state()], 0.1, layerwise=False).fit((X, y))
    tracin.influence((X[:8], y[:8]))
    tracin.self_influence()
    return {
        "seconds": time.perf_counter() - start,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "largest_block_rows": largest[0],
        "d": model.num_parameters,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        memory = None if args.one == "None" else int(args.one)
        print(json.dumps(run(memory, args.n_train, args.batch)))
        return
    print(f"n_train={args.n_train}, batch={args.batch}")
    print("| gradient_memory | rows per block | wall (s) | peak RSS (GB) |\n|---|---:|---:|---:|")
    for name, memory in SETTINGS.items():
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                str(memory),
                "--n-train",
                str(args.n_train),
                "--batch",
                str(args.batch),
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            print(f"| {name} | failed: {out.stderr.strip().splitlines()[-1]} | | |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"| {name} | {r['largest_block_rows']} | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f} |"
        )


if __name__ == "__main__":
    main()
