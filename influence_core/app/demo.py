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
5. checks a claim only influence makes, by retraining: removing the test
   digit's 20 strongest opponents should lower its loss (and may fix its
   prediction), where removing the 20 highest-loss or 20 random training
   points should not; a table shows the retrained loss and prediction next to
   a control retrained without removal;
6. saves every result (``.npz`` + JSON with fingerprints) and says where.

``--hard`` runs the setting where ranking by the training loss is known to
degrade instead: flips to a *similar* class (1 → 7, 3 → 8, 4 → 9 …) and a
model trained to near-zero loss (L2 1e-5, 1500 iterations). There influence
does not beat the loss; the table says so.

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
    EKFACIHVP,
    ConjugateGradientIHVP,
    ExactIHVP,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
    RepresenterPointL2,
    RepresenterPointLJE,
    TracIn,
    UnsupportedByBackendError,
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
#: Removed training points in the counterfactual check.
REMOVED = 20
#: A visually similar class for each digit (``--hard``: flips the loss finds harder).
SIMILAR = {0: 6, 1: 7, 2: 3, 3: 8, 4: 9, 5: 9, 6: 0, 7: 1, 8: 3, 9: 4}
HARD_L2, HARD_MAX_ITER = 1e-5, 1500


def load_digits_with_flips(seed: int = SEED, similar: bool = False) -> dict[str, np.ndarray]:
    """Digits, 1200 train / 597 test, 10 % of the training labels flipped (to a similar class)."""
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
    if similar:
        y_train[flipped] = [SIMILAR[int(label)] for label in y[train][flipped]]
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


def trained_weights(reference: ReferenceModel, theta: np.ndarray) -> list[np.ndarray]:
    """θ (the backend's flat order) as the spec's canonical weight list, to build the trained model."""
    from influence_conformance.numpy_reference import unflatten_weights

    return unflatten_weights(SPEC, reference.to_canonical(theta))


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
    l2: float = L2,
) -> tuple[np.ndarray, Any]:
    """Minimise L(θ) + (λ/2)‖θ‖² with L-BFGS; every value and gradient comes from the protocol."""
    from scipy.optimize import minimize

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        with model.parameters_set_to(theta):
            loss = float(np.mean(model.to_numpy(model.per_sample_loss(data))))
            grad = model.to_numpy(model.loss_grad(data))
        return loss + 0.5 * l2 * theta @ theta, grad + l2 * theta

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
    head_name: str,
) -> dict[str, Callable[[], Any]]:
    """Self-influence of every training point, per method (native arrays)."""
    last = model.with_parameters(head_name)

    def exact() -> Any:
        ihvp = ExactIHVP(damping=L2)
        return FirstOrderInfluenceCalculator(last, ihvp).fit(train).self_influence()

    def cg() -> Any:
        ihvp = ConjugateGradientIHVP(damping=L2, tol=1e-5, maxiter=60)
        return FirstOrderInfluenceCalculator(last, ihvp).fit(train).self_influence()

    def ekfac() -> Any:
        ihvp = EKFACIHVP(damping=L2)
        return FirstOrderInfluenceCalculator(model, ihvp).fit(train).self_influence()

    return {
        "influence, exact (last layer)": exact,
        "influence, CG (last layer)": cg,
        "influence, EK-FAC (all parameters)": ekfac,
        f"TracIn ({len(checkpoints)} checkpoints)": lambda: (
            TracIn(model, checkpoints, 1.0).fit(train).self_influence()
        ),
        "representer points, L2": lambda: (
            RepresenterPointL2(model, l2=1e-2, last_layer=head_name).fit(train).self_influence()
        ),
        "representer points, LJE": lambda: (
            RepresenterPointLJE(model, ExactIHVP(damping=L2), last_layer=head_name)
            .fit(train)
            .self_influence()
        ),
        "training loss (baseline)": lambda: model.per_sample_loss(train),
    }


def counterfactual(
    model: InfluenceModel,
    theta: np.ndarray,
    train: tuple[np.ndarray, np.ndarray],
    point: tuple[np.ndarray, np.ndarray],
    scores: np.ndarray,
    max_iter: int,
    removed: int = REMOVED,
) -> list[tuple[str, np.ndarray, float, int, float]]:
    """Retrain without ``removed`` training points chosen three ways, and a control without removal.

    Rows: (how they were chosen, their indices, the test point's loss after
    retraining, its predicted class, its probability of the true class).
    Every retraining starts from the trained θ and runs ``max_iter`` L-BFGS
    iterations, so the control row shows what retraining alone changes.
    """
    n = len(train[1])
    losses = model.to_numpy(model.per_sample_loss(train))
    choices = {
        "none (control: retrained the same way)": np.array([], dtype=int),
        f"its {removed} strongest opponents (influence)": np.argsort(scores, kind="stable")[
            :removed
        ],
        f"the {removed} highest training losses": np.argsort(-losses, kind="stable")[:removed],
        f"{removed} random points (seed {SEED})": np.random.default_rng(SEED).choice(
            n, removed, replace=False
        ),
    }
    rows = []
    for name, indices in choices.items():
        keep = np.setdiff1d(np.arange(n), indices)
        with model.parameters_set_to(theta):
            retrained, _ = fit(model, (train[0][keep], train[1][keep]), max_iter)
        with model.parameters_set_to(retrained):
            outputs = model.to_numpy(model.kernels.outputs(model.kernels.as_native(point[0])))[0]
            loss = float(model.to_numpy(model.per_sample_loss(point))[0])
        probabilities = np.exp(outputs - outputs.max())
        probabilities /= probabilities.sum()
        label = int(point[1][0])
        rows.append((name, indices, loss, int(outputs.argmax()), float(probabilities[label])))
    return rows


def print_detection_table(rows: list[tuple[str, np.ndarray, float]], flipped: np.ndarray) -> None:
    header = "| method | " + " | ".join(f"found @ {int(f * 100)} %" for f in FRACTIONS)
    print(header + " | AUC | time (s) |")
    print("|---|" + "---:|" * (len(FRACTIONS) + 2))
    for name, values, seconds in rows:
        found = " | ".join(f"{found_when_checking(values, flipped, f):.0%}" for f in FRACTIONS)
        print(f"| {name} | {found} | {auc(values, flipped):.3f} | {seconds:.2f} |")
    print()


def run_hard(args: argparse.Namespace) -> int:
    """``--hard``: similar-class flips on a model trained to near-zero loss; influence vs the loss."""
    start = time.perf_counter()
    data = load_digits_with_flips(similar=True)
    train = (data["X_train"], data["y_train"])
    reference, model = build(args.backend, make_weights(SPEC, seed=SEED))
    print(
        f"digits, the hard setting: {data['flipped'].sum()} of {len(train[1])} training labels "
        f"flipped to a similar class (seed {SEED}); MLP 64-32-10, L2 {HARD_L2:g}, "
        f"{HARD_MAX_ITER} L-BFGS iterations (near-zero training loss)"
    )
    theta, result = fit(model, train, HARD_MAX_ITER, l2=HARD_L2)
    reference, model = build(args.backend, trained_weights(reference, theta))
    losses = model.to_numpy(model.per_sample_loss(train))
    print(f"trained: objective {result.fun:.4f}, mean training loss {losses.mean():.4f}")
    last = model.with_parameters(reference.layer_names[-1])
    rows = []
    for name, normalize in (
        ("influence, exact (last layer)", False),
        ("RelatIF (last layer)", True),
    ):
        t = time.perf_counter()
        calc = FirstOrderInfluenceCalculator(last, ExactIHVP(damping=HARD_L2), normalize=normalize)
        values = model.to_numpy(calc.fit(train).self_influence())
        rows.append((name, values, time.perf_counter() - t))
    rows.append(("training loss (baseline)", losses, 0.0))
    rows.append(
        (
            "random (baseline)",
            np.random.default_rng(SEED).permutation(len(losses)).astype(float),
            0.0,
        )
    )
    print()
    print_detection_table(rows, data["flipped"])
    influence, loss = auc(rows[0][1], data["flipped"]), auc(losses, data["flipped"])
    verdict = "beats" if influence > loss else "does not beat"
    print(
        f"here self-influence {verdict} the training loss (AUC {influence:.3f} against "
        f"{loss:.3f}): a model that fits the flips leaves influence little to add."
    )
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_").replace("__", "_")


SUMMARY = "find flipped labels in digits with every estimator, and check one influence claim by retraining"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import positive_int

    parser.add_argument("--backend", default="torch", help="a backend name: torch, tensorflow …")
    parser.add_argument("--max-iter", type=positive_int, default=300, help="L-BFGS iterations")
    parser.add_argument("--out", default="demo_output", help="where results and figures go")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, results only")
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument(
        "--hard",
        action="store_true",
        help="the hard setting instead: similar-class flips, a model at near-zero loss",
    )


def main(argv: list[str] | None = None) -> int:
    """``influence-core demo`` with these arguments (see ``influence-core demo --help``)."""
    from .cli import main as cli

    return cli(["demo", *(argv or [])])


def run(args: argparse.Namespace) -> int:
    set_progress(False if args.quiet else None)
    if args.hard:
        return run_hard(args)
    say = (lambda *a: None) if args.quiet else print
    start = time.perf_counter()
    out = Path(args.out) / args.backend
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)

    data = load_digits_with_flips()
    train = (data["X_train"], data["y_train"])
    test = (data["X_test"], data["y_test"])
    reference, model = build(args.backend, make_weights(SPEC, seed=SEED))
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
    reference, model = build(args.backend, trained_weights(reference, theta))
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
    methods = detection_methods(model, train, checkpoints, reference.layer_names[-1])
    for name, compute in methods.items():
        t = time.perf_counter()
        try:
            values = compute()
        except UnsupportedByBackendError as error:
            print(f"({name}: skipped, {error})")
            continue
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
    print_detection_table(rows, flipped)

    # -- one misclassified test digit: its proponents and opponents -----------------------
    wrong = np.flatnonzero(predictions != test[1])
    index = int(wrong[0]) if len(wrong) else 0
    last = model.with_parameters(reference.layer_names[-1])
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

    # -- what only influence claims, checked by retraining ---------------------------------
    point = (test[0][index : index + 1], test[1][index : index + 1])
    scores_point = model.to_numpy(calculator.influence(point))[0]
    t = time.perf_counter()
    table = counterfactual(model, theta, train, point, scores_point, args.max_iter)
    predicted_change = float(np.sort(scores_point)[:REMOVED].sum() / len(train[1]))
    loss_now = float(model.to_numpy(model.per_sample_loss(point))[0])
    print()
    print(
        f"removing training points and retraining ({args.max_iter} L-BFGS iterations from the "
        f"trained weights, {time.perf_counter() - t:.0f} s): test digit #{index}, label "
        f"{point[1][0]}, loss {loss_now:.3f} before"
    )
    print("| removed | test loss after | predicted | p(label) |")
    print("|---|---:|---:|---:|")
    for name, _, loss, predicted, probability in table:
        print(f"| {name} | {loss:.3f} | {predicted} | {probability:.3f} |")
    print(
        f"(influence predicted a loss change of {predicted_change:+.3f} for removing its "
        f"opponents, on the last layer to first order; a score of s predicts +s/n when removed)"
    )
    save_result(
        out / "results" / "counterfactual",
        {
            "removed": np.stack([row[1] for row in table[1:]]),
            "test_loss_after": np.array([row[2] for row in table]),
            "predicted_after": np.array([row[3] for row in table]),
        },
        method="counterfactual: remove and retrain",
        model=model,
        parameters={"test_index": index, "removed": REMOVED, "rows": [r[0] for r in table]},
        data={"train": train},
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
    say("(influence-core demo --hard: the setting where the training loss ranks flips as well)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
