"""Faithfulness of every estimator on digits: LDS and LOO correlation, with their intervals.

    .venv/bin/python benchmarks/evaluation_digits.py [--models softmax mlp] [--subsets 100]
        [--loo 40] [--peers] [--out benchmarks/results/evaluation_digits.json]

Data: scikit-learn's digits (8 × 8, 10 classes), standardised, n_train =
1000, n_test = 100. Two models, torch float64, all parameters:

* **softmax**: multinomial logistic regression (d = 650), mean cross-entropy
  + (μ/2)‖θ‖², μ = 1e-2, trained from zeros by L-BFGS to convergence: convex,
  so retraining is exact.
* **mlp**: 64-32-10 tanh (d = 2410), μ = 1e-3, trained from one seeded
  initialisation by L-BFGS (1000 iterations): non-convex.

Every retraining runs the same training from the same initialisation on the
subset (LOO: warm-started from the trained weights, as Koh and Liang do).
The protocol is :mod:`influence_core.evaluation`'s: LDS over ``--subsets``
random halves, Spearman per test point of −Σ_{i∈S} τ against the retrained
test loss, mean ± 1.96 standard errors over the 100 test points; LOO over
``--loo`` training points drawn at random (seeded), Pearson over all (test,
removed) pairs of τ/n against the retrained change of the test loss (95 %
interval by Fisher's z over the pairs, which are not independent: read it as
a lower bound on the spread). Retrainings are done once and reused by every
estimator (and by the peers' scores, with ``--peers``: dattri's and traker's
attributors on the same weights and data, in their own venvs).

TracIn's checkpoints come from an auxiliary full-batch gradient-descent run
(5 checkpoints, η = the step size), since L-BFGS iterates are not SGD steps.
TRAK-5 ensembles 5 models trained the same way on random halves of the data
(the TRAK paper's α = 0.5), drawn apart from the LDS subsets. TRAK's k is 256
on softmax regression (its margin gradients span fewer than 512 directions,
so ΦᵀΦ is singular at k = 512) and 512 on the MLP, for every library.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
N_TRAIN, N_TEST = 1000, 100
SETTINGS = {
    # TRAK's k: below the rank of the softmax's margin gradients (ΦᵀΦ is singular at 512).
    "softmax": {"mu": 1e-2, "hidden": None, "damping": 1e-2, "gd_rate": 0.5, "k": 256},
    "mlp": {"mu": 1e-3, "hidden": 32, "damping": 1e-2, "gd_rate": 0.2, "k": 512},
}


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(X))
    X, y = X[order], y[order]
    mean, std = X[:N_TRAIN].mean(0), X[:N_TRAIN].std(0) + 1e-6
    X = (X - mean) / std
    t = torch.from_numpy
    return (
        t(X[:N_TRAIN]),
        t(y[:N_TRAIN]),
        t(X[N_TRAIN : N_TRAIN + N_TEST]),
        t(y[N_TRAIN : N_TRAIN + N_TEST]),
    )


def network(name: str) -> torch.nn.Module:
    hidden = SETTINGS[name]["hidden"]
    torch.manual_seed(0)
    if hidden is None:
        net = torch.nn.Sequential(torch.nn.Linear(64, 10))
        torch.nn.init.zeros_(net[0].weight)
        torch.nn.init.zeros_(net[0].bias)
    else:
        net = torch.nn.Sequential(
            torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10)
        )
    return net.double()


def objective(net: torch.nn.Module, X, y, mu: float) -> torch.Tensor:
    loss = torch.nn.functional.cross_entropy(net(X), y)
    return loss + 0.5 * mu * sum((p * p).sum() for p in net.parameters())


def lbfgs(net: torch.nn.Module, X, y, mu: float, iterations: int = 1000) -> torch.nn.Module:
    optimizer = torch.optim.LBFGS(
        net.parameters(),
        lr=1.0,
        max_iter=iterations,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        value = objective(net, X, y, mu)
        value.backward()
        return value

    optimizer.step(closure)
    return net


def state(net: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def trained(name: str, X, y, start: dict | None = None) -> dict:
    net = network(name)
    if start is not None:
        net.load_state_dict(start)
    return state(lbfgs(net, X, y, SETTINGS[name]["mu"]))


def gd_checkpoints(name: str, X, y, steps: int = 250, every: int = 50) -> list[dict]:
    net, rate, mu = network(name), SETTINGS[name]["gd_rate"], SETTINGS[name]["mu"]
    out = []
    for step in range(1, steps + 1):
        net.zero_grad()
        objective(net, X, y, mu).backward()
        with torch.no_grad():
            for p in net.parameters():
                p -= rate * p.grad
        if step % every == 0:
            out.append(state(net))
    return out


def calculators(name: str, model, X, y, ensemble: list[dict], checkpoints: list[dict]) -> dict:
    from influence_core import (
        EKFACIHVP,
        KFACIHVP,
        TRAK,
        ArnoldiIHVP,
        ArnoldiInfluenceCalculator,
        ConjugateGradientIHVP,
        ExactIHVP,
        FirstOrderInfluenceCalculator,
        GradientSimilarity,
        LissaIHVP,
        TracIn,
    )

    lam = SETTINGS[name]["damping"]
    k = SETTINGS[name]["k"]
    return {
        "exact IF": lambda: FirstOrderInfluenceCalculator(model, ExactIHVP(damping=lam)),
        "CG IF": lambda: FirstOrderInfluenceCalculator(
            model, ConjugateGradientIHVP(damping=lam, maxiter=100, tol=1e-10)
        ),
        "LiSSA IF": lambda: FirstOrderInfluenceCalculator(
            model, LissaIHVP(damping=lam, scale=50.0, depth=1000, batch_size=100)
        ),
        "Arnoldi IF (rank 20)": lambda: ArnoldiInfluenceCalculator(
            model, ArnoldiIHVP(rank=20, iterations=60, damping=lam)
        ),
        "EK-FAC IF": lambda: FirstOrderInfluenceCalculator(model, EKFACIHVP(damping=lam)),
        "K-FAC IF": lambda: FirstOrderInfluenceCalculator(model, KFACIHVP(damping=lam)),
        f"TRAK-1 (k = {k})": lambda: TRAK(model, projection_dim=k),
        f"TRAK-5 (k = {k})": lambda: TRAK(model, ensemble, projection_dim=k),
        "Grad-Dot": lambda: GradientSimilarity(model, "dot"),
        "Grad-Cos": lambda: GradientSimilarity(model, "cosine"),
        "TracIn (5 checkpoints)": lambda: TracIn(model, checkpoints, SETTINGS[name]["gd_rate"]),
    }


def interval_of_pearson(r: float, n: int) -> float:
    z, se = np.arctanh(r), 1.0 / np.sqrt(n - 3)
    return float((np.tanh(z + 1.96 * se) - np.tanh(z - 1.96 * se)) / 2)


def evaluate(name: str, args: argparse.Namespace) -> list[dict]:
    from influence_core import InfluenceModel, set_progress
    from influence_core.evaluation import linear_datamodeling_score, loo_correlation

    set_progress(False)
    X, y, Xt, yt = digits()
    net = network(name)
    net.load_state_dict(trained(name, X, y))
    model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=250)
    train, test = (X.numpy(), y.numpy()), (Xt.numpy(), yt.numpy())
    rng = np.random.default_rng(7)
    ensemble = [
        trained(name, X[idx], y[idx])
        for idx in (np.sort(rng.permutation(N_TRAIN)[: N_TRAIN // 2]) for _ in range(5))
    ]
    checkpoints = gd_checkpoints(name, X, y)
    full = state(net)

    def retrain(indices: np.ndarray) -> dict:
        return trained(name, X[indices], y[indices])

    def retrain_loo(indices: np.ndarray) -> dict:
        return trained(name, X[indices], y[indices], start=full)

    rows, reference_lds, reference_loo = [], None, None
    removed = np.sort(np.random.default_rng(11).permutation(N_TRAIN)[: args.loo])
    for label, make in calculators(name, model, X, y, ensemble, checkpoints).items():
        began = time.perf_counter()
        try:
            calc = make().fit(train)
            scores = np.asarray(model.to_numpy(calc.influence(test)), np.float64)
        except Exception as error:  # report, do not hide: the row says why
            rows.append({"model": name, "method": label, "error": str(error)[:160]})
            print(f"| {name} | {label} | failed: {str(error)[:100]} |", flush=True)
            continue
        seconds = time.perf_counter() - began
        np.save(HERE / "results" / f"evaluation_{name}_{label.split(' (')[0]}.npy", scores)
        if reference_lds is None:
            t0 = time.perf_counter()
            reference_lds = linear_datamodeling_score(
                calc, retrain, test, subsets=args.subsets, fraction=0.5, seed=0
            )
            reference_loo = loo_correlation(calc, retrain_loo, test, removed)
            print(
                f"(retrained {args.subsets} subsets and {args.loo} LOO sets in "
                f"{time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        lds = linear_datamodeling_score(scores, reference_lds)
        loo = loo_correlation(scores, reference_loo)
        pairs = loo.predicted.size
        row = {
            "model": name,
            "method": label,
            "library": "influence_core",
            "lds": lds.score,
            "lds_interval": lds.interval,
            "loo_pearson": loo.pearson,
            "loo_interval": interval_of_pearson(loo.pearson, pairs),
            "seconds": seconds,
        }
        rows.append(row)
        print(
            f"| {name} | {label} | {lds.score:.3f} ± {lds.interval:.3f} "
            f"| {loo.pearson:.3f} ± {row['loo_interval']:.3f} | {seconds:.2f} |",
            flush=True,
        )
    if args.peers:
        rows += peers(name, net, ensemble, checkpoints, X, y, Xt, yt, reference_lds, reference_loo)
    return rows


def peers(name, net, ensemble, checkpoints, X, y, Xt, yt, reference_lds, reference_loo) -> list:
    """dattri's and traker's attributors on the same weights and data, scored the same way."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        setup = {
            "X": X.numpy(),
            "y": y.numpy(),
            "Xt": Xt.numpy(),
            "yt": yt.numpy(),
            "hidden": np.array(SETTINGS[name]["hidden"] or 0),
            "damping": np.array(SETTINGS[name]["damping"]),
            "gd_rate": np.array(SETTINGS[name]["gd_rate"]),
            "k": np.array(SETTINGS[name]["k"]),
        }
        for prefix, states in (
            ("final", [state(net)]),
            ("ensemble", ensemble),
            ("gd", checkpoints),
        ):
            setup[f"{prefix}_count"] = np.array(len(states))
            for s, sd in enumerate(states):
                for key, value in sd.items():
                    setup[f"{prefix}{s}:{key}"] = value.numpy()
        np.savez(f"{tmp}/setup.npz", **setup)
        for env, script in (
            ("torch-peers", "run_dattri_eval.py"),
            ("traker", "run_traker_eval.py"),
        ):
            python = HERE / ".envs" / env / "bin" / "python"
            if not python.exists():
                print(f"| {name} | {env} | not installed (benchmarks/peers/setup_envs.sh) |")
                continue
            out = f"{tmp}/{env}.npz"
            done = subprocess.run(
                [str(python), str(HERE / "peers" / script), f"{tmp}/setup.npz", out],
                capture_output=True,
                text=True,
                timeout=3600,
            )
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["failed"])[-1][:150]
                print(f"| {name} | {env} | failed: {tail} |", flush=True)
                continue
            results = np.load(out)
            kept = HERE / "results" / f"evaluation_{name}_{env}.npz"
            kept.parent.mkdir(parents=True, exist_ok=True)
            np.savez(kept, **{key: results[key] for key in results.files})
            for key in results.files:
                if not key.startswith("scores:"):
                    continue
                label = key.split(":", 1)[1]
                scores = results[key]
                if label.startswith("dattri TRAK"):
                    # dattri takes TRAK's training features from the loss gradient, which is
                    # −(1 − p) times the margin's: its scores come out with the opposite sign.
                    # Both are reported: as returned, and negated.
                    extra = {f"{label}, negated": -scores}
                else:
                    extra = {}
                rows += [
                    _peer_row(
                        name,
                        f,
                        s,
                        env,
                        float(results[f"seconds:{label}"]),
                        reference_lds,
                        reference_loo,
                    )
                    for f, s in extra.items()
                ]
                seconds = float(results[f"seconds:{label}"])
                rows.append(
                    _peer_row(name, label, scores, env, seconds, reference_lds, reference_loo)
                )
    return rows


def _peer_row(name, label, scores, env, seconds, reference_lds, reference_loo) -> dict:
    from influence_core.evaluation import linear_datamodeling_score, loo_correlation

    lds = linear_datamodeling_score(scores, reference_lds)
    loo = loo_correlation(scores, reference_loo)
    row = {
        "model": name,
        "method": label,
        "library": env,
        "lds": lds.score,
        "lds_interval": lds.interval,
        "loo_pearson": loo.pearson,
        "loo_interval": interval_of_pearson(loo.pearson, loo.predicted.size),
        "seconds": seconds,
    }
    print(
        f"| {name} | {label} | {lds.score:.3f} ± {lds.interval:.3f} "
        f"| {loo.pearson:.3f} ± {row['loo_interval']:.3f} | {seconds:.2f} |",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["softmax", "mlp"])
    parser.add_argument("--subsets", type=int, default=100)
    parser.add_argument("--loo", type=int, default=40)
    parser.add_argument("--peers", action="store_true")
    parser.add_argument("--out", default=str(HERE / "results" / "evaluation_digits.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(
        f"digits, n_train = {N_TRAIN}, n_test = {N_TEST}, {args.subsets} half subsets, "
        f"{args.loo} LOO points, torch float64 (2026-12-01)\n"
    )
    print("| model | method | LDS ± 95 % | LOO Pearson ± 95 % | fit + scores (s) |")
    print("|---|---|---|---|---:|")
    rows = []
    for name in args.models:
        rows += evaluate(name, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"\nrows written to {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
