"""The panel the solvers' defaults are chosen on: LDS over a damping grid, per model, one run.

    .venv/bin/python benchmarks/defaults_panel.py [--models softmax mlp conv mlp01m transformer]
        [--subsets 50] [--seed 0] [--out benchmarks/results/defaults_panel.json]

Panel (torch float64, all parameters; every model is trained deterministically
from one seeded initialisation, so a retraining differs only by its data):

* **softmax**, **mlp**: digits softmax regression (d = 650, convex) and the
  64-32-10 tanh MLP (d = 2410) of ``evaluation_digits.py`` (L-BFGS).
* **conv**: digits as 1 × 8 × 8 images, conv 3 × 3 (8 channels) + tanh +
  dense (d = 2970), μ = 1e-3, L-BFGS (500 iterations).
* **mlp01m**: the 784-128-10 tanh MLP of ``lds_mlp.py`` (d = 101,770),
  300 full-batch Adam steps, n_train = 2000, 50 test points.
* **transformer**: the benchmarks' transformer (``transformer_model.py``:
  token and positional tables, a pre-norm block of attention with q, k, v, o
  as ``nn.Linear`` and a GELU MLP, LayerNorms, a head on the mean position)
  at a size that retrains in a second: vocabulary 40, width 16, 8 tokens,
  one block of 2 heads, 3 classes (d = 4,131). Every parameter. Synthetic
  sequences whose class is the most frequent token group (token mod 3),
  10 % of labels flipped; n_train = 500, 50 test; 300 full-batch Adam steps
  (lr 1e-2) on the mean cross-entropy + (μ/2)‖θ‖², μ = 1e-3. The 5.2M model
  itself is not: 50 retrainings of it are not a 2-core job.

Every configuration of one model is scored by :func:`influence_core.evaluation.select`
on the same ``--subsets`` retrainings on random halves (LDS: mean Spearman over
test points, 95 % interval). The grid:

* EK-FAC and K-FAC, the damping as a fraction c of the mean eigenvalue of
  each layer's curvature (``damping=None``, ``relative_damping=c``; the
  default before this panel was c = 0.1) and as a fixed λ (now 1e-3);
* CG and Arnoldi at their defaults (λ = 1e-2 now, 1e-3 before), on the
  Gauss–Newton matrix (their default curvature since the transformer joined
  the panel) and on the Hessian (before), and CG over a damping grid;
* LiSSA at its default (λ = 3e-3 since stop 34, the scale chosen from the
  mini-batches' largest eigenvalue) and at its former dampings (1e-2, 1e-3),
  on both curvatures.

A configuration that refuses (not positive definite, diverged) is a row
saying so. The table printed is the one in ``docs/choosing.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import evaluation_digits as digits_bench  # noqa: E402
import lds_mlp  # noqa: E402

from influence_core import (  # noqa: E402
    EKFACIHVP,
    KFACIHVP,
    ArnoldiIHVP,
    ArnoldiInfluenceCalculator,
    ConjugateGradientIHVP,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
    LissaIHVP,
    set_progress,
)
from influence_core.evaluation import select  # noqa: E402


def conv_network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 8, 8)),
        torch.nn.Conv2d(1, 8, 3),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 6 * 6, 10),
    ).double()


def lbfgs_trained(make, mu: float, iterations: int):
    def trained(X, y) -> dict:  # evaluation_digits' L-BFGS, from a fresh make()
        return digits_bench.state(digits_bench.lbfgs(make(), X, y, mu, iterations))

    return trained


SMALL_TRANSFORMER = {"vocab": 40, "width": 16, "length": 8, "blocks": 1, "heads": 2, "classes": 3}


def small_transformer() -> torch.nn.Module:
    from transformer_model import Transformer

    torch.manual_seed(0)
    return Transformer(**SMALL_TRANSFORMER).double().eval()


def sequences(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token sequences labelled by their most frequent group (token mod 3), 10 % flipped."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, SMALL_TRANSFORMER["vocab"], (n, SMALL_TRANSFORMER["length"]))
    counts = np.stack([(ids % 3 == c).sum(axis=1) for c in range(3)], axis=1)
    y = np.argmax(counts + 0.1 * rng.random(counts.shape), axis=1)
    flipped = rng.random(n) < 0.1
    y[flipped] = rng.integers(0, 3, int(flipped.sum()))
    return torch.from_numpy(ids), torch.from_numpy(y)


def adam_trained(X: torch.Tensor, y: torch.Tensor, steps: int = 300, mu: float = 1e-3) -> dict:
    net = small_transformer()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        penalty = sum((p * p).sum() for p in net.parameters())
        loss = torch.nn.functional.cross_entropy(net(X), y) + 0.5 * mu * penalty
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def panel_model(name: str):
    """(network with trained weights, retrain(indices) -> weights, train, test)."""
    if name == "transformer":
        ids, labels = sequences(550)
        X, y, Xt, yt = ids[:500], labels[:500], ids[500:], labels[500:]
        net = small_transformer()
        net.load_state_dict(adam_trained(X, y))
        train, test = (X.numpy(), y.numpy()), (Xt.numpy(), yt.numpy())
        return net, lambda indices: adam_trained(X[indices], y[indices]), train, test
    if name in ("softmax", "mlp", "conv"):
        X, y, Xt, yt = digits_bench.digits()
        if name == "conv":
            make, train_fn = conv_network, lbfgs_trained(conv_network, 1e-3, 500)
        else:
            make = lambda: digits_bench.network(name)  # noqa: E731
            train_fn = lambda X, y: digits_bench.trained(name, X, y)  # noqa: E731
        train, test = (X.numpy(), y.numpy()), (Xt.numpy(), yt.numpy())
    else:
        X, y = lds_mlp.dataset()
        n = lds_mlp.N
        make = lds_mlp.network

        def train_fn(X, y):
            net, _ = lds_mlp.train(X, y)
            return {k: v.detach().clone() for k, v in net.state_dict().items()}

        X, y, Xt, yt = X[:n], y[:n], X[n:], y[n:]
        train, test = (X.numpy(), y.numpy()), (Xt.numpy(), yt.numpy())
    net = make()
    net.load_state_dict(train_fn(X, y))

    def retrain(indices: np.ndarray) -> dict:
        return train_fn(X[indices], y[indices])

    return net, retrain, train, test


def grid(name: str, model: InfluenceModel) -> dict:
    first_order = lambda solver: FirstOrderInfluenceCalculator(model, solver)  # noqa: E731
    rows = {}
    for label, solver in (("EK-FAC", EKFACIHVP), ("K-FAC", KFACIHVP)):
        rows[f"{label}, default"] = first_order(solver())
        for c in (1e-1, 1e-2, 1e-3, 1e-4):  # c = 0.1 was the default before this panel
            rows[f"{label}, c = {c:g}"] = first_order(solver(damping=None, relative_damping=c))
        for d in (1e-1, 1e-2, 1e-3, 1e-4):
            rows[f"{label}, λ = {d:g}"] = first_order(solver(damping=d))
    big = name == "mlp01m"
    iterations = {"maxiter": 30, "tol": 1e-6} if big else {}
    for curvature in ("hessian", "ggn"):
        rows[f"CG, default, {curvature}"] = first_order(
            ConjugateGradientIHVP(curvature=curvature, **iterations)
        )
        rows[f"LiSSA, default, {curvature}"] = first_order(LissaIHVP(curvature=curvature))
        rows[f"Arnoldi, default, {curvature}"] = ArnoldiInfluenceCalculator(
            model, ArnoldiIHVP(curvature=curvature)
        )
        for d in (1e-3,) if big else (1e-1, 1e-2, 1e-3, 1e-4):  # 1e-3 was the default
            rows[f"CG, λ = {d:g}, {curvature}"] = first_order(
                ConjugateGradientIHVP(curvature=curvature, damping=d, **iterations)
            )
        for d in (1e-2, 1e-3):  # LiSSA's former defaults (1e-2 until stop 34, 1e-3 before)
            rows[f"LiSSA, λ = {d:g}, {curvature}"] = first_order(
                LissaIHVP(curvature=curvature, damping=d)
            )
    return rows


#: Each solver's row names: the family a best is taken over, its default now, its former one.
FAMILIES = {
    "EK-FAC": ("EK-FAC, ", "EK-FAC, default", "EK-FAC, c = 0.1"),
    "K-FAC": ("K-FAC, ", "K-FAC, default", "K-FAC, c = 0.1"),
    "CG": ("CG, ", "CG, default, ggn", "CG, λ = 0.001, hessian"),
    "LiSSA": ("LiSSA, ", "LiSSA, default, ggn", "LiSSA, λ = 0.01, hessian"),
    "Arnoldi": ("Arnoldi, ", "Arnoldi, default, ggn", "Arnoldi, default, hessian"),
}


def summary(rows: list[dict]) -> str:
    """Per model and solver: its best configuration, its default now and before, and whether
    the default is within the best's 95 % interval (the panel's criterion)."""
    lines = [
        "| model | solver | best configuration | default now | within? | former default |",
        "|---|---|---|---|---|---|",
    ]

    def cell(row: dict | None) -> str:
        if row is None:
            return "not run"
        if row["refused"]:
            return "refused"
        return f"{row['lds']:.3f} ± {row['interval']:.3f}"

    for model in dict.fromkeys(r["model"] for r in rows):
        of_model = {r["configuration"]: r for r in rows if r["model"] == model}
        for solver, (prefix, now, before) in FAMILIES.items():
            family = [r for name, r in of_model.items() if name.startswith(prefix)]
            scored = [r for r in family if not r["refused"]]
            if not scored:
                continue
            best = max(scored, key=lambda r: r["lds"])
            default = of_model.get(now)
            within = (
                default is not None
                and not default["refused"]
                and default["lds"] >= best["lds"] - best["interval"]
            )
            lines.append(
                f"| {model} | {solver} | {best['configuration']}: {cell(best)} | {cell(default)} "
                f"| {'yes' if within else '**no**'} | {cell(of_model.get(before))} |"
            )
    return "\n".join(lines)


def figure(rows: list[dict], path: Path, model: str = "mlp") -> None:
    """The digits MLP's EK-FAC and CG damping grids with the defaults: docs/images/selection.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from influence_core.evaluation import Candidate, plot_candidates

    def shown(name: str) -> bool:  # the 4-point grids (a default is one of their points)
        return name.startswith(("EK-FAC, λ", "CG, λ")) and "ggn" not in name

    kept = [r for r in rows if r["model"] == model and shown(r["configuration"])]
    candidates = [
        Candidate(
            r["configuration"].replace(", hessian", "").replace(", λ = ", " λ="),
            r["lds"] if not r["refused"] else float("nan"),
            r["interval"] if not r["refused"] else float("nan"),
            r["fit_seconds"],
            r["scoring_seconds"],
            None,
            r["refused"],
        )
        for r in kept
    ]
    scored = [c for c in candidates if not c.refused]
    best = max(scored, key=lambda c: c.score).name
    _, axis = plt.subplots(figsize=(7.5, 5.5))
    plot_candidates(
        candidates,
        best,
        axis,
        title="select: EK-FAC and CG dampings on the digits MLP (d = 2410)",
    )
    axis.figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    axis.figure.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models", nargs="+", default=["softmax", "mlp", "conv", "mlp01m", "transformer"]
    )
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="keep the configurations whose name has this")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "defaults_panel.json")
    parser.add_argument("--summarize", type=Path, help="print the summary of an earlier run")
    parser.add_argument("--figure", type=Path, help="with --summarize: draw the digits MLP's grid")
    args = parser.parse_args()
    if args.summarize:
        rows = json.loads(args.summarize.read_text())
        print(summary(rows))
        if args.figure:
            figure(rows, args.figure)
        return
    set_progress(False)
    torch.set_num_threads(2)
    rows = []
    for name in args.models:
        began = time.perf_counter()
        net, retrain, train, test = panel_model(name)
        model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=500)
        candidates = {k: v for k, v in grid(name, model).items() if args.only in k}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CG's residual warnings: the LDS is the judge here
            chosen = select(candidates, retrain, train, test, subsets=args.subsets, seed=args.seed)
        print(
            f"\n{name} (d = {model.num_parameters}), {args.subsets} subsets, seed {args.seed}, "
            f"{time.perf_counter() - began:.0f} s"
        )
        print(chosen, flush=True)
        for c in chosen.candidates:
            rows.append(
                {
                    "model": name,
                    "configuration": c.name,
                    "lds": c.score,
                    "interval": c.interval,
                    "fit_seconds": c.fit_seconds,
                    "scoring_seconds": c.scoring_seconds,
                    "refused": c.refused,
                    "retraining_seconds": chosen.retraining_seconds,
                }
            )
        args.out.parent.mkdir(exist_ok=True)  # after every model: a long run keeps what it did
        args.out.write_text(json.dumps(rows, indent=1))
    print()
    print(summary(rows))


if __name__ == "__main__":
    main()
