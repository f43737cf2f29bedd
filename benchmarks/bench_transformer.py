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
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from influence_core import (
    EKFACIHVP,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
    TracIn,
    set_progress,
)
from influence_core.layerwise import coverage

VOCAB, WIDTH, T, BLOCKS, HEADS = 8000, 256, 64, 4, 4


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(WIDTH), torch.nn.LayerNorm(WIDTH)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.up, self.down = torch.nn.Linear(WIDTH, 4 * WIDTH), torch.nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        h = self.norm1(x)

        def heads(layer: torch.nn.Linear) -> torch.Tensor:
            return layer(h).reshape(b, T, HEADS, WIDTH // HEADS).transpose(1, 2)

        attended = torch.softmax(
            heads(self.q) @ heads(self.k).transpose(2, 3) / (WIDTH // HEADS) ** 0.5, dim=-1
        ) @ heads(self.v)
        x = x + self.o(attended.transpose(1, 2).reshape(b, T, WIDTH))
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))


class Transformer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(VOCAB, WIDTH)
        self.positions = torch.nn.Embedding(T, WIDTH)
        self.blocks = torch.nn.Sequential(*(Block() for _ in range(BLOCKS)))
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.head = torch.nn.Linear(WIDTH, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tokens(ids) + self.positions(torch.arange(T)[None])
        return self.head(self.norm(self.blocks(x)).mean(dim=1))


def one(subset: str, n_train: int) -> dict[str, float]:
    set_progress(False)
    torch.manual_seed(0)
    net = Transformer().eval()
    ids = torch.randint(0, VOCAB, (n_train + 50, T))
    y = torch.randint(0, 10, (n_train + 50,))
    train, test = (ids[50:], y[50:]), (ids[:50], y[:50])
    model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=32)
    if subset == "dense":
        dense = sorted({c.layer for c in coverage(model).values() if c.kind == "dense"})
        model = model.with_parameters(dense)
    start = time.perf_counter()
    calculator = FirstOrderInfluenceCalculator(
        model, EKFACIHVP(damping=1e-3, fisher="empirical")
    ).fit(train)
    fitted = time.perf_counter()
    calculator.influence(test)
    scored = time.perf_counter()
    calculator.self_influence()
    done = time.perf_counter()
    return {
        "d": model.num_parameters,
        "fit": fitted - start,
        "pairwise": scored - fitted,
        "self": done - scored,
        "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def tracin() -> None:
    set_progress(False)
    torch.manual_seed(0)
    net = Transformer().eval()
    ids, y = torch.randint(0, VOCAB, (522, T)), torch.randint(0, 10, (522,))
    model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=256)
    start = time.perf_counter()
    calculator = TracIn(model, [model.save_state()], 0.1).fit((ids[10:], y[10:]))
    calculator.influence((ids[:10], y[:10]))
    calculator.self_influence()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"TracIn, all {model.num_parameters:,} parameters, batch 256, n_train 512: "
        f"{time.perf_counter() - start:.1f} s (pairwise + self-influence), peak RSS {peak:.2f} GB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--subsets", nargs="+", default=["all", "dense"])
    parser.add_argument("--tracin", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tracin:
        tracin()
        return
    if args.one:
        print(json.dumps(one(args.one, args.n_train)))
        return
    print(f"transformer, torch float32, {torch.get_num_threads()} threads, n_train {args.n_train}")
    print()
    print(
        "| parameters | d | fit (s) | pairwise, 50 test (s) | self-influence (s) | peak RSS (GB) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for subset in args.subsets:
        result = subprocess.run(
            [sys.executable, __file__, "--one", subset, "--n-train", str(args.n_train)],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(result.stdout.strip().splitlines()[-1])
        print(
            f"| {subset} | {r['d']:,} | {r['fit']:.1f} | {r['pairwise']:.1f} | {r['self']:.1f} "
            f"| {r['rss_gb']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
