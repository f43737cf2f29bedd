"""Scoring every training point through layer-wise statistics, against the physical limit.

    .venv/bin/python benchmarks/bench_layerwise.py [--n-train N] [--repeats R]

A small conv net (all parameters) on synthetic 16×16×3 images, torch,
float32, batch 256. Timed interleaved, medians over the repeats, one full pass
over the training data each:

* **limit**: one plain forward + backward of the mean loss per batch
  (``InfluenceModel.loss_grad``), what any per-example method must at least do;
* **EK-FAC scores, layer-wise**: first-order scores of every training point
  against 16 prepared test points, the training side from layer statistics
  (no (b, d) matrix);
* **EK-FAC scores, through (b, d)**: the same scores from per-sample gradients
  of θ (what every solver without a layer-wise side does).

The target of issue 16 is layer-wise ≤ 1.5x the limit.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from influence_core import EKFACIHVP, FirstOrderInfluenceCalculator, InfluenceModel, set_progress
from influence_core.ihvp.base import InverseHessianVectorProduct


def conv_net(channels: tuple[int, int, int] = (32, 32, 64), hidden: int = 128) -> torch.nn.Module:
    """Three 3×3 convolutions (the last two stride 2) and two Linear layers, on 16×16×3 images."""
    c1, c2, c3 = channels
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, c1, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(c1, c2, 3, padding=1, stride=2),
        torch.nn.ReLU(),
        torch.nn.Conv2d(c2, c3, 3, padding=1, stride=2),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(c3 * 4 * 4, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    )


class ThroughGradients(EKFACIHVP):
    training_side = InverseHessianVectorProduct.training_side


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    set_progress(False)
    torch.manual_seed(0)
    net = conv_net()
    n = args.n_train
    X = torch.randn(n, 3, 16, 16)
    y = torch.randint(0, 10, (n,))
    test = (X[:16], y[:16])
    model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=256)
    train = (X, y)
    layerwise = FirstOrderInfluenceCalculator(model, EKFACIHVP()).fit(train)
    flat = FirstOrderInfluenceCalculator(model, ThroughGradients()).fit(train)
    prepared = layerwise.prepare_test(test)

    def limit() -> None:
        for batch in model.batches(train):
            model.kernels.mean_loss_grad(batch.inputs, batch.targets)

    def scores(calc: FirstOrderInfluenceCalculator) -> None:
        for _ in calc._scores_from_prepared(prepared, train):
            pass

    runs = {
        "limit": limit,
        "layer-wise": lambda: scores(layerwise),
        "through (b, d)": lambda: scores(flat),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm up
        run()
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    d = model.num_parameters
    print(
        f"conv net, d = {d}, n_train = {n}, 16 test points, torch float32, batch 256, "
        f"{torch.get_num_threads()} threads; medians of {args.repeats} interleaved passes"
    )
    print()
    print("| pass over the training data | seconds | x limit |")
    print("|---|---:|---:|")
    for name, seconds in medians.items():
        print(f"| {name} | {seconds:.3f} | {seconds / medians['limit']:.2f} |")
    a = np.concatenate([s.numpy() for _, s in layerwise._scores_from_prepared(prepared, train)], 1)
    b = np.concatenate([s.numpy() for _, s in flat._scores_from_prepared(prepared, train)], 1)
    print(
        f"\nlayer-wise vs (b, d) scores: max relative difference {np.abs(a - b).max() / np.abs(b).max():.1e}"
    )


if __name__ == "__main__":
    main()
