"""Protocol overhead: per-sample gradients and HVPs through influence_core vs bare kernels.

    .venv/bin/python benchmarks/bench_kernels.py [--repeats 30]

For each framework and model (an MLP 64-128-10 and a small conv net, batch 256,
float32, all parameters), times

* per-sample gradients ``(b, d)``: ``InfluenceModel.per_sample_grads`` against a
  hand-written ``vmap(grad(functional_call))`` + flatten (PyTorch) and a
  ``tf.function`` of ``vectorized_map`` (TensorFlow);
* HVPs of the batch-mean loss, for one vector and for a block of 16:
  ``InfluenceModel.hvp`` against bare double-backward (PyTorch ``vjp`` of
  ``grad``) and a bare ``tf.function`` of two tapes (TensorFlow).

Reports medians of interleaved repeats and the ratio protocol / bare (the
target is ≤ 1.2), with the default finiteness check and without it
(``check_finite=False``), so the check's own cost shows. Writes
``benchmarks/results/kernels.md`` too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from influence_core import InfluenceModel

BATCH = 256
BLOCK = 16


def median_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for fn in fns.values():  # warm up: traces, allocator
        for _ in range(3):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():  # interleaved, so drift hits both alike
            t = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in samples.items()}


def timing_rows(
    backend: str,
    name: str,
    data: tuple[object, object],
    V: object,
    models: tuple[InfluenceModel, InfluenceModel],
    bare_psg: Callable[[], object],
    bare_hvp: Callable[[object], object],
    repeats: int,
    sync: Callable[[object], object] = lambda result: result,
) -> list[tuple[str, str, float, float, float]]:
    """Per-sample grads, one HVP and a block of HVPs: bare, ours, ours without the NaN check.

    ``sync`` waits for a result (JAX dispatches asynchronously: without it a
    call would be timed before its work is done).
    """
    ours, fast = models
    v1 = V[:, :1]
    workloads = {
        f"{name} (d={ours.num_parameters}) per-sample grads": (
            bare_psg,
            lambda m: m.per_sample_grads(data),
        ),
        f"{name} HVP, 1 vector": (lambda: bare_hvp(v1), lambda m: m.hvp(data, v1)),
        f"{name} HVP, block of {BLOCK}": (lambda: bare_hvp(V), lambda m: m.hvp(data, V)),
    }
    rows = []
    for workload, (bare, call) in workloads.items():
        t = median_times(
            {
                "bare": bare,
                "ours": lambda c=call: sync(c(ours)),
                "fast": lambda c=call: sync(c(fast)),
            },
            repeats,
        )
        rows.append((backend, workload, t["bare"], t["ours"], t["fast"]))
    return rows


# -- PyTorch --------------------------------------------------------------------------
def torch_cases(repeats: int) -> list[tuple[str, str, float, float, float]]:
    import torch

    torch.manual_seed(0)
    models = {
        "mlp 64-128-10": (
            torch.nn.Sequential(
                torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10)
            ),
            torch.randn(BATCH, 64),
        ),
        "convnet 8x8": (
            torch.nn.Sequential(
                torch.nn.Conv2d(1, 8, 3),
                torch.nn.ReLU(),
                torch.nn.Conv2d(8, 8, 3),
                torch.nn.ReLU(),
                torch.nn.Flatten(),
                torch.nn.Linear(8 * 4 * 4, 10),
            ),
            torch.randn(BATCH, 1, 8, 8),
        ),
    }
    rows = []
    for name, (model, X) in models.items():
        rows += torch_model_rows(name, model.eval(), X, repeats)
    return rows


def torch_model_rows(
    name: str, model, X, repeats: int
) -> list[tuple[str, str, float, float, float]]:
    import torch
    from torch.func import functional_call, grad, vjp, vmap

    Y = torch.randint(0, 10, (BATCH,))
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    im = InfluenceModel(model, loss)
    fast = InfluenceModel(model, loss, check_finite=False)
    d = im.num_parameters
    V = torch.randn(d, BLOCK)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def sample_loss(p, x, y):
        return loss(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0)).sum()

    bare_psg_fn = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def bare_psg():
        g = bare_psg_fn(params, X, Y)
        return torch.cat([t.reshape(BATCH, -1) for t in g.values()], dim=1)

    def mean_loss(p):
        return loss(functional_call(model, p, (X,)), Y).mean()

    shapes = [(k, v.shape, v.numel()) for k, v in params.items()]

    def to_dict(flat):
        out, i = {}, 0
        for k, s, n in shapes:
            out[k] = flat[i : i + n].view(s)
            i += n
        return out

    def bare_hvp(vectors):
        _, vjp_fn = vjp(grad(mean_loss), params)
        if vectors.shape[1] == 1:
            hv = vjp_fn(to_dict(vectors[:, 0]))[0]
            return torch.cat([t.reshape(-1) for t in hv.values()])
        hv = vmap(lambda v: vjp_fn(to_dict(v))[0], in_dims=1)(vectors)
        return torch.cat([t.reshape(BLOCK, -1) for t in hv.values()], dim=1).T

    assert torch.allclose(bare_psg(), im.per_sample_grads((X, Y)), atol=1e-5)
    assert torch.allclose(bare_hvp(V), im.hvp((X, Y), V), atol=1e-4)
    return timing_rows("torch", name, (X, Y), V, (im, fast), bare_psg, bare_hvp, repeats)


# -- TensorFlow -----------------------------------------------------------------------
def tensorflow_cases(repeats: int) -> list[tuple[str, str, float, float, float]]:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    models = {
        "mlp 64-128-10": (
            keras.Sequential(
                [
                    keras.Input((64,)),
                    keras.layers.Dense(128, activation="tanh"),
                    keras.layers.Dense(10),
                ]
            ),
            tf.random.normal((BATCH, 64)),
        ),
        "convnet 8x8": (
            keras.Sequential(
                [
                    keras.Input((8, 8, 1)),
                    keras.layers.Conv2D(8, 3, activation="relu"),
                    keras.layers.Conv2D(8, 3, activation="relu"),
                    keras.layers.Flatten(),
                    keras.layers.Dense(10),
                ]
            ),
            tf.random.normal((BATCH, 8, 8, 1)),
        ),
    }
    rows = []
    for name, (model, X) in models.items():
        rows += tensorflow_model_rows(name, model, X, repeats)
    return rows


def tensorflow_model_rows(
    name: str, model, X, repeats: int
) -> list[tuple[str, str, float, float, float]]:
    import keras
    import tensorflow as tf

    Y = tf.random.uniform((BATCH,), maxval=10, dtype=tf.int64)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    im = InfluenceModel(model, loss)
    fast = InfluenceModel(model, loss, check_finite=False)
    d = im.num_parameters
    V = tf.random.normal((d, BLOCK))
    variables = [v.value for v in model.trainable_variables]

    def flat(gs):
        return tf.concat([tf.reshape(g, [-1]) for g in gs], 0)

    @tf.function
    def bare_psg_fn(X, Y):
        def one(xy):
            x, y = xy
            with tf.GradientTape() as tape:
                value = tf.reduce_sum(loss(y[None], model(x[None], training=False)))
            return flat(tape.gradient(value, variables))

        return tf.vectorized_map(one, (X, Y))

    @tf.function
    def bare_hvp_fn(X, Y, V):
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                value = tf.reduce_mean(loss(Y, model(X, training=False)))
            g = flat(inner.gradient(value, variables))
            proj = tf.linalg.matvec(V, g, transpose_a=True)
        jac = outer.jacobian(proj, variables)
        return tf.transpose(tf.concat([tf.reshape(j, [tf.shape(V)[1], -1]) for j in jac], 1))

    np.testing.assert_allclose(
        bare_psg_fn(X, Y).numpy(), im.per_sample_grads((X, Y)).numpy(), atol=1e-5
    )
    np.testing.assert_allclose(bare_hvp_fn(X, Y, V).numpy(), im.hvp((X, Y), V).numpy(), atol=1e-4)
    return timing_rows(
        "tensorflow",
        name,
        (X, Y),
        V,
        (im, fast),
        lambda: bare_psg_fn(X, Y),
        lambda vectors: bare_hvp_fn(X, Y, vectors),
        repeats,
    )


# -- JAX (the plugin) ---------------------------------------------------------------
def jax_cases(repeats: int) -> list[tuple[str, str, float, float, float]]:
    """The MLP as a flax.nnx module, float32 and float64, against bare ``jit(vmap(grad))``."""
    try:
        import jax
        import jax.flatten_util
    except ImportError:  # the plugin is optional
        return []
    jax.config.update("jax_enable_x64", True)  # only JAX's setting; float32 stays float32
    import jax.numpy as jnp
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, dtype):
            self.layer0 = nnx.Linear(64, 128, param_dtype=dtype, dtype=dtype, rngs=nnx.Rngs(0))
            self.layer1 = nnx.Linear(128, 10, param_dtype=dtype, dtype=dtype, rngs=nnx.Rngs(1))

        def __call__(self, x):
            return self.layer1(jnp.tanh(self.layer0(x)))

    def loss(outputs, targets):
        return -jnp.take_along_axis(jax.nn.log_softmax(outputs), targets[:, None], axis=1)[:, 0]

    def rows_for(dtype: str) -> list[tuple[str, str, float, float, float]]:
        model = MLP(dtype)
        X = jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, 64)), dtype)
        Y = jnp.asarray(np.random.default_rng(1).integers(0, 10, BATCH))
        im = InfluenceModel(model, loss)
        fast = InfluenceModel(model, loss, check_finite=False)
        graphdef, params = nnx.split(model, nnx.Param)

        def sample_loss(p, x, y):
            return loss(nnx.merge(graphdef, p)(x[None]), y[None]).sum()

        @jax.jit
        def bare_psg_fn(p, x, y):
            grads = jax.vmap(jax.grad(sample_loss), in_axes=(None, 0, 0))(p, x, y)
            leaves = jax.tree_util.tree_leaves(grads)
            return jnp.concatenate([g.reshape(BATCH, -1) for g in leaves], axis=1)

        flat0, unravel = jax.flatten_util.ravel_pytree(params)

        @jax.jit
        def bare_hvp_fn(flat, x, y, V):
            def gradient(f):
                mean = lambda q: loss(nnx.merge(graphdef, unravel(q))(x), y).mean()  # noqa: E731
                return jax.grad(mean)(f)

            return jax.vmap(lambda v: jax.jvp(gradient, (flat,), (v,))[1], 1, 1)(V)

        V = jnp.asarray(np.random.default_rng(2).normal(size=(im.num_parameters, BLOCK)), dtype)
        return timing_rows(
            "jax",
            f"mlp 64-128-10 {dtype}",
            (X, Y),
            V,
            (im, fast),
            lambda: bare_psg_fn(params, X, Y).block_until_ready(),
            lambda vectors: bare_hvp_fn(flat0, X, Y, vectors).block_until_ready(),
            repeats,
            sync=lambda result: result.block_until_ready(),
        )

    rows = []
    for dtype in ("float32", "float64"):
        rows += rows_for(dtype)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rows = torch_cases(args.repeats) + tensorflow_cases(args.repeats) + jax_cases(args.repeats)
    lines = [
        f"Batch {BATCH}, float32 (JAX: both), all parameters, CPU ({os.cpu_count()} cores); "
        f"median of {args.repeats} interleaved repeats.",
        "",
        "| backend | workload | bare kernel (ms) | influence_core (ms) | ratio "
        "| check_finite=False (ms) | ratio |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for backend, workload, bare, ours, fast in rows:
        lines.append(
            f"| {backend} | {workload} | {bare * 1e3:.2f} | {ours * 1e3:.2f} | {ours / bare:.2f} "
            f"| {fast * 1e3:.2f} | {fast / bare:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    out = Path(__file__).with_name("results")
    out.mkdir(exist_ok=True)
    (out / "kernels.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
