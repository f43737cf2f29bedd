"""EK-FAC on every parameter of a ~1M-parameter conv net: time and peak memory against n_train.

    .venv/bin/python benchmarks/bench_ekfac_scale.py [--sizes 2000 5000 20000]

Each size runs in its own process (so its peak RSS is its own): a conv net on
synthetic 16×16×3 images, torch float32, batch 256, all parameters; EK-FAC
(true Fisher) fit, the top-10 proponents of 10 test points, and the
self-influence of every training point. Prints one row per size: seconds per
phase, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from bench_layerwise import conv_net

from influence_core import EKFACIHVP, FirstOrderInfluenceCalculator, InfluenceModel, set_progress


def one(n: int) -> dict[str, float]:
    set_progress(False)
    torch.manual_seed(0)
    X = torch.randn(n, 3, 16, 16)
    y = torch.randint(0, 10, (n,))
    net = conv_net(channels=(64, 128, 128), hidden=384)  # d = 1,013,898
    model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=256)
    start = time.perf_counter()
    calc = FirstOrderInfluenceCalculator(model, EKFACIHVP()).fit((X, y))
    fitted = time.perf_counter()
    calc.top_k((X[:10], y[:10]), k=10)
    ranked = time.perf_counter()
    calc.self_influence()
    done = time.perf_counter()
    return {
        "d": model.num_parameters,
        "fit": fitted - start,
        "top10": ranked - fitted,
        "self": done - ranked,
        "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 20000])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    print(
        f"conv net, torch float32, batch 256, EK-FAC (true Fisher), {torch.get_num_threads()} threads"
    )
    print()
    print(
        "| n_train | d | fit (s) | top-10 of 10 test points (s) | self-influence (s) | peak RSS (GB) |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for n in args.sizes:
        result = subprocess.run(
            [sys.executable, __file__, "--one", str(n)], capture_output=True, text=True, check=True
        )
        r = json.loads(result.stdout.strip().splitlines()[-1])
        print(
            f"| {n} | {r['d']} | {r['fit']:.1f} | {r['top10']:.1f} | {r['self']:.1f} "
            f"| {r['rss_gb']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
