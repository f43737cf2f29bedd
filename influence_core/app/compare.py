"""Cross-framework validation: the same model in two frameworks, every estimator, one table.

``influence-core compare`` trains the demo's MLP once, loads the same weights
into every installed backend and prints the largest relative disagreement per
quantity. For your own pair of models (a PyTorch port of a Keras model, say)::

    from influence_core.app.compare import compare_models, format_table

    rows = compare_models(
        InfluenceModel(keras_model, keras_loss),
        InfluenceModel(torch_model, torch_loss),
        train_data=(X_train, y_train),
        test_data=(X_test, y_test),
        to_b=lambda flat: my_reorder(flat),  # a's flat θ → b's flat θ (optional)
    )
    print(format_table(rows))

Scores, losses, outputs and top-k are compared as they are (they do not
depend on how each framework lays out θ); gradients and HVPs need ``to_b``,
which maps a vector in a's parameter order to b's, and are skipped without it.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import (
    ArnoldiIHVP,
    ArnoldiInfluenceCalculator,
    ConjugateGradientIHVP,
    ConvergenceWarning,
    ExactIHVP,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
    RepresenterPointL2,
    RepresenterPointLJE,
    SecondOrderInfluenceCalculator,
    TracIn,
    UnsupportedByBackendError,
    set_progress,
)
from ..progress import progress

__all__ = ["Disagreement", "compare_models", "format_table"]


@dataclass(frozen=True)
class Disagreement:
    """One compared quantity: max |a − b| / max |a| (``None`` when skipped, with why)."""

    quantity: str
    max_relative: float | None
    note: str = ""


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) or 1.0))


def _quantities(
    model: InfluenceModel, train: Any, test: Any, damping: float, k: int, head_name: str | None
) -> dict[str, Callable[[], Any]]:
    """Layout-free quantities of one model, each as a thunk returning a native array."""
    head_name = head_name if head_name is not None else model.last_layer().name
    head = model.with_parameters(head_name)
    n_group = max(2, model.count(train) // 10)
    group = [(b.inputs, b.targets) for b in model.batches(train, n_group)][0:1]

    def exact() -> FirstOrderInfluenceCalculator:
        return FirstOrderInfluenceCalculator(head, ExactIHVP(damping=damping)).fit(train)

    def top_k() -> Any:
        return exact().top_k(test, k=k).proponents

    return {
        "per-sample losses": lambda: model.per_sample_loss(test),
        "outputs": lambda: model.kernels.outputs(model.kernels.as_native(_inputs(test))),
        "influence scores, exact (last layer)": lambda: exact().influence(test),
        "self-influence, exact (last layer)": lambda: exact().self_influence(),
        "influence scores, CG (last layer)": lambda: (
            FirstOrderInfluenceCalculator(
                head, ConjugateGradientIHVP(damping=damping, tol=1e-12, maxiter=500)
            )
            .fit(train)
            .influence(test)
        ),
        "influence scores, Arnoldi (last layer, rank ≤ 20)": lambda: (
            ArnoldiInfluenceCalculator(
                head,
                ArnoldiIHVP(
                    rank=min(20, head.num_parameters),
                    iterations=head.num_parameters,
                    damping=damping,
                ),
            )
            .fit(train)
            .influence(test)
        ),
        "group influence, second order": lambda: (
            SecondOrderInfluenceCalculator(head, ExactIHVP(damping=damping))
            .fit(train)
            .group_influence(test, group)
        ),
        "TracIn scores (current weights)": lambda: (
            TracIn(model, [model.save_state()], 1.0).fit(train).influence(test)
        ),
        "representer points L2": lambda: (
            RepresenterPointL2(model, last_layer=head_name).fit(train).influence(test)
        ),
        "representer points LJE": lambda: (
            RepresenterPointLJE(model, ExactIHVP(damping=damping), last_layer=head_name)
            .fit(train)
            .influence(test)
        ),
        f"top-{k} proponents": top_k,
    }


def _inputs(data: Any) -> Any:
    return data[0]


def compare_models(
    model_a: InfluenceModel,
    model_b: InfluenceModel,
    train_data: Any,
    test_data: Any,
    *,
    to_b: Callable[[np.ndarray], np.ndarray] | None = None,
    damping: float = 1e-3,
    k: int = 5,
    heads: tuple[str | None, str | None] = (None, None),
) -> list[Disagreement]:
    """Run every estimator on both models and return the disagreement per quantity.

    ``train_data`` / ``test_data`` are ``(X, y)`` NumPy arrays (each model
    converts them). Top-k rows report the fraction of test points whose k
    proponents differ, not a relative error. ``heads`` names each model's last
    layer (default: the backend's ``last_layer``). A quantity a backend does not
    support is reported as skipped.
    """
    rows: list[Disagreement] = []
    host_a, host_b = model_a.to_numpy, model_b.to_numpy
    if to_b is None:
        rows.append(Disagreement("per-sample gradients, HVP", None, "skipped: no to_b mapping"))
    else:
        probe = (test_data[0][:32], test_data[1][:32])
        grads_a = host_a(model_a.per_sample_grads(probe))
        grads_b = host_b(model_b.per_sample_grads(probe))
        rows.append(
            Disagreement(
                "per-sample gradients", _relative(np.stack([to_b(g) for g in grads_a]), grads_b)
            )
        )
        v = np.random.default_rng(0).normal(size=model_a.num_parameters)
        hvp_a = host_a(model_a.hvp(train_data, v))
        hvp_b = host_b(model_b.hvp(train_data, to_b(v)))
        rows.append(Disagreement("HVP (training set, random v)", _relative(to_b(hvp_a), hvp_b)))
    quantities_a = _quantities(model_a, train_data, test_data, damping, k, heads[0])
    quantities_b = _quantities(model_b, train_data, test_data, damping, k, heads[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for name in progress(list(quantities_a), desc="compare"):
            try:
                a, b = host_a(quantities_a[name]()), host_b(quantities_b[name]())
            except UnsupportedByBackendError as error:
                rows.append(Disagreement(name, None, f"skipped: {error}"))
                continue
            if name.startswith("top-"):
                differ = float(np.mean(np.any(np.sort(a, axis=1) != np.sort(b, axis=1), axis=1)))
                rows.append(
                    Disagreement(name, differ, "fraction of test points whose top-k differ")
                )
            else:
                rows.append(Disagreement(name, _relative(a, b)))
    return rows


def format_table(rows: list[Disagreement], names: tuple[str, str] = ("a", "b")) -> str:
    lines = [
        f"| quantity | max relative difference, {names[1]} vs {names[0]} | note |",
        "|---|---:|---|",
    ]
    for row in rows:
        value = "–" if row.max_relative is None else f"{row.max_relative:.1e}"
        lines.append(f"| {row.quantity} | {value} | {row.note} |")
    return "\n".join(lines)


SUMMARY = "run every estimator on the same weights in every backend and report the disagreement"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli import positive_int

    parser.add_argument(
        "--max-iter",
        type=positive_int,
        default=100,
        help="L-BFGS iterations for the shared weights",
    )
    parser.add_argument(
        "--backend",
        action="append",
        help="a backend to compare (repeat it); default: every installed one with reference models",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv: list[str] | None = None) -> int:
    """``influence-core compare`` with these arguments (see ``influence-core compare --help``)."""
    from .cli import main as cli

    return cli(["compare", *(argv or [])])


def run(args: argparse.Namespace) -> int:
    from influence_conformance.numpy_reference import unflatten_weights
    from influence_conformance.specs import make_weights

    from ..plugin import get_registry
    from .demo import SPEC, build, fit, load_digits_with_flips

    set_progress(False if args.quiet else None)
    start = time.perf_counter()
    backends = args.backend or [
        b for b in get_registry().names() if get_registry().by_name(b).reference_models
    ]
    backends.sort(key=lambda name: name != "torch")  # torch first when installed
    if len(backends) < 2:
        print(f"compare needs two backends with reference models; installed: {backends}")
        return 1
    data = load_digits_with_flips()
    train = (data["X_train"][:600], data["y_train"][:600])
    test = (data["X_test"][:20], data["y_test"][:20])
    first, model_first = build(backends[0], make_weights(SPEC))
    theta, _ = fit(model_first, train, args.max_iter)
    canonical = first.to_canonical(theta)
    trained = unflatten_weights(SPEC, canonical)
    first, model_first = build(backends[0], trained)  # every backend's model at these weights
    print(
        f"the demo's MLP (d = {model_first.num_parameters}) trained in {backends[0]}, float64; "
        f"{len(train[1])} training and {len(test[1])} test digits"
    )
    for other in backends[1:]:
        reference, model_other = build(other, trained)

        def to_other(flat: np.ndarray, reference: Any = reference) -> np.ndarray:
            return reference.from_canonical(first.to_canonical(flat))

        rows = compare_models(
            model_first,
            model_other,
            train,
            test,
            to_b=to_other,
            heads=(first.layer_names[-1], reference.layer_names[-1]),
        )
        print(format_table(rows, (backends[0], other)))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
