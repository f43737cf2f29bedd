"""What train-time capture (influence_core.capture) adds to the user's own training loop.

    .venv/bin/python benchmarks/capture_overhead.py [--repeats 3] [--epochs 10]

Digits (n = 1000, float32), batches of 32, SGD with momentum; torch: the
64-32-10 tanh MLP and the conv net of ``defaults_panel.py`` in a plain
PyTorch loop; Keras 3: the same MLP in ``model.fit``. Each loop runs without
capture, with a checkpoint kept every epoch, and every 10 steps; the wall
time is the median of ``--repeats`` runs, and the overhead is its ratio to
the loop without capture, minus 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

BATCH = 32


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return (X[:1000] / 16.0).astype(np.float32), y[:1000]


def torch_loop(kind: str, epochs: int, every: int | None) -> float:
    import torch

    from influence_core import InfluenceModel
    from influence_core.capture import CheckpointCapture

    X, y = (torch.from_numpy(a) for a in digits())
    torch.manual_seed(0)
    if kind == "mlp":
        net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    else:
        net = torch.nn.Sequential(
            torch.nn.Unflatten(1, (1, 8, 8)),
            torch.nn.Conv2d(1, 8, 3),
            torch.nn.Tanh(),
            torch.nn.Flatten(),
            torch.nn.Linear(8 * 6 * 6, 10),
        )
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    capture = CheckpointCapture(InfluenceModel(net, loss_fn), every=every) if every else None
    began = time.perf_counter()
    for _ in range(epochs):
        for start in range(0, len(y), BATCH):
            optimizer.zero_grad()
            loss_fn(net(X[start : start + BATCH]), y[start : start + BATCH]).mean().backward()
            optimizer.step()
            if capture is not None:
                capture.after_step(0.05)
    return time.perf_counter() - began


def keras_fit(epochs: int, every: int | None) -> float:
    import keras

    from influence_core import InfluenceModel
    from influence_core.capture import CheckpointCapture
    from influence_tensorflow.capture import TracInCallback

    X, y = digits()
    keras.utils.set_random_seed(0)
    net = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(32, activation="tanh"), keras.layers.Dense(10)]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    net.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=loss)
    callbacks = []
    if every:
        per_sample = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        callbacks = [TracInCallback(CheckpointCapture(InfluenceModel(net, per_sample), every))]
    net.fit(X, y, batch_size=BATCH, epochs=1, verbose=0)  # traced once, outside the timing
    began = time.perf_counter()
    net.fit(X, y, batch_size=BATCH, epochs=epochs, verbose=0, callbacks=callbacks)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    steps_per_epoch = -(-1000 // BATCH)
    loops = {
        "torch MLP": lambda every: torch_loop("mlp", args.epochs, every),
        "torch conv net": lambda every: torch_loop("conv", args.epochs, every),
        "Keras MLP (fit)": lambda every: keras_fit(args.epochs, every),
    }
    print("| loop | no capture (s) | every epoch | every 10 steps |")
    print("|---|---:|---:|---:|")
    for name, loop in loops.items():
        loop(None)  # warm-up
        seconds = {
            every: statistics.median(loop(every) for _ in range(args.repeats))
            for every in (None, steps_per_epoch, 10)
        }
        base = seconds[None]
        cells = [
            f"{seconds[e]:.2f} s ({seconds[e] / base - 1:+.0%})" for e in (steps_per_epoch, 10)
        ]
        print(f"| {name} | {base:.2f} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main()
