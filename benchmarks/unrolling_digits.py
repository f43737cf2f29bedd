"""Attribution through training on digits: the replayed run's metagradient against the estimators.

    .venv/bin/python benchmarks/unrolling_digits.py [--models softmax mlp] [--subsets 50]
        [--epochs 10] [--out benchmarks/results/unrolling_digits.json]

Data: scikit-learn's digits, standardised (``evaluation_digits.digits``),
n_train = 1000, n_test = 100, torch float64, all parameters. Training is one
deterministic run for every retraining: the same seeded initialisation, the
same seeded batch order, SGD (momentum 0.9, batch 100, weight decay μ, lr
0.05), ``--epochs`` epochs. (At lr 0.5 on softmax regression, or 0.1 on the
MLP, the run is far less smooth in the weights and the metagradient's LDS
drops: 0.18 and 0.89 at a 5 % drop, 2026-12-03.)
A retraining on a subset is that run with the other samples weighted 0
(:meth:`influence_core.unrolling.ReplayedTraining.retrain`): MAGIC's
setting, where the metagradient is exact.

LDS (``influence_core.evaluation``) on the same retrainings for every method,
at two subset sizes: 95 % of the training set (a 5 % drop, where the
metagradient's first-order prediction is close to exact) and 50 %. Methods:
the metagradient of the replayed run; exact influence at the final weights
on the Gauss–Newton matrix (λ = μ + the library default; the MLP's Hessian is
indefinite before convergence); EK-FAC at its default; TracIn over the run's
end-of-epoch checkpoints (η = lr); Grad-Dot; TRAK on the final weights
(k = 256, TRAK's margin); SOURCE (``ApproximateUnrolling``) over 1, 3 and
``--epochs`` segments of the run, each read at its last end-of-epoch
checkpoint, at the effective learning rate η / (1 − β) of momentum SGD, with
EK-FAC and with the exact Gauss–Newton matrix, both damped by μ. Costs: seconds of each
method's fit + scores, and the training run's own seconds for scale.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import evaluation_digits as digits_bench  # noqa: E402

from influence_core import (  # noqa: E402
    EKFACIHVP,
    TRAK,
    ExactIHVP,
    FirstOrderInfluenceCalculator,
    GradientSimilarity,
    InfluenceModel,
    TracIn,
    set_progress,
)
from influence_core.evaluation import linear_datamodeling_score  # noqa: E402
from influence_core.ihvp import DEFAULT_DAMPING  # noqa: E402
from influence_core.unrolling import SGD, ApproximateUnrolling, ReplayedTraining  # noqa: E402

SETTINGS = {"softmax": {"lr": 0.05, "mu": 1e-2}, "mlp": {"lr": 0.05, "mu": 1e-3}}


def evaluate(name: str, args: argparse.Namespace) -> list[dict]:
    X, y, Xt, yt = digits_bench.digits()
    train, test = (X.numpy(), y.numpy()), (Xt.numpy(), yt.numpy())
    net = digits_bench.network(name)  # seeded initialisation: θ₀ of every run
    model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=500)
    lr, mu = SETTINGS[name]["lr"], SETTINGS[name]["mu"]
    run = ReplayedTraining(
        model, train, SGD(lr=lr, momentum=0.9, weight_decay=mu), epochs=args.epochs, batch_size=100
    )
    final = run.retrain(np.arange(run.n))  # also warms the kernels up: the next run is timed
    began = time.perf_counter()
    run.train()
    training_seconds = time.perf_counter() - began
    steps_per_epoch = -(-run.n // 100)
    checkpoints = run.checkpoints(steps_per_epoch)
    model.load_weights(final)  # the estimators read the trained model; the run keeps θ₀

    timed: dict[str, tuple[object, float]] = {}
    began = time.perf_counter()
    timed["metagradient (replayed run)"] = (
        model.to_numpy(run.metagradient_scores(test)),
        time.perf_counter() - began,
    )
    # SOURCE: segments of the run, each read at its last checkpoint, at the effective learning
    # rate of momentum SGD, η / (1 − β); curvature EK-FAC with damping μ (the step's own + μI).
    effective = lr / (1 - 0.9)
    for segments in sorted({1, min(3, args.epochs), args.epochs}):
        bounds = np.linspace(0, args.epochs, segments + 1).round().astype(int)
        chosen = [checkpoints[b - 1] for b in bounds[1:]]
        steps = [int(b - a) * steps_per_epoch for a, b in itertools.pairwise(bounds)]
        curvatures = {
            "EK-FAC": EKFACIHVP(damping=mu),
            "exact Gauss-Newton": ExactIHVP(damping=mu, curvature="ggn"),
        }
        for curvature, solver in curvatures.items():
            unrolled = ApproximateUnrolling(
                model, chosen, [effective] * segments, steps, solver=solver
            )
            began = time.perf_counter()
            scores = model.to_numpy(unrolled.fit(train).influence(test))
            label = f"SOURCE ({segments} segment{'s' if segments > 1 else ''}, {curvature})"
            timed[label] = (scores, time.perf_counter() - began)
    calculators = {
        # Gauss-Newton: the MLP's Hessian mid-training is indefinite (its smallest eigenvalue
        # was -0.19 after 2 epochs); for softmax regression the two are the same matrix.
        "exact IF (Gauss-Newton)": FirstOrderInfluenceCalculator(
            model, ExactIHVP(damping=mu + DEFAULT_DAMPING, curvature="ggn")
        ),
        "EK-FAC (default)": FirstOrderInfluenceCalculator(model, EKFACIHVP()),
        f"TracIn ({len(checkpoints)} checkpoints)": TracIn(model, checkpoints, lr),
        "Grad-Dot": GradientSimilarity(model, "dot"),
        # k = 256: below the rank of the softmax's margin gradients (evaluation_digits.py).
        "TRAK (final weights, k = 256)": TRAK(model, projection_dim=256),
    }
    for label, calculator in calculators.items():
        began = time.perf_counter()
        scores = model.to_numpy(calculator.fit(train).influence(test))
        timed[label] = (scores, time.perf_counter() - began)

    rows = []
    for fraction in (0.95, 0.5):
        began = time.perf_counter()
        reference = linear_datamodeling_score(
            calculators["exact IF (Gauss-Newton)"],
            run.retrain,
            test,
            subsets=args.subsets,
            fraction=fraction,
            seed=1,
        )
        retraining_seconds = time.perf_counter() - began
        for label, (scores, seconds) in timed.items():
            result = linear_datamodeling_score(scores, reference)
            rows.append(
                {
                    "model": name,
                    "fraction": fraction,
                    "method": label,
                    "lds": result.score,
                    "interval": result.interval,
                    "seconds": seconds,
                    "training_seconds": training_seconds,
                    "retraining_seconds": retraining_seconds,
                }
            )
            print(
                f"{name} | {fraction:.0%} kept | {label} | {result.score:.3f} ± "
                f"{result.interval:.3f} | {seconds:.1f} s",
                flush=True,
            )
    began = time.perf_counter()
    run.metagradient_scores((test[0][:1], test[1][:1]))
    one_seconds = time.perf_counter() - began
    block_seconds = timed["metagradient (replayed run)"][1]
    for row in rows:
        row["metagradient_one_test_seconds"] = one_seconds
    print(
        f"{name}: one training run {training_seconds:.2f} s ({run.steps} steps); metagradient "
        f"of 1 test point {one_seconds:.2f} s ({one_seconds / training_seconds:.1f}x), "
        f"of {len(test[1])} {block_seconds:.2f} s ({block_seconds / training_seconds:.1f}x)"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["softmax", "mlp"])
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "unrolling_digits.json")
    args = parser.parse_args()
    set_progress(False)
    torch.set_num_threads(2)
    rows = []
    for name in args.models:
        rows += evaluate(name, args)
        args.out.parent.mkdir(exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
