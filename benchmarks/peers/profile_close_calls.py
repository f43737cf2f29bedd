"""Profiles of the closest calls: where influence_core has missed a target on this machine.

    .venv/bin/python benchmarks/peers/profile_close_calls.py [REPEATS]   (project venv)

Writes ``benchmarks/results/peers/profiles.md``; ``report.py`` puts it in
``RESULTS.md`` under "Where we are slower, and why". Each table times the
stages of one workload, every candidate timed in turn within each round (so
machine noise hits them alike), median over the rounds after one warm-up:

1. ``exact_last`` in PyTorch, against pyDVL: the Hessian of the last layer
   (d = 330) built our way (column blocks of HVPs over batches) and the way
   pyDVL builds it (``torch.func.hessian`` of the mean loss in one call).
2. ``tracin_all`` in TensorFlow, against the limit: the two results asked
   for apart (each call loads every checkpoint and takes the training
   gradients again) and together, and what one checkpoint's stages cost.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common import CHECKPOINT_RATE, PROFILES, unflatten
from run_ours import checkpoint_states, models

from influence_core import TracIn


def rounds(candidates: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Milliseconds of each candidate per round; one warm-up each, then ``repeats`` rounds."""
    for fn in candidates.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: [1e3 * x for x in t] for name, t in times.items()}


def table(title: str, timings: dict[str, list[float]], calls: dict[str, str]) -> list[str]:
    lines = [
        title,
        "",
        "| stage | median | fastest – slowest | kernel calls |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {statistics.median(ms):.1f} ms | {min(ms):.1f} – {max(ms):.1f} ms "
        f"| {calls.get(name, '')} |"
        for name, ms in timings.items()
    ]
    return [*lines, ""]


def torch_hessian(repeats: int) -> list[str]:
    import torch
    import torch_model
    from torch.func import functional_call, hessian, jacrev

    s, _, _, model = models("exact_last", "torch")
    X, y = torch.tensor(s["X_train"]), torch.tensor(s["y_train"])
    n, d = len(y), model.num_parameters
    net = torch_model.build(unflatten(s["theta"]))
    names = torch_model.last_layer_names()
    base = {k: v.detach() for k, v in net.named_parameters()}
    shapes = [base[k].shape for k in names]
    theta = torch.cat([base[k].reshape(-1) for k in names])

    def mean_loss(flat: torch.Tensor) -> torch.Tensor:
        params, start = dict(base), 0
        for name, shape in zip(names, shapes, strict=True):
            size = shape.numel()
            params[name] = flat[start : start + size].reshape(shape)
            start += size
        return torch.nn.functional.cross_entropy(functional_call(net, params, (X,)), y)

    timings = rounds(
        {
            "ours, defaults (batches of 256, column blocks of 256)": lambda: model.hessian((X, y)),
            f"ours, one batch of {n}, one block of {d}": lambda: model.hessian(
                (X, y), batch_size=n, block_size=d
            ),
            "torch.func.hessian = jacfwd(jacrev), as pyDVL": lambda: hessian(mean_loss)(theta),
            "jacrev(jacrev)": lambda: jacrev(jacrev(mean_loss))(theta),
        },
        repeats,
    )
    batches, blocks = -(-n // 256), -(-d // 256)
    calls = {
        "ours, defaults (batches of 256, column blocks of 256)": f"{batches * blocks}",
        f"ours, one batch of {n}, one block of {d}": "1",
        "torch.func.hessian = jacfwd(jacrev), as pyDVL": "1",
        "jacrev(jacrev)": "1",
    }
    return table(
        f"**exact_last, PyTorch: the Hessian of the last layer (d = {d}, n = {n}).**",
        timings,
        calls,
    )


def tf_tracin(repeats: int) -> list[str]:
    import tensorflow as tf

    s, reference, full, model = models("tracin_all", "tensorflow")
    xp = model.xp
    train, test = (s["X_train"], s["y_train"]), (s["X_test"], s["y_test"])
    checkpoints = checkpoint_states(s, reference, full)
    tracin = TracIn(model, checkpoints, CHECKPOINT_RATE).fit(train)
    n = len(s["y_train"])
    train_grads = [g for _, g in model.iter_per_sample_grads(train)]
    test_grads = next(iter(model.iter_per_sample_grads(test, batch_size=len(s["y_test"]))))[1]

    def load_checkpoint() -> None:
        with model.checkpoint_loaded(checkpoints[0]):
            pass

    timings = rounds(
        {
            "TracIn.influence (5 checkpoints)": lambda: tracin.influence(test),
            "TracIn.self_influence (5 checkpoints)": lambda: tracin.self_influence(),
            "TracIn.influence_and_self_influence (5 checkpoints)": lambda: (
                tracin.influence_and_self_influence(test)
            ),
            "per checkpoint: load it": load_checkpoint,
            "per checkpoint: test gradients (100)": lambda: model.per_sample_grads(test),
            f"per checkpoint: training gradients ({n}) in batches of 256": lambda: [
                g for _, g in model.iter_per_sample_grads(train)
            ],
            f"per checkpoint: training gradients ({n}) in one batch": lambda: [
                g for _, g in model.iter_per_sample_grads(train, batch_size=n)
            ],
            "per checkpoint: test × train, xp.matmul(a, xp.matrix_transpose(b))": lambda: [
                xp.matmul(test_grads, xp.matrix_transpose(g)) for g in train_grads
            ],
            "per checkpoint: test × train, tf.linalg.matmul(a, b, transpose_b=True)": lambda: [
                tf.linalg.matmul(test_grads, g, transpose_b=True) for g in train_grads
            ],
            "per checkpoint: test × train, one matmul on the concatenated gradients": lambda: (
                xp.matmul(test_grads, xp.matrix_transpose(xp.concat(train_grads, axis=0)))
            ),
            "per checkpoint: squared norms": lambda: [xp.sum(g * g, axis=1) for g in train_grads],
        },
        repeats,
    )
    batches = -(-n // 256)
    calls = {
        f"per checkpoint: training gradients ({n}) in batches of 256": f"{batches}",
        f"per checkpoint: training gradients ({n}) in one batch": "1",
        "per checkpoint: test × train, xp.matmul(a, xp.matrix_transpose(b))": f"{batches}",
        "per checkpoint: test × train, tf.linalg.matmul(a, b, transpose_b=True)": f"{batches}",
        "per checkpoint: test × train, one matmul on the concatenated gradients": "1",
    }
    return table(
        f"**tracin_all, TensorFlow: TracInCP over every parameter (d = {model.num_parameters}), "
        "5 checkpoints.**",
        timings,
        calls,
    )


def main(repeats: int) -> None:
    lines = [*torch_hessian(repeats), *tf_tracin(repeats)]
    PROFILES.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
