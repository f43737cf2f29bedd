"""The limit row in TensorFlow: no library, just TF (project venv): ``run_limit_tf.py WORKLOAD [REPEATS]``.

The model is written out as a function of the flat parameters (the same MLP
64-32-10 tanh, canonical weights), so nothing stands between the math and the
kernels: per-sample gradients by ``tf.vectorized_map`` over a ``GradientTape``,
HVPs by double backward vectorised over the right-hand sides, the Hessian by
``tape.jacobian``, all inside ``tf.function``; dense linear algebra with ``tf.linalg``.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf
from common import (
    ARNOLDI_ITERATIONS,
    ARNOLDI_RANK,
    CG_ITERATIONS,
    CHECKPOINT_RATE,
    CONV_SHAPES,
    DAMPING,
    LISSA_DEPTH,
    LISSA_SCALE,
    SHAPES,
    TOP_K,
    WORKLOADS,
    load_setup,
    timed,
    write,
)

BATCH = 256
LAST = 64 * 32 + 32  # the last layer starts here in the flat canonical θ


def logits(theta: tf.Tensor, x: tf.Tensor) -> tf.Tensor:
    """The MLP on (b, 64), or the conv net on NHWC (b, 8, 8, 1), of the flat canonical θ."""
    shapes = SHAPES if len(x.shape) == 2 else CONV_SHAPES
    k1, b1, k2, b2 = (
        tf.reshape(t, shape)
        for t, shape in zip(tf.split(theta, [int(np.prod(s)) for s in shapes]), shapes, strict=True)
    )
    if len(x.shape) == 2:
        return tf.tanh(x @ k1 + b1) @ k2 + b2
    hidden = tf.nn.relu(tf.nn.conv2d(x, k1, strides=1, padding="VALID") + b1)
    return tf.reshape(hidden, (-1, 288)) @ k2 + b2


def main(workload: str, repeats: int) -> None:
    s = load_setup(workload)
    kind, which = workload.split("_")[0], WORKLOADS[workload][1]
    start = LAST if which == "last" else 0
    X_train, y_train = tf.constant(s["X_train"]), tf.constant(s["y_train"])
    X_test, y_test = tf.constant(s["X_test"]), tf.constant(s["y_test"])
    full = tf.constant(s["theta"])

    def losses(selected, frozen, x, y):  # per-sample losses at θ = [frozen, selected]
        out = logits(tf.concat([frozen, selected], 0), x)
        return tf.nn.sparse_softmax_cross_entropy_with_logits(y, out)

    @tf.function(reduce_retracing=True)
    def batch_grads(selected, frozen, x, y):
        def one(sample):
            with tf.GradientTape() as tape:
                tape.watch(selected)
                loss = losses(selected, frozen, sample[0][None], sample[1][None])[0]
            return tape.gradient(loss, selected)

        return tf.vectorized_map(one, (x, y))

    def grads(theta, X, y):
        selected, frozen = theta[start:], theta[:start]
        n = int(y.shape[0])
        return tf.concat(
            [
                batch_grads(selected, frozen, X[i : i + BATCH], y[i : i + BATCH])
                for i in range(0, n, BATCH)
            ],
            0,
        )

    selected, frozen = full[start:], full[:start]

    @tf.function
    def hvps(V):  # (H + λI) V over all training data, V (d, m)
        def one(v):
            with tf.GradientTape() as outer:
                outer.watch(selected)
                with tf.GradientTape() as inner:
                    inner.watch(selected)
                    loss = tf.reduce_mean(losses(selected, frozen, X_train, y_train))
                g = inner.gradient(loss, selected)
                gv = tf.reduce_sum(g * v)
            return outer.gradient(gv, selected)

        return tf.transpose(tf.vectorized_map(one, tf.transpose(V))) + DAMPING * V

    @tf.function
    def hessian():
        with tf.GradientTape() as outer:
            outer.watch(selected)
            with tf.GradientTape() as inner:
                inner.watch(selected)
                loss = tf.reduce_mean(losses(selected, frozen, X_train, y_train))
            g = inner.gradient(loss, selected)
        return outer.jacobian(g, selected)

    def exact_inverse():
        H = hessian()
        return tf.linalg.cholesky_solve(
            tf.linalg.cholesky(H + DAMPING * tf.eye(H.shape[0], dtype=H.dtype)),
            tf.eye(H.shape[0], dtype=H.dtype),
        )

    def run_grads():
        return {"grads": grads(full, X_train, y_train).numpy()}

    def run_exact():
        inverse = exact_inverse()
        G = grads(full, X_train, y_train)
        S = grads(full, X_test, y_test) @ inverse
        return {
            "scores": (S @ tf.transpose(G)).numpy(),
            "self": tf.reduce_sum((G @ inverse) * G, 1).numpy(),
        }

    def run_topk():
        inverse = exact_inverse()
        S = grads(full, X_test, y_test) @ inverse
        top = tf.math.top_k(S @ tf.transpose(grads(full, X_train, y_train)), TOP_K)
        return {"indices": top.indices.numpy(), "topk": top.values.numpy()}

    def run_cg():
        B = tf.transpose(grads(full, X_test, y_test))
        x, r, p = tf.zeros_like(B), B, B
        rr = tf.reduce_sum(r * r, 0)
        for _ in range(CG_ITERATIONS):
            Ap = hvps(p)
            alpha = rr / tf.reduce_sum(p * Ap, 0)
            x, r = x + alpha * p, r - alpha * Ap
            rr_new = tf.reduce_sum(r * r, 0)
            p, rr = r + (rr_new / rr) * p, rr_new
        return {"scores": tf.transpose(grads(full, X_train, y_train) @ x).numpy()}

    def run_lissa():
        V = tf.transpose(grads(full, X_test, y_test))
        x = V
        for _ in range(LISSA_DEPTH):
            x = V + x - hvps(x) / LISSA_SCALE
        return {"scores": tf.transpose(grads(full, X_train, y_train) @ (x / LISSA_SCALE)).numpy()}

    def run_arnoldi():
        d = int(selected.shape[0])
        q = tf.ones((d, 1), dtype=tf.float64)
        basis, rows = [q / tf.norm(q)], []
        for k in range(ARNOLDI_ITERATIONS):
            Q = tf.concat(basis, 1)
            w = hvps(basis[-1]) - DAMPING * basis[-1]
            h = tf.transpose(Q) @ w
            w = w - Q @ h
            norm = tf.norm(w)
            rows.append(
                tf.concat([h[:, 0], [norm], tf.zeros(ARNOLDI_ITERATIONS - k - 1, tf.float64)], 0)
            )
            basis.append(w / norm)
        small = tf.transpose(tf.stack(rows))[:ARNOLDI_ITERATIONS]
        mu, V = tf.linalg.eigh((small + tf.transpose(small)) / 2)
        mu, V = mu[-ARNOLDI_RANK:], V[:, -ARNOLDI_RANK:]
        P = tf.concat(basis[:ARNOLDI_ITERATIONS], 1) @ V / tf.sqrt(mu + DAMPING)
        train_p = grads(full, X_train, y_train) @ P
        test_p = grads(full, X_test, y_test) @ P
        return {
            "scores": (test_p @ tf.transpose(train_p)).numpy(),
            "self": tf.reduce_sum(train_p**2, 1).numpy(),
        }

    checkpoints = [tf.constant(theta) for theta in s["checkpoints"]]

    def run_tracin():
        scores, self_ = 0.0, 0.0
        for theta in checkpoints:
            G = grads(theta, X_train, y_train)
            scores += CHECKPOINT_RATE * (grads(theta, X_test, y_test) @ tf.transpose(G))
            self_ += CHECKPOINT_RATE * tf.reduce_sum(G * G, 1)
        return {"scores": scores.numpy(), "self": self_.numpy()}

    run = {
        "grads": run_grads,
        "exact": run_exact,
        "cg": run_cg,
        "lissa": run_lissa,
        "arnoldi": run_arnoldi,
        "tracin": run_tracin,
        "topk": run_topk,
    }[kind]
    times, scores = timed(run, repeats)
    write("limit", "tensorflow", workload, times, scores)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
