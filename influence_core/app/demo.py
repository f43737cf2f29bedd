"""The main job: find flipped labels in digits with every estimator (``influence-core demo``).

On scikit-learn's bundled digits (no download), with 10 % of the training
labels flipped (seeded):

1. builds an MLP (64-32-10, tanh) from a framework-neutral spec in the chosen
   backend and trains it with L-BFGS driven only by the protocol's loss and
   gradient (L2 penalty 1e-3), saving 5 checkpoints along the way;
2. scores every training point by self-influence with exact and CG influence
   on the last layer, TracIn over the saved checkpoints, and representer
   points (L2 and LJE), plus the training-loss and random baselines;
3. prints the fraction of flipped labels found when checking 5 %, 10 % and
   20 % of the data (highest score first) and the AUC, per method;
4. draws the detection curves, and for a misclassified test digit its top
   proponents and opponents (PNG);
5. saves every result (``.npz`` + JSON with fingerprints) and says where.

Framework-free: the model comes from the backend's ``reference_models`` hook.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from influence_conformance.specs import Dense, ModelSpec, ReferenceModel, make_weights

from .. import (
    ConjugateGradientIHVP,
    ExactIHVP,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
    RepresenterPointL2,
    RepresenterPointLJE,
    TracIn,
    save_result,
    set_progress,
)
from ..plugin import get_registry
from ..progress import progress_counter

SPEC = ModelSpec(
    "digits_mlp", (64,), (Dense(32, "tanh"), Dense(10)), "cross_entropy", "finite_differences"
)
L2 = 1e-3
FLIP_FRACTION = 0.10
SEED = 0
CHECKPOINT_FRACTIONS = (0.05, 0.15, 0.3, 0.6)  # of --max-iter, plus the final iterate
FRACTIONS = (0.05, 0.10, 0.20)


def load_digits_with_flips(seed: int = SEED) -> dict[str, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover
        sys.exit("the demo needs scikit-learn: pip install 'influence-core[demo]'")
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(X))
    train, test = order[:1200], order[1200:]
    y_train = y[train].copy()
    flipped = rng.choice(len(train), int(FLIP_FRACTION * len(train)), replace=False)
    y_train[flipped] = (y_train[flipped] + rng.integers(1, 10, len(flipped))) % 10
    is_flipped = np.zeros(len(train), dtype=bool)
    is_flipped[flipped] = True
    return {
        "X_train": X[train],
        "y_train": y_train,
        "y_train_clean": y[train],
        "X_test": X[test],
        "y_test": y[test],
        "flipped": is_flipped,
    }


def build(backend: str, weights: list[np.ndarray]) -> tuple[ReferenceModel, InfluenceModel]:
    builder = get_registry().by_name(backend).load_reference_models()
    reference = builder(SPEC, weights, "float64")
    return reference, InfluenceModel(
        reference.model, reference.loss_fn, backend=backend, batch_size=400
    )


def fit(
    model: InfluenceModel,
    data: tuple[np.ndarray, np.ndarray],
    max_iter: int,
    on_iterate: Callable[[int, np.ndarray], None] | None = None,
) -> tuple[np.ndarray, Any]:
    """Minimise L(θ) + (λ/2)‖θ‖² with L-BFGS; every value and gradient comes from the protocol."""
    from scipy.optimize import minimize

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        with model.parameters_set_to(theta):
            loss = float(np.mean(model.to_numpy(model.per_sample_loss(data))))
            grad = model.to_numpy(model.loss_grad(data))
        return loss + 0.5 * L2 * theta @ theta, grad + L2 * theta

    iteration = [0]
    with progress_counter(desc="training (L-BFGS)", total=max_iter) as bar:

        def callback(theta: np.ndarray) -> None:
            iteration[0] += 1
            bar.update(1)
            if on_iterate is not None:
                on_iterate(iteration[0], theta)

        theta0 = model.to_numpy(model.get_parameters())
        result = minimize(
            objective,
            theta0,
            jac=True,
            method="L-BFGS-B",
            callback=callback,
            options={"maxiter": max_iter},
        )
    return result.x, result


def auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum formula (ties averaged)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    n_pos, n_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def found_when_checking(scores: np.ndarray, positives: np.ndarray, fraction: float) -> float:
    """Fraction of the positives among the ``fraction`` highest scores (ties: lower index first)."""
    order = np.argsort(-scores, kind="stable")
    return float(positives[order[: round(fraction * len(order))]].sum() / positives.sum())


def detection_methods(
    model: InfluenceModel,
    train: tuple[np.ndarray, np.ndarray],
    checkpoints: list[str],
) -> dict[str, Callable[[], Any]]:
    """Self-influence of every training point, per method (native arrays)."""
    last = model.with_parameters(model.last_layer().name)

    def exact() -> Any:
        ihvp = ExactIHVP(damping=L2)
        return FirstOrderInfluenceCalculator(last, ihvp).fit(train).self_influence()

    def cg() -> Any:
        ihvp = ConjugateGradientIHVP(damping=L2, tol=1e-5, maxiter=60)
        return FirstOrderInfluenceCalculator(last, ihvp).fit(train).self_influence()

    return {
        "influence, exact (last layer)": exact,
        "influence, CG (last layer)": cg,
        f"TracIn ({len(checkpoints)} checkpoints)": lambda: (
            TracIn(model, checkpoints, 1.0).fit(train).self_influence()
        ),
        "representer points, L2": lambda: (
            RepresenterPointL2(model, l2=1e-2).fit(train).self_influence()
        ),
        "representer points, LJE": lambda: (
            RepresenterPointLJE(model, ExactIHVP(damping=L2)).fit(train).self_influence()
        ),
        "training loss (baseline)": lambda: model.per_sample_loss(train),
    }


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_").replace("__", "_")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="influence-core demo", description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="torch", help="torch (default) or tensorflow")
    parser.add_argument("--max-iter", type=int, default=300, help="L-BFGS iterations")
    parser.add_argument("--out", default="demo_output", help="where results and figures go")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, results only")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    args = parser.parse_args(argv)
    set_progress(False if args.quiet else None)
    say = (lambda *a: None) if args.quiet else print
    start = time.perf_counter()
    out = Path(args.out) / args.backend
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)

    data = load_digits_with_flips()
    train = (data["X_train"], data["y_train"])
    test = (data["X_test"], data["y_test"])
    _, model = build(args.backend, make_weights(SPEC, seed=SEED))
    print(
        f"digits: {len(train[1])} training samples, {data['flipped'].sum()} labels flipped "
        f"(seed {SEED}); {len(test[1])} test samples; backend {args.backend}, "
        f"MLP 64-32-10 (d = {model.num_parameters})"
    )

    # -- train, saving checkpoints -----------------------------------------------------
    checkpoints: list[str] = []
    suffix = model.kernels.checkpoint_suffix

    at = {max(1, round(f * args.max_iter)) for f in CHECKPOINT_FRACTIONS}

    def save_checkpoint(iteration: int, theta: np.ndarray) -> None:
        if iteration in at:
            path = out / "checkpoints" / f"iteration_{iteration:04d}{suffix}"
            with model.parameters_set_to(theta):
                model.kernels.save_checkpoint(str(path))
            checkpoints.append(str(path))

    t = time.perf_counter()
    theta, result = fit(model, train, args.max_iter, save_checkpoint)
    final = out / "checkpoints" / f"final{suffix}"
    with model.parameters_set_to(theta):
        model.kernels.save_checkpoint(str(final))
    checkpoints.append(str(final))
    model.kernels.load_checkpoint(str(final))  # the model now holds the trained weights
    predictions = np.argmax(
        model.to_numpy(model.kernels.outputs(model.kernels.as_native(test[0]))), axis=1
    )
    print(
        f"trained: L-BFGS {result.nit} iterations, objective {result.fun:.4f}, test accuracy "
        f"{np.mean(predictions == test[1]):.1%} ({time.perf_counter() - t:.1f} s); "
        f"{len(checkpoints)} checkpoints saved"
    )

    # -- self-influence per method ---------------------------------------------------------
    flipped = data["flipped"]
    rows, scores = [], {}
    for name, compute in detection_methods(model, train, checkpoints).items():
        t = time.perf_counter()
        values = compute()
        seconds = time.perf_counter() - t
        scores[name] = model.to_numpy(values)
        save_result(
            out / "results" / slug(name),
            {"self_influence": values},
            method=name,
            model=model,
            parameters={"l2": L2, "seed": SEED},
            data={"train": train},
        )
        rows.append((name, scores[name], seconds))
    scores["random (baseline)"] = (
        np.random.default_rng(SEED).permutation(len(flipped)).astype(float)
    )
    rows.append(("random (baseline)", scores["random (baseline)"], 0.0))

    print()
    header = "| method | " + " | ".join(f"found @ {int(f * 100)} %" for f in FRACTIONS)
    print(header + " | AUC | time (s) |")
    print("|---|" + "---:|" * (len(FRACTIONS) + 2))
    for name, values, seconds in rows:
        found = " | ".join(f"{found_when_checking(values, flipped, f):.0%}" for f in FRACTIONS)
        print(f"| {name} | {found} | {auc(values, flipped):.3f} | {seconds:.2f} |")
    print()

    # -- one misclassified test digit: its proponents and opponents -----------------------
    wrong = np.flatnonzero(predictions != test[1])
    index = int(wrong[0]) if len(wrong) else 0
    last = model.with_parameters(model.last_layer().name)
    calculator = FirstOrderInfluenceCalculator(last, ExactIHVP(damping=L2)).fit(train)
    top = calculator.top_k((test[0][index : index + 1], test[1][index : index + 1]), k=6)
    top_host = {name: model.to_numpy(value) for name, value in top._asdict().items()}
    save_result(
        out / "results" / "test_digit_top_k",
        top_host,
        method="influence, exact (last layer): top-k",
        model=last,
        parameters={"test_index": index, "k": 6, "damping": L2},
        data={"train": train},
    )
    print(
        f"test digit #{index}: label {test[1][index]}, predicted {predictions[index]}; strongest "
        f"proponents {top_host['proponents'][0].tolist()}, opponents {top_host['opponents'][0].tolist()}"
    )

    if not args.no_figures:
        from .figures import detection_curves, proponents_grid

        curves = detection_curves(
            {name: values for name, values, _ in rows}, flipped, out / "detection_curves.png"
        )
        grid = proponents_grid(
            data, index, predictions[index], top_host, out / "test_digit_influence.png"
        )
        print(f"figures: {curves}, {grid}")
    print(
        f"results: {out / 'results'} (arrays.npz + metadata.json per method); checkpoints: {out / 'checkpoints'}"
    )
    print(f"done in {time.perf_counter() - start:.1f} s")
    say("(load a result with influence_core.load_result(path, model=..., data={'train': ...}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
