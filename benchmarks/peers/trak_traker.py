"""TRAK, ours (torch, TensorFlow, JAX) against traker, in one run: agreement, speed, memory.

    .venv/bin/python benchmarks/peers/trak_traker.py [--models mlp-0.1M cnn-1M]
        [--backends torch tensorflow jax] [--k 512] [--n-train 2000] [--n-test 50]

The models of ``scale_specs.py`` (all parameters), seeded random weights,
synthetic inputs and labels (``scale_ekfac.setup_for``), float32, λ = 0, the
margin and Q = 1 − p. Each run is its own process, 2 threads.

* **Agreement** (one model): traker projects with *our* matrix (its
  ``projector=`` takes a user projector; ours is exported in torch's
  parameter order). traker divides gradients by √d and rescales
  (ΦᵀΦ)⁻¹ by its mean absolute entry, so its scores are ours times one
  constant c = 1 / (d · mean |(ΦᵀΦ)⁻¹|): we report Pearson, the fitted c
  against that prediction, and the largest relative difference after c.
* **Speed**: featurise the training set and score the test set, traker with
  its own CPU projector (``BasicProjector``) against ours with a
  ``RandomProjection`` of the same k, on each backend, and ours with a
  ``KroneckerProjection`` of about the same k (the sum over layers, printed;
  relative damping 1e-3, which it needs).
* **Memory in n_train**: ours (torch) with ``features_dir`` at n_train and 4 × n_train.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TRAKER = ROOT / "benchmarks" / ".envs" / "traker" / "bin" / "python"


def setup_with_models(spec_name: str, n_train: int, n_test: int, k: int, models: int) -> dict:
    from scale_ekfac import setup_for
    from scale_specs import SPECS

    from influence_conformance.specs import make_weights

    setup = setup_for(spec_name, n_train, n_test)
    for s in range(models):
        for i, w in enumerate(make_weights(SPECS[spec_name], seed=1 + s)):
            setup[f"m{s}_w{i}"] = w.astype(np.float32)
    setup["models"], setup["k"] = np.array(models), np.array(k)
    return setup


def ours(
    mode: str, backend: str, spec_name: str, projector: str, setup_path: str, out: str
) -> None:
    """One of our runs (a worker process). ``mode``: ``run``, ``export`` or ``disk``."""
    from scale_specs import SPECS, worker_threads

    worker_threads(backend)
    import resource

    from influence_core import (
        TRAK,
        InfluenceModel,
        KroneckerProjection,
        RandomProjection,
        get_registry,
        set_progress,
    )

    set_progress(False)
    setup = np.load(setup_path)
    count, models, k = int(setup["count"]), int(setup["models"]), int(setup["k"])
    build = get_registry().by_name(backend).load_reference_models()
    states, model = [], None
    for s in range(models):
        reference = build(SPECS[spec_name], [setup[f"m{s}_w{i}"] for i in range(count)], "float32")
        model = InfluenceModel(
            reference.model, reference.loss_fn, batch_size=int(setup["batch_size"])
        )
        states.append(model.kernels.save_state())
    if projector == "dense":
        chosen = RandomProjection(k, seed=0)
    else:  # "kronecker:16x16"
        k_in, k_out = (int(v) for v in projector.split(":")[1].split("x"))
        chosen = KroneckerProjection(k_in, k_out, seed=0)
    # A Kronecker-projected margin of a softmax is singular at λ = 0 (see TRAK's docstring).
    relative = 1e-3 if projector != "dense" else 0.0
    if mode == "export":
        d = model.num_parameters
        matrices = {
            f"P{s}": np.asarray(
                model.to_numpy(model.from_canonical(chosen.reseeded(s).matrix(d))), np.float32
            )
            for s in range(models)
        }
        np.savez(out, **matrices)
        return
    train = (setup["X_train"], setup["y_train"])
    test = (setup["X_test"], setup["y_test"])
    with tempfile.TemporaryDirectory() as features:
        calc = TRAK(
            model,
            states if models > 1 else None,
            projector=chosen,
            relative_damping=relative,
            features_dir=features if mode == "disk" else None,
        )
        began = time.perf_counter()
        calc.fit(train)
        fitted = time.perf_counter()
        scores = np.asarray(model.to_numpy(calc.influence(test)), np.float64)
        done = time.perf_counter()
    np.savez(
        out,
        scores=scores,
        seconds=np.array([fitted - began, done - fitted]),
        rss_gb=np.array(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20),
        k=np.array(chosen.dim(model)),
        predicted_scale=np.array(
            1.0 / (model.num_parameters * float(np.mean(np.abs(model.to_numpy(calc.kernels_[0])))))
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp-0.1M", "cnn-1M"])
    parser.add_argument("--backends", nargs="+", default=["torch", "tensorflow", "jax"])
    parser.add_argument("--k", type=int, default=512)
    parser.add_argument(
        "--kronecker",
        nargs="+",
        default=["mlp-0.1M=kronecker:18x18", "cnn-1M=kronecker:10x10"],
        help="per model, k_in x k_out per layer (about k features in all)",
    )
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=50)
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        ours(*args.worker)
        return
    sys.path.insert(0, str(HERE))
    from scale_ekfac import run

    print(
        f"n_train = {args.n_train}, n_test = {args.n_test}, k = {args.k}, float32, λ = 0, "
        "one model, all parameters, 2 threads per process (2026-12-01)"
    )

    def worker(mode: str, backend: str, spec: str, projector: str, tmp: str, out: str):
        command = [sys.executable, __file__, "--worker", mode, backend, spec, projector]
        error = run([*command, f"{tmp}/setup.npz", out], args.timeout)
        return error or dict(np.load(out))

    for spec_name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            setup = setup_with_models(spec_name, args.n_train, args.n_test, args.k, 1)
            d = sum(setup[f"w{i}"].size for i in range(int(setup["count"])))
            np.savez(f"{tmp}/setup.npz", **setup)
            print(f"\n### {spec_name} (d = {d})\n")
            if not args.skip_agreement:
                error = worker("export", "torch", spec_name, "dense", tmp, f"{tmp}/P.npz")
                mine = worker("run", "torch", spec_name, "dense", tmp, f"{tmp}/mine.npz")
                command = [str(TRAKER), str(HERE / "run_traker_spec.py"), spec_name]
                failed = run(
                    [*command, f"{tmp}/setup.npz", f"{tmp}/given.npz", f"{tmp}/P.npz"], args.timeout
                )
                if isinstance(error, str) or isinstance(mine, str) or failed:
                    print(
                        f"agreement run failed: {error if isinstance(error, str) else ''} "
                        f"{mine if isinstance(mine, str) else ''} {failed or ''}"
                    )
                else:
                    theirs = np.load(f"{tmp}/given.npz")["scores"]
                    a = mine["scores"]
                    pearson = float(np.corrcoef(a.ravel(), theirs.ravel())[0, 1])
                    scale = float((a * theirs).sum() / (a * a).sum())
                    gap = float(np.max(np.abs(scale * a - theirs)) / np.max(np.abs(theirs)))
                    print(
                        "Agreement with the same projection matrix (torch): "
                        f"Pearson {pearson:.7f}; traker = c × ours with c = {scale:.6e} "
                        f"(predicted {float(mine['predicted_scale']):.6e}); max relative "
                        f"difference after c: {gap:.1e}\n"
                    )
            print(
                "| library | projector | k | featurise (s) | score (s) | total (s) | x traker | peak RSS (GB) |"
            )
            print("|---|---|---:|---:|---:|---:|---:|---:|")
            results = {}
            command = [str(TRAKER), str(HERE / "run_traker_spec.py"), spec_name]
            error = run([*command, f"{tmp}/setup.npz", f"{tmp}/traker.npz"], args.timeout)
            results[("traker", "BasicProjector")] = error or dict(np.load(f"{tmp}/traker.npz"))
            for backend in args.backends:
                kronecker = dict(item.split("=") for item in args.kronecker).get(spec_name)
                for projector in ("dense", *([kronecker] if kronecker else [])):
                    out = f"{tmp}/{backend}-{projector.replace(':', '-')}.npz"
                    results[(f"ours, {backend}", projector)] = worker(
                        "run", backend, spec_name, projector, tmp, out
                    )
            theirs = results[("traker", "BasicProjector")]
            base = None if isinstance(theirs, str) else float(theirs["seconds"].sum())
            for (library, projector), result in results.items():
                if isinstance(result, str):
                    print(f"| {library} | {projector} | {result} |")
                    continue
                total = float(result["seconds"].sum())
                k = int(result["k"]) if "k" in result else args.k
                ratio = f"{total / base:.3f}" if base else "-"
                print(
                    f"| {library} | {projector} | {k} | {result['seconds'][0]:.1f} "
                    f"| {result['seconds'][1]:.1f} | {total:.1f} | {ratio} "
                    f"| {float(result['rss_gb']):.2f} |",
                    flush=True,
                )
    # Memory against n_train: features on disk, torch, the first model.
    spec_name = args.models[0]
    print(
        f"\nPeak RSS against n_train, ours (torch, {spec_name}, dense k = {args.k}, features_dir):\n"
    )
    print("| n_train | featurise (s) | peak RSS (GB) |")
    print("|---:|---:|---:|")
    for n in (args.n_train, 4 * args.n_train):
        with tempfile.TemporaryDirectory() as tmp:
            np.savez(f"{tmp}/setup.npz", **setup_with_models(spec_name, n, args.n_test, args.k, 1))
            result = worker("disk", "torch", spec_name, "dense", tmp, f"{tmp}/disk.npz")
            if isinstance(result, str):
                print(f"| {n} | {result} |")
            else:
                print(f"| {n} | {result['seconds'][0]:.1f} | {float(result['rss_gb']):.2f} |")


if __name__ == "__main__":
    main()
