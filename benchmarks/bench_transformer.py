"""EK-FAC on every parameter of a 5.2M-parameter transformer: time and peak memory, one process each.

    .venv/bin/python benchmarks/bench_transformer.py [--n-train 2000] [--subsets all dense]

The transformer-style model of issue 25 (token table 8000 × 256 = 2.05M,
positional table, 4 pre-norm blocks of attention (q, k, v, o as nn.Linear)
and a 256-1024-256 MLP, LayerNorms, a 10-class head on the mean position:
5.2M parameters, 25 dense layers holding 3.16M), torch float32, sequences
of 64 tokens, batch 32, seeded weights and data. Each subset runs in its own
process (so its peak RSS is its own): EK-FAC (empirical Fisher, damping
1e-3) fit, pairwise scores of 50 test sequences against n_train, and the
self-influence of every training sequence. ``all`` is every parameter
(embeddings, LayerNorms, dense); ``dense`` the 25 dense layers, the subset
kronfluence covers. ``--tracin`` instead runs layer-wise TracIn (one
checkpoint) on all parameters at batch 256, n_train 512, 10 test sequences:
its (b, d) gradient block would be 5.3 GB; from layer statistics it never exists.

``--trak`` runs dense-projection TRAK on all parameters, ours (torch) and
traker's (``BasicProjector``, in its venv: ``ONLY=traker bash
benchmarks/peers/setup_envs.sh``), one process each, on the same weights and
data: Gaussian k = 256 (d·k is 5.4 GB in float32, so neither keeps the
matrix), λ = 0, the margin, batch 32, n_train 512 by default. Prints featurise
and scoring seconds, peak RSS and the ratio, and the scores' agreement (the
matrices differ, so only the rank correlation of two JL estimates).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformer_model import Transformer, seeded

from influence_core import (
    EKFACIHVP,
    TRAK,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
    RandomProjection,
    TracIn,
    set_progress,
)
from influence_core.layerwise import coverage

HERE = Path(__file__).resolve().parent
KRONFLUENCE = HERE / ".envs" / "kronfluence" / "bin" / "python"
TRAKER = HERE / ".envs" / "traker" / "bin" / "python"
N_TEST = 50


def one(subset: str, n_train: int, scores: str | None = None) -> dict[str, float]:
    set_progress(False)
    torch.set_num_threads(2)
    net, train, test = seeded(n_train, N_TEST)
    model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=32)
    if subset == "dense":
        dense = sorted({c.layer for c in coverage(model).values() if c.kind == "dense"})
        model = model.with_parameters(dense)
    start = time.perf_counter()
    calculator = FirstOrderInfluenceCalculator(
        model, EKFACIHVP(damping=1e-3, fisher="empirical")
    ).fit(train)
    fitted = time.perf_counter()
    pairwise = calculator.influence(test)
    scored = time.perf_counter()
    own = calculator.self_influence()
    done = time.perf_counter()
    calculator.influence_and_self_influence(test)  # both from one pass over the training data
    both = time.perf_counter() - done
    if scores:
        np.savez(scores, pairwise=pairwise.double().numpy(), self=own.double().numpy())
    return {
        "d": model.num_parameters,
        "fit": fitted - start,
        "pairwise": scored - fitted,
        "self": done - scored,
        "both": both,
        "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def tracin() -> None:
    set_progress(False)
    net, train, test = seeded(512, 10)
    model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=256)
    start = time.perf_counter()
    calculator = TracIn(model, [model.save_state()], 0.1).fit(train)
    calculator.influence(test)
    calculator.self_influence()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"TracIn, all {model.num_parameters:,} parameters, batch 256, n_train 512: "
        f"{time.perf_counter() - start:.1f} s (pairwise + self-influence), peak RSS {peak:.2f} GB"
    )


TRAK_K, TRAK_BATCH = 256, 32


def trak_ours(n_train: int, out: str) -> None:
    """Our dense-projection TRAK on all parameters (a worker process)."""
    set_progress(False)
    torch.set_num_threads(2)
    net, train, test = seeded(n_train, N_TEST)
    model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=TRAK_BATCH)
    start = time.perf_counter()
    calculator = TRAK(model, projector=RandomProjection(TRAK_K), relative_damping=0.0).fit(train)
    fitted = time.perf_counter()
    scores = calculator.influence(test)
    done = time.perf_counter()
    np.savez(
        out,
        scores=scores.double().numpy(),
        seconds=np.array([fitted - start, done - fitted]),
        rss_gb=np.array(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20),
    )


def trak(n_train: int) -> None:
    """Ours against traker, dense projection, one process each, on the same weights and data."""
    from scipy.stats import spearmanr

    print(
        f"TRAK, dense Gaussian projection k = {TRAK_K}, all parameters, torch float32, "
        f"2 threads, batch {TRAK_BATCH}, n_train {n_train}, {N_TEST} test sequences, λ = 0\n"
    )
    print("| library | featurise (s) | score (s) | total (s) | x traker | peak RSS (GB) |")
    print("|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        net, (train_ids, train_y), (test_ids, test_y) = seeded(n_train, N_TEST)
        state = {f"state.{k}": v.numpy() for k, v in net.state_dict().items()}
        np.savez(
            work / "setup.npz",
            train_ids=train_ids.numpy(),
            train_y=train_y.numpy(),
            test_ids=test_ids.numpy(),
            test_y=test_y.numpy(),
            k=np.array(TRAK_K),
            batch_size=np.array(TRAK_BATCH),
            **state,
        )
        runner = HERE / "peers" / "run_traker_transformer.py"
        subprocess.run(
            [str(TRAKER), str(runner), str(work / "setup.npz"), str(work / "traker.npz")],
            check=True,
        )
        command = [sys.executable, __file__, "--trak-worker", str(work / "ours.npz")]
        subprocess.run([*command, "--n-train", str(n_train)], check=True)
        results = {name: dict(np.load(work / f"{name}.npz")) for name in ("traker", "ours")}
    base = float(results["traker"]["seconds"].sum())
    for name, r in results.items():
        featurise, score = (float(x) for x in r["seconds"])
        print(
            f"| {name} | {featurise:.1f} | {score:.1f} | {featurise + score:.1f} "
            f"| {(featurise + score) / base:.2f} | {float(r['rss_gb']):.2f} |"
        )
    rho = spearmanr(results["ours"]["scores"].ravel(), results["traker"]["scores"].ravel())[0]
    print(f"\nSpearman between the two (different random matrices): {rho:.3f}")


def kronfluence(n_train: int, work: Path) -> dict[str, float]:
    """kronfluence's EK-FAC on the same weights and data (its nn.Linear subset), in its own venv."""
    net, (train_ids, train_y), (test_ids, test_y) = seeded(n_train, N_TEST)
    state = {f"state.{k}": v.numpy() for k, v in net.state_dict().items()}
    setup, out = work / "setup.npz", work / "kronfluence.npz"
    np.savez(
        setup,
        train_ids=train_ids.numpy(),
        train_y=train_y.numpy(),
        test_ids=test_ids.numpy(),
        test_y=test_y.numpy(),
        **state,
    )
    runner = HERE / "peers" / "run_kronfluence_transformer.py"
    subprocess.run([str(KRONFLUENCE), str(runner), str(setup), str(out)], check=True)
    with np.load(out) as r:
        fit, pairwise, own = (float(x) for x in r["seconds"])
        return {"fit": fit, "pairwise": pairwise, "self": own, "rss_gb": float(r["rss_gb"])}


def _agreement(ours: Path, theirs: Path) -> str:
    with np.load(ours) as a, np.load(theirs) as b:
        parts = []
        for key in ("pairwise", "self"):
            x, y = a[key].ravel(), b[key].ravel()
            pearson = np.corrcoef(x, y)[0, 1]
            parts.append(
                f"{key}: Pearson {pearson:.6f}, max rel. diff "
                f"{np.abs(x - y).max() / np.abs(y).max():.1e}"
            )
        return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--subsets", nargs="+", default=["all", "dense"])
    parser.add_argument("--tracin", action="store_true")
    parser.add_argument(
        "--kronfluence",
        action="store_true",
        help="also run kronfluence's EK-FAC on the dense subset (benchmarks/.envs)",
    )
    parser.add_argument("--trak", action="store_true", help="dense TRAK, ours against traker")
    parser.add_argument("--trak-worker", help=argparse.SUPPRESS)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--scores", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tracin:
        tracin()
        return
    if args.trak_worker:
        trak_ours(args.n_train, args.trak_worker)
        return
    if args.trak:
        trak(args.n_train)
        return
    if args.one:
        print(json.dumps(one(args.one, args.n_train, args.scores)))
        return
    print(f"transformer, torch float32, 2 threads, n_train {args.n_train}, {N_TEST} test sequences")
    print()
    print(
        "| library, parameters | d | fit (s) | pairwise (s) | self-influence (s) | total (s) "
        "| both in one pass (s) | fit + both (s) | peak RSS (GB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for subset in args.subsets:
            command = [
                sys.executable,
                __file__,
                "--one",
                subset,
                "--n-train",
                str(args.n_train),
                "--scores",
                str(work / f"ours-{subset}.npz"),
            ]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            rows[f"ours, {subset}"] = r = json.loads(result.stdout.strip().splitlines()[-1])
            _print_row(f"ours, {subset}", r)
        if args.kronfluence:
            r = kronfluence(args.n_train, work)
            linears = [m for m in Transformer().modules() if isinstance(m, torch.nn.Linear)]
            r["d"] = sum(p.numel() for m in linears for p in m.parameters())
            rows["kronfluence, dense"] = r
            _print_row("kronfluence, dense (its nn.Linear subset)", r)
            print()
            total = {k: v["fit"] + v["pairwise"] + v["self"] for k, v in rows.items()}
            for name in total:
                if name != "kronfluence, dense":
                    one_pass = rows[name]["fit"] + rows[name]["both"]
                    print(
                        f"{name}: {total[name] / total['kronfluence, dense']:.2f}x kronfluence's "
                        f"time ({one_pass / total['kronfluence, dense']:.2f}x with pairwise and "
                        f"self-influence from one pass), {rows[name]['rss_gb'] / r['rss_gb']:.2f}x "
                        "its peak RSS"
                    )
            if (work / "ours-dense.npz").exists():
                print(
                    "dense subset, ours against kronfluence: "
                    + _agreement(work / "ours-dense.npz", work / "kronfluence.npz")
                )


def _print_row(name: str, r: dict[str, float]) -> None:
    total = r["fit"] + r["pairwise"] + r["self"]
    both = f"{r['both']:.1f} | {r['fit'] + r['both']:.1f}" if "both" in r else "- | -"
    print(
        f"| {name} | {r['d']:,} | {r['fit']:.1f} | {r['pairwise']:.1f} | {r['self']:.1f} "
        f"| {total:.1f} | {both} | {r['rss_gb']:.2f} |",
        flush=True,
    )


if __name__ == "__main__":
    main()
