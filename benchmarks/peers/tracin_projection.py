"""TracIn with and without projection at 0.1M, 1M and 5.2M parameters, and captum's TracInCP.

    .venv/bin/python benchmarks/peers/tracin_projection.py [--models mlp-0.1M cnn-1M mlp-5.2M]
        [--n-train 1000] [--n-test 50] [--k 512]

Five checkpoints (seeded random weights of the ``scale_specs`` model; η =
0.1), all parameters, float32, torch, one process per run (2 threads, own
peak RSS). The work is TracInCP's usual pair: test × train scores and the
self-influence of every training point (``influence_and_self_influence``).
Ours unprojected, with a dense ``RandomProjection(k)`` and with a per-layer
``KroneckerProjection``; captum's ``TracInCP`` (hooks, its fastest setting)
on the models it can hold. Agreement of the unprojected scores with captum's
is printed as the largest relative difference.
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
CAPTUM = ROOT / "benchmarks" / ".envs" / "torch-peers" / "bin" / "python"
RATE = 0.1
BATCH = {"mlp-0.1M": 256, "cnn-1M": 128, "mlp-5.2M": 32}


def setup_for(spec_name: str, n_train: int, n_test: int, models: int = 5) -> dict:
    from trak_traker import setup_with_models

    setup = setup_with_models(spec_name, n_train, n_test, 0, models)
    setup["batch_size"] = np.array(BATCH.get(spec_name, 64))
    setup["rate"] = np.array(RATE)
    return setup


def ours(spec_name: str, projector: str, setup_path: str, out: str) -> None:
    import resource

    from scale_specs import SPECS, worker_threads

    worker_threads("torch")

    from influence_core import (
        InfluenceModel,
        KroneckerProjection,
        RandomProjection,
        TracIn,
        get_registry,
        set_progress,
    )

    set_progress(False)
    setup = np.load(setup_path)
    count, models = int(setup["count"]), int(setup["models"])
    build = get_registry().by_name("torch").load_reference_models()
    states, model = [], None
    for s in range(models):
        reference = build(SPECS[spec_name], [setup[f"m{s}_w{i}"] for i in range(count)], "float32")
        model = InfluenceModel(
            reference.model, reference.loss_fn, batch_size=int(setup["batch_size"])
        )
        states.append(model.kernels.save_state())
    chosen = None
    if projector.startswith("dense"):
        chosen = RandomProjection(int(projector.split(":")[1]), seed=0)
    elif projector.startswith("kronecker"):
        k_in, k_out = (int(v) for v in projector.split(":")[1].split("x"))
        chosen = KroneckerProjection(k_in, k_out, seed=0)
    calc = TracIn(model, states, float(setup["rate"]), projector=chosen)
    began = time.perf_counter()
    calc.fit((setup["X_train"], setup["y_train"]))
    scores, own = calc.influence_and_self_influence((setup["X_test"], setup["y_test"]))
    seconds = time.perf_counter() - began
    np.savez(
        out,
        scores=np.asarray(model.to_numpy(scores), np.float64),
        self=np.asarray(model.to_numpy(own), np.float64),
        seconds=np.array(seconds),
        rss_gb=np.array(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20),
        k=np.array(model.num_parameters if chosen is None else chosen.dim(model)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp-0.1M", "cnn-1M", "mlp-5.2M"])
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=50)
    parser.add_argument("--k", type=int, default=512)
    parser.add_argument("--kronecker", default="16x16")
    parser.add_argument("--captum-max-d", type=float, default=2e6)
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        ours(*args.worker)
        return
    sys.path.insert(0, str(HERE))
    from scale_ekfac import run

    print(
        f"TracInCP, 5 checkpoints, n_train = {args.n_train}, n_test = {args.n_test}, scores + "
        "self-influence, float32, torch, all parameters, 2 threads per process (2026-12-01)\n"
    )
    print("| model | d | run | k | seconds | x unprojected | peak RSS (GB) | vs captum |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    for spec_name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            setup = setup_for(spec_name, args.n_train, args.n_test)
            d = sum(setup[f"w{i}"].size for i in range(int(setup["count"])))
            np.savez(f"{tmp}/setup.npz", **setup)
            results = {}
            for projector in ("none", f"dense:{args.k}", f"kronecker:{args.kronecker}"):
                if projector.startswith("dense") and d * args.k * 4 > 2**31:
                    # Over RandomProjection's default memory budget the matrix is redrawn
                    # (d·k normals) at every batch: not a setting anyone should run.
                    results[f"ours, {projector}"] = (
                        f"not run: d·k·4 B = {d * args.k * 4 / 2**30:.1f} GiB exceeds the 2 GiB "
                        "budget, so the matrix would be redrawn at every batch"
                    )
                    continue
                out = f"{tmp}/{projector.replace(':', '-')}.npz"
                command = [sys.executable, __file__, "--worker", spec_name, projector]
                error = run([*command, f"{tmp}/setup.npz", out], args.timeout)
                results[f"ours, {projector}"] = error or dict(np.load(out))
            if CAPTUM.exists() and d <= args.captum_max_d:
                command = [str(CAPTUM), str(HERE / "run_captum_tracin_spec.py"), spec_name]
                error = run([*command, f"{tmp}/setup.npz", f"{tmp}/captum.npz"], args.timeout)
                results["captum TracInCP"] = error or dict(np.load(f"{tmp}/captum.npz"))
            plain = results["ours, none"]
            captum = results.get("captum TracInCP")
            for label, result in results.items():
                if isinstance(result, str):
                    print(f"| {spec_name} | {d} | {label} | {result} |", flush=True)
                    continue
                seconds = float(result["seconds"])
                ratio = (
                    "-" if isinstance(plain, str) else f"{seconds / float(plain['seconds']):.3f}"
                )
                versus = "-"
                if isinstance(captum, dict) and label == "ours, none":
                    gap = np.max(np.abs(result["scores"] - captum["scores"])) / np.max(
                        np.abs(captum["scores"])
                    )
                    versus = f"{seconds / float(captum['seconds']):.3f}x its time, max rel. diff {gap:.1e}"
                k = int(result["k"]) if "k" in result else d
                print(
                    f"| {spec_name} | {d} | {label} | {k} | {seconds:.1f} | {ratio} "
                    f"| {float(result['rss_gb']):.2f} | {versus} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
