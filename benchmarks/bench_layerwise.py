"""Scoring every training point through layer-wise statistics, against the physical limit.

    .venv/bin/python benchmarks/bench_layerwise.py [--n-train N] [--repeats R]

A small conv net (all parameters) on synthetic 16×16×3 images, torch,
float32, batch 256. Timed interleaved, medians over the repeats, one full pass
over the training data each:

* **limit**: one plain forward + backward of the mean loss per batch
  (``InfluenceModel.loss_grad``), what any per-example method must at least do;
* **EK-FAC scores, layer-wise**: first-order scores of every training point
  against n prepared test points (``--n-test``, 1 and 16 by default), the
  training side from layer statistics (no (b, d) matrix);
* **EK-FAC scores, through (b, d)**: the same scores from per-sample gradients
  of θ (what every solver without a layer-wise side does), at the largest n.

Against one test point a convolution is scored through its own convolution
of the solved kernel (``conv2d_map``: no patches, no per-sample G); against
more, through G formed once from the patches. Both routes are checked
against the (b, d) scores at the end.

The target of issues 16 and 25 is layer-wise ≤ 1.5x the limit. Exact scores
against n test points cost at least b·n·d multiply-adds per batch on top of
the statistics (one inner product of length d per pair); the table prints
that floor as a fraction of the limit's own multiply-adds.
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


def pass_macs(net: torch.nn.Module) -> tuple[int, int]:
    """Multiply-adds per sample: (a plain forward + backward, the layer-wise pass less its scores).

    A layer's forward is T·p·o (T positions). The plain backward is as much
    again for the weight gradient, and for the input gradient of every layer
    but the first. The layer-wise pass makes the same forward and input
    gradients; it forms a convolution's per-sample G (as many as its weight
    gradient) but never a dense layer's (its scores are (ã P) ⊙ g); its
    scores then add n·d per sample against n test points.
    """
    forward, dense, x = [], 0, torch.zeros(1, 3, 16, 16)
    for module in net:
        y = module(x)
        if isinstance(module, torch.nn.Conv2d):
            forward.append(y[0, 0].numel() * module.weight[0].numel() * module.out_channels)
        elif isinstance(module, torch.nn.Linear):
            forward.append(module.in_features * module.out_features)
            dense += forward[-1]
        x = y
    plain = sum(forward) * 3 - forward[0]
    return plain, plain - dense


class ThroughGradients(EKFACIHVP):
    training_side = InverseHessianVectorProduct.training_side


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n-test", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    set_progress(False)
    torch.manual_seed(0)
    net = conv_net()
    n = args.n_train
    X = torch.randn(n, 3, 16, 16)
    y = torch.randint(0, 10, (n,))
    n_tests = sorted(args.n_test)
    model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=256)
    train = (X, y)
    layerwise = FirstOrderInfluenceCalculator(model, EKFACIHVP()).fit(train)
    flat = FirstOrderInfluenceCalculator(model, ThroughGradients()).fit(train)
    prepared = {k: layerwise.prepare_test((X[:k], y[:k])) for k in n_tests}

    def limit() -> None:
        for batch in model.batches(train):
            model.kernels.mean_loss_grad(batch.inputs, batch.targets)

    def scores(calc: FirstOrderInfluenceCalculator, k: int) -> None:
        for _ in calc._scores_from_prepared(prepared[k], train):
            pass

    runs = {"limit": limit}
    for k in n_tests:
        runs[f"layer-wise, {k} test point{'s' * (k > 1)}"] = lambda k=k: scores(layerwise, k)
    runs[f"through (b, d), {n_tests[-1]} test points"] = lambda: scores(flat, n_tests[-1])
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
    plain, statistics_only = pass_macs(net)
    print(
        f"conv net, d = {d}, n_train = {n}, torch float32, batch 256, "
        f"{torch.get_num_threads()} threads; medians of {args.repeats} interleaved passes; "
        f"a plain pass: {plain / 1e6:.2f}M multiply-adds per sample"
    )
    print()
    print("| pass over the training data | seconds | x limit | multiply-adds, x limit |")
    print("|---|---:|---:|---:|")
    for name, seconds in medians.items():
        k = next((k for k in n_tests if name.startswith(f"layer-wise, {k} ")), None)
        macs = "1.00" if name == "limit" else ""
        if k is not None:
            macs = f"{(statistics_only + k * d) / plain:.2f}"
        print(f"| {name} | {seconds:.3f} | {seconds / medians['limit']:.2f} | {macs} |")
    print()
    for k in n_tests:  # one test point goes through conv2d_map, more through G
        a, b = (
            np.concatenate(
                [s.numpy() for _, s in calc._scores_from_prepared(prepared[k], train)], 1
            )
            for calc in (layerwise, flat)
        )
        difference = np.abs(a - b).max() / np.abs(b).max()
        print(
            f"layer-wise vs (b, d) scores, {k} test points: max relative difference {difference:.1e}"
        )


if __name__ == "__main__":
    main()
