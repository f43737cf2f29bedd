"""EK-FAC and K-FAC at realistic sizes, ours (torch, TensorFlow, JAX) against kronfluence, in one run.

    .venv/bin/python benchmarks/peers/scale_ekfac.py [--models mlp-0.1M cnn-1M wide-10M]
        [--backends torch tensorflow jax] [--strategies ekfac kfac] [--n-train 2000]

The models of ``scale_specs.py`` (an MLP of 0.1M parameters, a conv net of
1M, a wide MLP of 10.5M; all parameters), seeded random weights, synthetic
inputs and labels, float32, empirical Fisher (so both sides are
deterministic), damping 1e-3, n_test = 50. Each (library, backend, strategy)
runs in its own process, 2 threads, so its peak RSS is its own; seconds are
fit + pairwise scores (n_test × n_train) + self-influence. Agreement is the
Pearson correlation and the largest relative difference of the pairwise
scores and the self-influence against kronfluence's for the same strategy.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
KRONFLUENCE = ROOT / "benchmarks" / ".envs" / "kronfluence" / "bin" / "python"
DAMPING = 1e-3


def setup_for(spec_name: str, n_train: int, n_test: int) -> dict[str, np.ndarray]:
    from scale_specs import SPECS

    from influence_conformance.specs import make_weights

    spec = SPECS[spec_name]
    rng = np.random.default_rng(0)
    X = rng.normal(size=(n_train + n_test, *spec.input_shape)).astype(np.float32)
    y = rng.integers(0, spec.num_outputs, n_train + n_test).astype(np.int64)
    weights = make_weights(spec, seed=1)
    d = sum(w.size for w in weights)
    setup = {
        "X_train": X[:n_train],
        "y_train": y[:n_train],
        "X_test": X[n_train:],
        "y_test": y[n_train:],
        "damping": np.array(DAMPING),
        "count": np.array(len(weights)),
        "batch_size": np.array(256),
        # kronfluence forms (b, p_out, p_in) per-sample gradients per layer when scoring.
        "score_batch_size": np.array(256 if d < 2e6 else 32),
    }
    setup.update({f"w{i}": w.astype(np.float32) for i, w in enumerate(weights)})
    return setup


def ours(backend: str, spec_name: str, strategy: str, setup_path: str, out_path: str) -> None:
    """One of our runs (a worker process)."""
    from scale_specs import SPECS, worker_threads

    worker_threads(backend)

    from influence_core import (
        EKFACIHVP,
        KFACIHVP,
        FirstOrderInfluenceCalculator,
        InfluenceModel,
        get_registry,
        set_progress,
    )

    set_progress(False)
    setup = np.load(setup_path)
    weights = [setup[f"w{i}"] for i in range(int(setup["count"]))]
    build = get_registry().by_name(backend).load_reference_models()
    reference = build(SPECS[spec_name], weights, "float32")
    model = InfluenceModel(reference.model, reference.loss_fn, batch_size=int(setup["batch_size"]))
    name, _, rank = strategy.partition(":r")  # "ekfac:r32": the rank-32 query side
    solver = {"ekfac": EKFACIHVP, "kfac": KFACIHVP}[name]
    calc = FirstOrderInfluenceCalculator(
        model,
        solver(
            damping=float(setup["damping"]),
            fisher="empirical",
            query_rank=int(rank) if rank else None,
        ),
    )
    train = (setup["X_train"], setup["y_train"])
    test = (setup["X_test"], setup["y_test"])
    began = time.perf_counter()
    calc.fit(train)
    fitted = time.perf_counter()
    pairwise = model.to_numpy(calc.influence(test))
    paired = time.perf_counter()
    own = model.to_numpy(calc.self_influence())
    done = time.perf_counter()
    np.savez(
        out_path,
        pairwise=np.asarray(pairwise, np.float64),
        self=np.asarray(own, np.float64),
        seconds=np.array([fitted - began, paired - fitted, done - paired]),
        rss_gb=np.array(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20),
        d=np.array(model.num_parameters),
    )


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    pearson = float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    return pearson, float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def run(command: list[str], timeout: int) -> str | None:
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "2"}
    try:
        done = subprocess.run(command, timeout=timeout, env=env, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout} s"
    if done.returncode != 0:
        return done.stderr.strip().splitlines()[-1][:120] if done.stderr.strip() else "failed"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp-0.1M", "cnn-1M", "wide-10M"])
    parser.add_argument("--backends", nargs="+", default=["torch", "tensorflow", "jax"])
    parser.add_argument("--strategies", nargs="+", default=["ekfac", "kfac"])
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=50)
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument(
        "--query-rank", type=int, help="also run ours (torch) with this low-rank query side"
    )
    parser.add_argument("--no-kronfluence", action="store_true")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        ours(*args.worker)
        return
    sys.path.insert(0, str(HERE))
    print(
        f"n_train = {args.n_train}, n_test = {args.n_test}, float32, empirical Fisher, damping "
        f"{DAMPING:g}, all parameters, 2 threads per process (2026-12-01)"
    )
    print()
    print(
        "| model | d | library | strategy | fit (s) | pairwise (s) | self (s) | total (s) "
        "| x kronfluence | peak RSS (GB) | pairwise Pearson | pairwise max rel. diff "
        "| self Pearson | self max rel. diff |"
    )
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for spec_name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            setup = setup_for(spec_name, args.n_train, args.n_test)
            d = sum(setup[f"w{i}"].size for i in range(int(setup["count"])))
            np.savez(f"{tmp}/setup.npz", **setup)
            for strategy in args.strategies:
                results, errors = {}, {}
                if KRONFLUENCE.exists() and not args.no_kronfluence:
                    out = f"{tmp}/kronfluence-{strategy}.npz"
                    script = str(HERE / "run_kronfluence_spec.py")
                    command = [
                        str(KRONFLUENCE),
                        script,
                        spec_name,
                        strategy,
                        f"{tmp}/setup.npz",
                        out,
                    ]
                    error = run(command, args.timeout)
                    if error:
                        errors["kronfluence"] = error
                    else:
                        results["kronfluence"] = dict(np.load(out))
                runs = [(backend, strategy, f"ours, {backend}") for backend in args.backends]
                if args.query_rank:
                    label = f"ours, torch, query rank {args.query_rank}"
                    runs.append(("torch", f"{strategy}:r{args.query_rank}", label))
                for backend, variant, label in runs:
                    out = f"{tmp}/{backend}-{variant}.npz"
                    command = [sys.executable, __file__, "--worker", backend, spec_name, variant]
                    error = run([*command, f"{tmp}/setup.npz", out], args.timeout)
                    if error:
                        errors[label] = error
                    else:
                        results[label] = dict(np.load(out))
                theirs = results.get("kronfluence")
                for library, result in results.items():
                    seconds = result["seconds"]
                    total = float(seconds.sum())
                    ratio = f"{total / float(theirs['seconds'].sum()):.3f}" if theirs else "-"
                    agree = ["-"] * 4
                    if theirs is not None and library != "kronfluence":
                        rp, dp = compare(result["pairwise"], theirs["pairwise"])
                        rs, ds = compare(result["self"], theirs["self"])
                        agree = [f"{rp:.6f}", f"{dp:.1e}", f"{rs:.6f}", f"{ds:.1e}"]
                    print(
                        f"| {spec_name} | {d} | {library} | {strategy} | {seconds[0]:.1f} "
                        f"| {seconds[1]:.1f} | {seconds[2]:.1f} | {total:.1f} | {ratio} "
                        f"| {float(result['rss_gb']):.2f} | " + " | ".join(agree) + " |",
                        flush=True,
                    )
                for library, error in errors.items():
                    print(f"| {spec_name} | {d} | {library} | {strategy} | {error} |", flush=True)


if __name__ == "__main__":
    main()
