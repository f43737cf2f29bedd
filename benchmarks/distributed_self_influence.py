"""Throughput of influence_core.distributed: EK-FAC self-influence of 50 000 training points.

Side by side in one run, on the same model, data and settings:

* one process, no Dask (torch at 1 thread, then at 2: the machine's cores);
* a LocalCluster of 1 worker and of 2 workers (1 thread each, torch at 1 thread),
  started with ``worker_environment_config()`` and, for comparison, with Dask's
  default worker environment (``MALLOC_TRIM_THRESHOLD_=65536``).

Each measures the fit (EK-FAC's two passes over the shards, plus the driver's
eigendecompositions) and the self-influence pass, and reports samples per
second, the speed-up of 2 workers over 1, the per-shard task times and the
bytes broadcast (the fitted state). The numbers must agree: the script checks
the distributed self-influences against the single-process ones (float64).

    .venv/bin/python benchmarks/distributed_self_influence.py [--n 50000] [--shard 5000]

Writes benchmarks/results/distributed_self_influence.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from influence_core import EKFACIHVP, FirstOrderInfluenceCalculator, InfluenceModel
from influence_core.distributed import (
    DistributedInfluence,
    ModelFactory,
    shard_arrays,
    worker_environment_config,
)

LOSS = functools.partial(torch.nn.CrossEntropyLoss, reduction="none")
BATCH = 500


def build() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    ).double()


def make(model: InfluenceModel) -> FirstOrderInfluenceCalculator:
    return FirstOrderInfluenceCalculator(model, EKFACIHVP(batch_size=BATCH))


def problem(n: int) -> tuple[InfluenceModel, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 64))
    y = rng.integers(0, 10, n)
    X = centres[y] + 1.5 * rng.normal(size=(n, 64))
    torch.manual_seed(0)
    net = build()
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    Xt, yt = torch.as_tensor(X[:5000]), torch.as_tensor(y[:5000])
    for _ in range(100):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(net(Xt), yt).backward()
        optimiser.step()
    return InfluenceModel(net, LOSS(), batch_size=BATCH), (X, y)


def single_process(model: InfluenceModel, train, threads: int) -> dict:
    torch.set_num_threads(threads)
    began = time.perf_counter()
    calculator = make(model).fit(train)
    fitted = time.perf_counter()
    values = calculator.self_influence().numpy()
    done = time.perf_counter()
    return {"fit_s": fitted - began, "self_influence_s": done - fitted, "values": values}


def on_cluster(model: InfluenceModel, train, workers: int, shard: int, trim: bool) -> dict:
    import dask
    from distributed import Client, LocalCluster

    config = {} if trim else worker_environment_config()
    with (
        dask.config.set(config),
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(torch.set_num_threads, 1)
        torch.set_num_threads(1)  # the driver's share: its eigendecompositions and test side
        factory = ModelFactory.from_model(model, build, LOSS)
        shards = shard_arrays(*train, shard)
        # Warm-up (not timed): every worker imports torch and the library. The model itself is
        # built in each worker's task thread during the timed fit.
        client.run(lambda: factory.cached() and None)
        began = time.perf_counter()
        run = DistributedInfluence(client, factory, make).fit(shards)
        fitted = time.perf_counter()
        records: list[logging.LogRecord] = []
        handler = _Collect(records)
        logging.getLogger("influence_core.distributed").addHandler(handler)
        values = run.self_influence()
        done = time.perf_counter()
        logging.getLogger("influence_core.distributed").removeHandler(handler)
        shard_seconds = [r.args[5] for r in records if r.args and r.args[0] == "self-influence"]
        state_bytes = sum(v.nbytes for v in run.calculator_.fitted_state().values())
    return {
        "fit_s": fitted - began,
        "self_influence_s": done - fitted,
        "values": values,
        "shard_seconds_median": statistics.median(shard_seconds),
        "shards": len(shards),
        "broadcast_bytes": state_bytes,
    }


class _Collect(logging.Handler):
    def __init__(self, records: list) -> None:
        super().__init__(logging.INFO)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--shard", type=int, default=5_000)
    args = parser.parse_args()
    logging.getLogger("influence_core.distributed").setLevel(logging.INFO)
    model, train = problem(args.n)
    n = args.n
    print(
        f"EK-FAC self-influence, n_train = {n}, d = {model.num_parameters}, float64, "
        f"shards of {args.shard}, batches of {BATCH}"
    )
    rows = {
        "1 process, 1 thread": single_process(model, train, 1),
        "1 process, 2 threads": single_process(model, train, 2),
        "LocalCluster, 1 worker": on_cluster(model, train, 1, args.shard, trim=False),
        "LocalCluster, 2 workers": on_cluster(model, train, 2, args.shard, trim=False),
        "LocalCluster, 1 worker, Dask's malloc trim": on_cluster(
            model, train, 1, args.shard, trim=True
        ),
        "LocalCluster, 2 workers, Dask's malloc trim": on_cluster(
            model, train, 2, args.shard, trim=True
        ),
    }
    reference = rows["1 process, 1 thread"]["values"]
    print(
        f"{'':44s} {'fit s':>7s} {'self s':>7s} {'fit /s':>9s} {'self /s':>9s} {'max rel diff':>13s}"
    )
    report = {"n": n, "d": model.num_parameters, "shard": args.shard, "rows": {}}
    for name, row in rows.items():
        diff = float(np.max(np.abs(row["values"] - reference)) / np.max(np.abs(reference)))
        print(
            f"{name:44s} {row['fit_s']:7.2f} {row['self_influence_s']:7.2f} "
            f"{n / row['fit_s']:9.0f} {n / row['self_influence_s']:9.0f} {diff:13.1e}"
        )
        report["rows"][name] = {k: v for k, v in row.items() if k != "values"} | {
            "max_relative_difference": diff
        }
    one, two = rows["LocalCluster, 1 worker"], rows["LocalCluster, 2 workers"]
    print(
        f"2 workers over 1: fit {one['fit_s'] / two['fit_s']:.2f}x, "
        f"self-influence {one['self_influence_s'] / two['self_influence_s']:.2f}x; "
        f"median shard task {two['shard_seconds_median']:.2f} s "
        f"(1 worker: {one['shard_seconds_median']:.2f} s); "
        f"broadcast fitted state {two['broadcast_bytes'] / 2**20:.2f} MiB"
    )
    out = Path(__file__).parent / "results" / "distributed_self_influence.json"
    out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
