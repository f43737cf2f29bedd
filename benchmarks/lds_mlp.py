"""Linear datamodeling score (LDS) of every estimator on the 0.1M-parameter MLP, with kronfluence's EK-FAC.

    .venv/bin/python benchmarks/lds_mlp.py [--subsets M] [--no-kronfluence]

Setup: an MLP 784-128-10 (tanh, d = 101,770, all parameters), float64 torch,
on synthetic Gaussian class clusters (10 classes, 10 % flipped labels),
n_train = 2000, n_test = 50. Training is deterministic: the same seeded
initialisation (with ``--seeds S``, each subset is retrained from S
initialisations and the test losses averaged, seed 0 being the attributed
model's), 300 full-batch Adam steps (lr 1e-3), mean cross-entropy +
(μ/2)‖θ‖² with μ = 1e-3; checkpoints every 60 steps feed TracIn.

LDS (Park et al., TRAK, ICML 2023; ``influence_core.evaluation``, scoring
each estimator's score matrix against the cached retrainings): M random subsets S_j of half the training
set, the model retrained on each from the same initialisation, and for each
test point the Spearman correlation over j between the actual test loss
after training on S_j and the additive prediction −Σ_{i ∈ S_j} τ(z_i, z_test)
(positive τ is a proponent: its presence lowers the loss). Reported: the mean
over the 50 test points and a 95 % interval (mean ± 1.96 standard errors
over test points). The retrainings are cached in ``benchmarks/results/``.

kronfluence (its own venv, ``benchmarks/peers/setup_envs.sh``) runs EK-FAC
on the same weights and data, empirical Fisher, same damping.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from influence_core import (
    EKFACIHVP,
    KFACIHVP,
    ArnoldiIHVP,
    ArnoldiInfluenceCalculator,
    ConjugateGradientIHVP,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
    NotPositiveDefiniteError,
    TracIn,
    set_progress,
)
from influence_core.evaluation import LDSResult, linear_datamodeling_score

HERE = Path(__file__).resolve().parent
KRONFLUENCE = HERE / ".envs" / "kronfluence" / "bin" / "python"
N, M_TEST, STEPS, LR, MU, EVERY = 2000, 50, 300, 1e-3, 1e-3, 60
DAMPING = 1e-2


def dataset() -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, N + M_TEST)
    X = rng.normal(size=(10, 784))[y] * 0.15 + rng.normal(size=(N + M_TEST, 784))
    flipped = rng.random(N + M_TEST) < 0.1
    y[flipped] = rng.integers(0, 10, int(flipped.sum()))
    return torch.from_numpy(X), torch.from_numpy(y)


def network(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(784, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10)
    ).double()


def train(
    X: torch.Tensor, y: torch.Tensor, seed: int = 0
) -> tuple[torch.nn.Sequential, list[dict]]:
    net = network(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    checkpoints = []
    for step in range(1, STEPS + 1):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(X), y)
        loss = loss + 0.5 * MU * sum((p * p).sum() for p in net.parameters())
        loss.backward()
        optimizer.step()
        if step % EVERY == 0:
            checkpoints.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    return net, checkpoints


def test_losses(net: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(net(X), y, reduction="none").numpy()


def retrained(X, y, subsets: np.ndarray, seeds: int = 1) -> np.ndarray:
    """Test losses (M, n_test) after retraining on each subset, averaged over ``seeds``
    initialisations (seed 0 is the attributed model's); cached on disk."""
    suffix = "" if seeds == 1 else f"_{seeds}seeds"
    cache = HERE / "results" / f"lds_mlp_{len(subsets)}{suffix}.npz"
    if cache.exists():
        saved = np.load(cache)
        if np.array_equal(saved["subsets"], subsets):
            return saved["losses"]
    began, losses = time.perf_counter(), []
    for j, subset in enumerate(subsets):
        runs = [train(X[:N][subset], y[:N][subset], seed)[0] for seed in range(seeds)]
        losses.append(np.mean([test_losses(net, X[N:], y[N:]) for net in runs], axis=0))
        if j % 10 == 9:
            print(f"  retrained {j + 1}/{len(subsets)} ({time.perf_counter() - began:.0f} s)")
    cache.parent.mkdir(exist_ok=True)
    np.savez(cache, subsets=subsets, losses=np.array(losses))
    return np.array(losses)


def lds(scores: np.ndarray, subsets: np.ndarray, losses: np.ndarray) -> tuple[float, float]:
    """The library's LDS (influence_core.evaluation) of a score matrix against the cached retrainings."""
    result = linear_datamodeling_score(scores, LDSResult.from_retrained(subsets, losses))
    return result.score, result.interval


def kronfluence_scores(net: torch.nn.Sequential, X, y) -> tuple[np.ndarray, float]:
    setup = {
        "X_train": X[:N].numpy(),
        "y_train": y[:N].numpy(),
        "X_test": X[N:].numpy(),
        "y_test": y[N:].numpy(),
        "hidden": np.array(128),
        "damping": np.array(DAMPING),
        "W0": net[0].weight.detach().numpy(),
        "b0": net[0].bias.detach().numpy(),
        "W1": net[2].weight.detach().numpy(),
        "b1": net[2].bias.detach().numpy(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(f"{tmp}/setup.npz", **setup)
        script = HERE / "peers" / "run_kronfluence.py"
        subprocess.run(
            [str(KRONFLUENCE), str(script), f"{tmp}/setup.npz", f"{tmp}/k.npz"], check=True
        )
        theirs = dict(np.load(f"{tmp}/k.npz"))
    return theirs["ekfac_pairwise"], float(theirs["ekfac_seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subsets", type=int, default=64)
    parser.add_argument("--no-kronfluence", action="store_true")
    parser.add_argument(
        "--ekfac-grid",
        action="store_true",
        help="only EK-FAC over a damping grid (true and empirical Fisher) on the retrainings",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="initialisations each subset is retrained from, their test losses averaged",
    )
    args = parser.parse_args()
    set_progress(False)
    torch.set_num_threads(2)
    X, y = dataset()
    began = time.perf_counter()
    net, checkpoints = train(X[:N], y[:N])
    print(f"trained in {time.perf_counter() - began:.1f} s")
    subsets = np.stack(
        [
            np.sort(np.random.default_rng([1, j]).permutation(N)[: N // 2])
            for j in range(args.subsets)
        ]
    )
    losses = retrained(X, y, subsets, args.seeds)
    model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=500)
    train_data, test = (X[:N], y[:N]), (X[N:], y[N:])

    def first_order(solver):
        return FirstOrderInfluenceCalculator(model, solver).fit(train_data).influence(test)

    if args.ekfac_grid:
        print("| EK-FAC | λ | LDS |\n|---|---:|---:|")
        for fisher in ("true", "empirical"):
            for damping in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2):
                scores = model.to_numpy(first_order(EKFACIHVP(damping=damping, fisher=fisher)))
                value, half = lds(scores, subsets, losses)
                print(f"| {fisher} Fisher | {damping:g} | {value:.3f} ± {half:.3f} |", flush=True)
        return

    methods = {
        "Grad-Dot (final weights)": lambda: (
            TracIn(model, [checkpoints[-1]], 1.0).fit(train_data).influence(test)
        ),
        f"TracIn ({len(checkpoints)} checkpoints)": lambda: (
            TracIn(model, checkpoints, LR).fit(train_data).influence(test)
        ),
        "EK-FAC, true Fisher, default damping": lambda: first_order(EKFACIHVP()),
        "EK-FAC, true Fisher, the former default (0.1 × each layer's mean eigenvalue)": lambda: (
            first_order(EKFACIHVP(damping=None, relative_damping=0.1))
        ),
        f"EK-FAC, true Fisher, λ = {DAMPING}": lambda: first_order(EKFACIHVP(damping=DAMPING)),
        f"EK-FAC, empirical Fisher, λ = {DAMPING}": lambda: first_order(
            EKFACIHVP(damping=DAMPING, fisher="empirical")
        ),
        f"K-FAC, true Fisher, λ = {DAMPING}": lambda: first_order(KFACIHVP(damping=DAMPING)),
        f"CG-10 on the Hessian, λ = {DAMPING}": lambda: first_order(
            ConjugateGradientIHVP(damping=DAMPING, maxiter=10, tol=1e-6)
        ),
        f"CG on the Hessian, λ = {DAMPING}": lambda: first_order(
            ConjugateGradientIHVP(damping=DAMPING, maxiter=100, tol=1e-6)
        ),
        f"CG on the Gauss-Newton matrix, λ = {DAMPING}": lambda: first_order(
            ConjugateGradientIHVP(damping=DAMPING, maxiter=100, tol=1e-6, curvature="ggn")
        ),
        f"Arnoldi rank 50 on the Gauss-Newton matrix, λ = {DAMPING}": lambda: (
            ArnoldiInfluenceCalculator(
                model, ArnoldiIHVP(damping=DAMPING, rank=50, curvature="ggn")
            )
            .fit(train_data)
            .influence(test)
        ),
    }
    rows, scores = [], {}
    for name, compute in methods.items():
        began = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                scores[name] = model.to_numpy(compute())
        except NotPositiveDefiniteError as error:
            rows.append((name, None, None, time.perf_counter() - began, str(error)[:120]))
            continue
        ours = [w for w in caught if not issubclass(w.category, DeprecationWarning)]
        note = "; ".join(str(w.message)[:90] for w in ours)  # torch's own deprecations dropped
        rows.append((name, *lds(scores[name], subsets, losses), time.perf_counter() - began, note))
        print(f"  {name}: {rows[-1][1]:.3f} in {rows[-1][3]:.1f} s", flush=True)
    if not args.no_kronfluence and KRONFLUENCE.exists():
        theirs, seconds = kronfluence_scores(net, X, y)
        scores["kronfluence EK-FAC"] = theirs
        rows.append(
            (
                f"kronfluence EK-FAC, empirical Fisher, λ = {DAMPING}",
                *lds(theirs, subsets, losses),
                seconds,
                "",
            )
        )
    print()
    print(
        f"MLP 784-128-10 (d = {model.num_parameters}), n_train = {N}, n_test = {M_TEST}, "
        f"{args.subsets} subsets of {N // 2} × {args.seeds} retraining seed(s), float64, "
        f"torch {torch.get_num_threads()} threads"
    )
    print()
    print("| method | LDS | 95 % interval | seconds | note |")
    print("|---|---:|---:|---:|---|")
    for name, value, half, seconds, note in rows:
        if value is None:
            print(f"| {name} | stopped | | {seconds:.1f} | {note} |")
        else:
            print(f"| {name} | {value:.3f} | ± {half:.3f} | {seconds:.1f} | {note} |")
    reference = scores.get(f"EK-FAC, true Fisher, λ = {DAMPING}")
    print()
    for name, value in scores.items():
        if reference is not None:
            r = np.corrcoef(value.ravel(), reference.ravel())[0, 1]
            print(f"Pearson of {name} with EK-FAC (true Fisher, λ = {DAMPING}): {r:.4f}")
    ours = scores.get(f"EK-FAC, empirical Fisher, λ = {DAMPING}")
    if "kronfluence EK-FAC" in scores and ours is not None:
        theirs = scores["kronfluence EK-FAC"]
        gap = np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs))
        print(f"ours against kronfluence (EK-FAC, empirical, same λ): max rel. diff {gap:.1e}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
