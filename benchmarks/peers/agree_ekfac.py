"""EK-FAC and K-FAC against kronfluence: the same torch MLP, data, damping and Fisher.

    .venv/bin/python benchmarks/peers/agree_ekfac.py [--n-train N] [--hidden H]

An MLP 64-H-10 (tanh) on digits, trained by a few hundred full-batch L-BFGS
steps, all parameters; the empirical Fisher (training labels, so both sides
are deterministic); damping 1e-3 on both. kronfluence runs in its own venv
(``setup_envs.sh``); ours on torch, TensorFlow and JAX from the project's
``.venv``, the same weights loaded through the canonical layout. Prints one
Markdown table: Pearson and the largest relative difference of pairwise scores
and self-influence against kronfluence, and the seconds of fit + pairwise +
self (single-threaded on both sides).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

HERE = Path(__file__).resolve().parent
KRONFLUENCE = HERE.parents[1] / "benchmarks" / ".envs" / "kronfluence" / "bin" / "python"
DAMPING = 1e-3


def trained_weights(
    X: np.ndarray, y: np.ndarray, hidden: int, inputs: int
) -> dict[str, np.ndarray]:
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(inputs, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10)
    ).double()
    optimizer = torch.optim.LBFGS(net.parameters(), max_iter=300, line_search_fn="strong_wolfe")
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(Xt), yt)
        loss = loss + 0.5e-3 * sum((p**2).sum() for p in net.parameters())
        loss.backward()
        return loss

    optimizer.step(closure)
    return {
        "W0": net[0].weight.detach().numpy(),
        "b0": net[0].bias.detach().numpy(),
        "W1": net[2].weight.detach().numpy(),
        "b1": net[2].bias.detach().numpy(),
    }


def ours(backend: str, setup: dict[str, np.ndarray], solver_cls: type) -> tuple[np.ndarray, ...]:
    from influence_conformance.specs import Dense, ModelSpec
    from influence_core import FirstOrderInfluenceCalculator, InfluenceModel, get_registry

    hidden = int(setup["hidden"])
    inputs = int(setup["X_train"].shape[1])
    spec = ModelSpec("agree", (inputs,), (Dense(hidden, "tanh"), Dense(10)), "cross_entropy", "-")
    canonical = [setup["W0"].T, setup["b0"], setup["W1"].T, setup["b1"]]
    reference = get_registry().by_name(backend).load_reference_models()(spec, canonical, "float64")
    model = InfluenceModel(reference.model, reference.loss_fn, batch_size=len(setup["y_train"]))
    train = (setup["X_train"], setup["y_train"])
    test = (setup["X_test"], setup["y_test"])
    start = time.perf_counter()
    calc = FirstOrderInfluenceCalculator(model, solver_cls(damping=DAMPING, fisher="empirical"))
    calc.fit(train)
    pairwise = model.to_numpy(calc.influence(test))
    own = model.to_numpy(calc.self_influence())
    return pairwise, own, time.perf_counter() - start


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    pearson = float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    return pearson, float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument(
        "--inputs",
        type=int,
        default=64,
        help="input width; above 64, synthetic Gaussian inputs labelled by a random linear map",
    )
    parser.add_argument("--backends", nargs="+", default=["torch", "tensorflow", "jax"])
    args = parser.parse_args()
    import os

    os.environ.setdefault("JAX_ENABLE_X64", "1")
    n, m = args.n_train, args.n_test
    if args.inputs == 64:
        X, y = load_digits(return_X_y=True)
        X = X / 16.0
    else:
        rng = np.random.default_rng(0)
        X = rng.normal(size=(n + m, args.inputs))
        y = np.argmax(X @ rng.normal(size=(args.inputs, 10)) + rng.normal(size=(n + m, 10)), 1)
    setup = {
        "X_train": X[:n],
        "y_train": y[:n].astype(np.int64),
        "X_test": X[n : n + m],
        "y_test": y[n : n + m].astype(np.int64),
        "hidden": np.array(args.hidden),
        "damping": np.array(DAMPING),
    }
    setup.update(trained_weights(setup["X_train"], setup["y_train"], args.hidden, args.inputs))
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(f"{tmp}/setup.npz", **setup)
        subprocess.run(
            [
                str(KRONFLUENCE),
                str(HERE / "run_kronfluence.py"),
                f"{tmp}/setup.npz",
                f"{tmp}/k.npz",
            ],
            check=True,
        )
        theirs = dict(np.load(f"{tmp}/k.npz"))
    import torch

    torch.set_num_threads(1)
    from influence_core import EKFACIHVP, KFACIHVP, set_progress

    set_progress(False)
    d = args.inputs * args.hidden + args.hidden + args.hidden * 10 + 10
    data = "digits" if args.inputs == 64 else "synthetic"
    print(
        f"MLP {args.inputs}-{args.hidden}-10 (d = {d}), {data}, n_train = {n}, n_test = {m}, all "
        f"parameters, empirical Fisher, damping {DAMPING:g}, float64, one thread each"
    )
    print()
    print(
        "| method | backend | pairwise Pearson | pairwise max rel. diff | self Pearson "
        "| self max rel. diff | seconds (ours) | seconds (kronfluence) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for strategy, solver in (("ekfac", EKFACIHVP), ("kfac", KFACIHVP)):
        for backend in args.backends:
            try:
                pairwise, own, seconds = ours(backend, setup, solver)
            except Exception as error:  # a backend not installed
                print(f"| {strategy} | {backend} | skipped: {type(error).__name__} | | | | | |")
                continue
            rp, dp = compare(pairwise, theirs[f"{strategy}_pairwise"])
            rs, ds = compare(own, theirs[f"{strategy}_self"])
            print(
                f"| {solver.__name__} | {backend} | {rp:.6f} | {dp:.1e} | {rs:.6f} | {ds:.1e} "
                f"| {seconds:.2f} | {float(theirs[f'{strategy}_seconds']):.2f} |"
            )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
