"""First-order influence against its limit: one bare per-sample-gradient pass plus a product.

    .venv/bin/python benchmarks/bench_influence.py [--repeats 5]

Model: an MLP 64-128(tanh)-10 trained with L-BFGS (L2 1e-3) on scikit-learn's
digits, float32, the same weights in both frameworks; 1500 training and 64
test points, batch 256. Two parameter sets: the last layer (d = 1290) and all
parameters (d = 9610, too many for ``ExactIHVP``'s default limit).

For each backend, parameter set and solver (exact; CG with 10 iterations; LiSSA
with depth 50 and batch 64; Arnoldi with rank 50 from 100 iterations) it times

* **fit**: building the solver (Hessian + Cholesky, or the Arnoldi eigenpairs;
  nothing for CG and LiSSA);
* **scores, precomputed test block**: ``influence_from_prepared(S, train)`` for a
  solved S (d × 64): what the 1.5x target is about;
* **scores, end to end**: ``influence(test, train)``, including solving S;
* **self-influence**: ``self_influence(train)`` (exact and Arnoldi only: CG
  and LiSSA solve every training batch, n_train/256 iterative solves).

against the **limit** on the same data: a hand-written bare per-sample-gradient
pass (``vmap(grad)`` in PyTorch, ``tf.function(vectorized_map)`` in TF) over
the training set plus, for scores, the (b × d)(d × 64) product, and for
self-influence the product with a precomputed d × d inverse (exact) or the
d × 50 projection (Arnoldi). Writes ``benchmarks/results/influence.md``.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from bench_kernels import median_times
from sklearn.datasets import load_digits

from influence_conformance.specs import Dense, ModelSpec, canonical_offsets, make_weights
from influence_core import (
    ArnoldiIHVP,
    ConjugateGradientIHVP,
    ExactIHVP,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
    LissaIHVP,
    get_registry,
)
from influence_core.app.demo import fit
from influence_core.errors import ConvergenceWarning

SPEC = ModelSpec("digits_mlp_128", (64,), (Dense(128, "tanh"), Dense(10)), "cross_entropy", "-")
N_TRAIN, N_TEST, BATCH = 1500, 64, 256
DAMPING = 1e-2
RANK = 50
SOLVERS: dict[str, Callable[[InfluenceModel, object], object]] = {
    "exact": lambda m, data: ExactIHVP(damping=DAMPING).fit(m, data),
    "cg (10 it.)": lambda m, data: ConjugateGradientIHVP(damping=DAMPING, tol=0.0, maxiter=10).fit(
        m, data
    ),
    "lissa (depth 50)": lambda m, data: LissaIHVP(
        damping=DAMPING, depth=50, scale=50.0, batch_size=64
    ).fit(m, data),
    f"arnoldi (rank {RANK})": lambda m, data: ArnoldiIHVP(damping=DAMPING, rank=RANK).fit(m, data),
}


def trained_weights() -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float64)
    order = np.random.default_rng(0).permutation(len(X))
    train, test = order[:N_TRAIN], order[N_TRAIN : N_TRAIN + N_TEST]
    data = {"X": X[train], "y": y[train], "X_test": X[test], "y_test": y[test]}
    reference = (
        get_registry().by_name("torch").load_reference_models()(SPEC, make_weights(SPEC), "float64")
    )
    model = InfluenceModel(reference.model, reference.loss_fn, batch_size=N_TRAIN)
    theta, _ = fit(model, (data["X"], data["y"]), max_iter=300)
    canonical = reference.to_canonical(theta)
    offsets = [*canonical_offsets(SPEC), canonical.size]
    shapes = [shape for pair in SPEC.parameter_shapes() for shape in pair]
    weights = [
        canonical[a:b].reshape(shape)
        for a, b, shape in zip(offsets[:-1], offsets[1:], shapes, strict=True)
    ]
    return weights, data


# -- bare per-sample-gradient kernels: the limit ------------------------------------------
def torch_bare(reference, last_layer: bool, data: dict[str, np.ndarray]):
    import torch
    from torch.func import functional_call, grad, vmap

    model, loss = reference.model, reference.loss_fn
    prefix = dict(model.named_children())
    last = list(prefix)[-1]
    params = {
        k: v.detach()
        for k, v in model.named_parameters()
        if not last_layer or k.startswith(last + ".")
    }

    def sample_loss(p, x, y):
        return loss(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0)).sum()

    kernel = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    X = torch.as_tensor(data["X"], dtype=torch.float32)
    y = torch.as_tensor(data["y"])
    batches = [(X[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(X), BATCH)]

    def pass_(combine: Callable) -> object:
        out = []
        for xb, yb in batches:
            g = kernel(params, xb, yb)
            out.append(combine(torch.cat([t.reshape(len(xb), -1) for t in g.values()], 1)))
        return torch.cat(out, dim=-1)

    return pass_, lambda t: t.sum(1), lambda t: t.T


def tensorflow_bare(reference, last_layer: bool, data: dict[str, np.ndarray]):
    import tensorflow as tf

    model, loss = reference.model, reference.loss_fn
    variables = model.layers[-1].trainable_variables if last_layer else model.trainable_variables
    variables = [v.value if hasattr(v, "value") else v for v in variables]

    @tf.function
    def kernel(X, Y):
        def one(xy):
            x, y = xy
            with tf.GradientTape() as tape:
                value = tf.reduce_sum(loss(y[None], model(x[None], training=False)))
            return tf.concat([tf.reshape(g, [-1]) for g in tape.gradient(value, variables)], 0)

        return tf.vectorized_map(one, (X, Y))

    X = tf.constant(data["X"], dtype=tf.float32)
    y = tf.constant(data["y"])
    batches = [(X[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(data["X"]), BATCH)]

    def pass_(combine: Callable) -> object:
        return tf.concat([combine(kernel(xb, yb)) for xb, yb in batches], axis=-1)

    return pass_, lambda t: tf.reduce_sum(t, 1), tf.transpose


def rows_for(backend: str, weights, data, repeats: int) -> list[tuple]:
    reference = get_registry().by_name(backend).load_reference_models()(SPEC, weights, "float32")
    bare_builder = torch_bare if backend == "torch" else tensorflow_bare
    rows = []
    for label, selection in [("last layer", reference.layer_names[-1]), ("all", None)]:
        model = InfluenceModel(
            reference.model, reference.loss_fn, parameters=selection, batch_size=BATCH
        )
        kernels = bare_builder(reference, selection is not None, data)
        rows += setting_rows(backend, label, model, kernels, data, repeats)
    return rows


def setting_rows(backend, label, model, kernels, data, repeats: int) -> list[tuple]:
    rows = []
    for name, make in SOLVERS.items():
        if name == "exact" and model.num_parameters > 5000:
            rows.append((backend, label, model.num_parameters, name, *[None] * 6))
        else:
            timings = solver_timings(name, make, model, kernels, data, repeats)
            rows.append((backend, label, model.num_parameters, name, *timings))
        print(rows[-1], flush=True)
    return rows


def solver_timings(name, make, model, kernels, data, repeats: int) -> tuple:
    """Seconds: fit, scores from S, scores end to end, self-influence, and the two limits.

    Everything but the fit is timed by interleaved repeats, so drift on the
    machine hits ours and the limit alike.
    """
    bare, row_sum, transpose = kernels
    train = (data["X"].astype(np.float32), data["y"])
    test = (data["X_test"].astype(np.float32), data["y_test"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = time.perf_counter()
        ihvp = make(model, train)
        t_fit = time.perf_counter() - start
        calc = FirstOrderInfluenceCalculator(model, ihvp, batch_size=BATCH).fit(train)
        solved = calc.solve_test_gradients(test)
        fns = {
            # The limit meets S with the solver's own training side (G, or Arnoldi's G U D^-1/2).
            "limit": lambda: bare(lambda g: transpose(ihvp.train_side(g) @ solved)),
            "pre": lambda: calc.influence_from_prepared(solved),
            "end": lambda: calc.influence(test),
        }
        if name == "exact":
            inverse = ihvp.solve(model.xp.eye(model.num_parameters, dtype=model.dtype))
            fns["limit self"] = lambda: bare(lambda g: row_sum((g @ inverse) * g))
            fns["self"] = calc.self_influence
        elif name.startswith("arnoldi"):
            U = ihvp.projection_
            fns["limit self"] = lambda: bare(lambda g: row_sum((g @ U) ** 2))
            fns["self"] = calc.self_influence
        t = median_times(fns, repeats)
    return t_fit, t.get("pre"), t.get("end"), t.get("self"), t["limit"], t.get("limit self")


def table(rows: list[tuple], repeats: int) -> str:
    def ms(t: float | None) -> str:
        return "–" if t is None else f"{t * 1e3:.0f}"

    def ratio(a: float | None, b: float | None) -> str:
        return "–" if a is None or b is None else f"**{a / b:.2f}**"

    lines = [
        f"MLP 64-128-10 on digits, {N_TRAIN} train × {N_TEST} test, float32, batch {BATCH}, "
        f"damping {DAMPING}, {os.cpu_count()} CPU cores; median of {repeats} runs (ms).",
        "",
        "| backend | θ | d | solver | fit | limit: scores | scores, precomputed S | ratio "
        "| scores, end to end | ratio | limit: self-infl. | self-influence | ratio |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for backend, label, d, name, t_fit, t_pre, t_end, t_self, lim, lim_self in rows:
        if t_pre is None:
            lines.append(
                f"| {backend} | {label} | {d} | {name} | refused (d > 5000) | {ms(lim)} "
                "| – | – | – | – | – | – | – |"
            )
            continue
        lines.append(
            f"| {backend} | {label} | {d} | {name} | {ms(t_fit)} | {ms(lim)} | {ms(t_pre)} "
            f"| {ratio(t_pre, lim)} | {ms(t_end)} | {ratio(t_end, lim)} | {ms(lim_self)} "
            f"| {ms(t_self)} | {ratio(t_self, lim_self)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backend", choices=["torch", "tensorflow"], action="append")
    args = parser.parse_args()
    weights, data = trained_weights()
    rows = []
    for backend in args.backend or ["torch", "tensorflow"]:
        rows += rows_for(backend, weights, data, args.repeats)
    text = table(rows, args.repeats)
    print(text)
    out = Path(__file__).with_name("results")
    out.mkdir(exist_ok=True)
    (out / "influence.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
