"""Cost of the data-order check: passes over a DataLoader / tf.data with it and without it.

    .venv/bin/python benchmarks/bench_pass_order.py [--repeats 7]

Every pass over a dataset (not over ``(X, y)`` arrays) fingerprints each
batch (a hash of its targets and two sums of its inputs;
``influence_core.pass_order``). This times three things a user runs on a
non-array dataset, with the check and with it replaced by a pass-through:

* ``loss_grad`` over the data (the cheapest pass there is: one gradient per
  batch, so the check's share is largest here);
* an EK-FAC fit (two passes of layer statistics and eigendecompositions);
* per-sample gradients streamed over the data (what CG/TracIn scoring does).

Model: an MLP 784-128-10 (0.1M parameters), float32, n = 8192, batch 256, on
a torch ``DataLoader`` and a batched ``tf.data.Dataset`` (Keras). Medians of
interleaved repeats; the ratio with/without is the check's overhead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from influence_core import EKFACIHVP, InfluenceModel
from influence_core.pass_order import PassOrder

N, BATCH = 8192, 256


def passthrough(self, data, batch_size, batches, xp, to_numpy, max_samples):
    yield from batches


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in samples.items()}


def workloads(model: InfluenceModel, data: object) -> dict[str, Callable[[], object]]:
    def stream() -> None:
        for _ in model.iter_per_sample_grads(data):
            pass

    return {
        "loss_grad": lambda: model.loss_grad(data),
        "EK-FAC fit": lambda: EKFACIHVP(damping=0.01).fit(model, data),
        "per-sample gradients": stream,
    }


def torch_case() -> tuple[InfluenceModel, object]:
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    rng = np.random.default_rng(0)
    dataset = torch.utils.data.TensorDataset(
        torch.as_tensor(rng.normal(size=(N, 784)), dtype=torch.float32),
        torch.as_tensor(rng.integers(0, 10, N)),
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True)
    return InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none")), loader


def keras_case() -> tuple[InfluenceModel, object]:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    net = keras.Sequential(
        [keras.Input((784,)), keras.layers.Dense(128, "relu"), keras.layers.Dense(10)]
    )
    rng = np.random.default_rng(0)
    data = tf.data.Dataset.from_tensor_slices(
        (rng.normal(size=(N, 784)).astype("float32"), rng.integers(0, 10, N))
    ).batch(BATCH)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    return InfluenceModel(net, loss), data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    checked = PassOrder.watch
    print(
        "| framework | workload | with check (s) | without (s) | ratio |\n|---|---|---:|---:|---:|"
    )
    for framework, build in (("torch", torch_case), ("tensorflow", keras_case)):
        model, data = build()
        for name, fn in workloads(model, data).items():

            def without(fn=fn) -> object:
                PassOrder.watch = passthrough
                try:
                    return fn()
                finally:
                    PassOrder.watch = checked

            times = timed({"with": fn, "without": without}, args.repeats)
            print(
                f"| {framework} | {name} | {times['with']:.3f} | {times['without']:.3f} | "
                f"{times['with'] / times['without']:.3f} |"
            )


if __name__ == "__main__":
    main()
