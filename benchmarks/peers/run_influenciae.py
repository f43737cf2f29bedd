"""Influenciae 0.3.0 on one workload (its own venv, Keras 2): ``run_influenciae.py WORKLOAD [REPEATS]``.

Influenciae needs a Keras 2 model: it runs here on TF 2.21 with ``tf_keras``
and ``TF_USE_LEGACY_KERAS=1``. Differences in what it can compute, stated in
each record's note:

- ``ExactIHVP`` has no damping: it takes the pseudo-inverse of H. The timing is
  of that path; for the agreement column its inverse is replaced, after the
  timing, by (pinv(pinv H) + λI)⁻¹, the damped inverse of the same H.
- its CG and Arnoldi have no damping either; its LiSSA casts to float32, so the
  LiSSA workload runs in float32 (damping d = λ/s in its recursion).
"""

from __future__ import annotations

import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf
import tf_keras
from common import (
    ARNOLDI_ITERATIONS,
    ARNOLDI_RANK,
    CG_ITERATIONS,
    CHECKPOINT_RATE,
    DAMPING,
    LISSA_DEPTH,
    LISSA_SCALE,
    TOP_K,
    WORKLOADS,
    load_setup,
    timed,
    unflatten,
    write,
)
from deel.influenciae.common import (
    ConjugateGradientDescentIHVP,
    ExactIHVP,
    InfluenceModel,
    LissaIHVP,
)
from deel.influenciae.influence import (
    ArnoldiInfluenceCalculator,
    FirstOrderInfluenceCalculator,
)
from deel.influenciae.trac_in import TracIn
from deel.influenciae.utils import ORDER

BATCH = 256
#: Influenciae's exact Hessian takes the jacobian of a batch jacobian: memory grows as
#: d · b³ · classes (batches of 256 ask for 1.7 TB here), so its Hessian data come in 16s.
HESSIAN_BATCH = 16


def keras2_model(weights: list[np.ndarray], dtype: str) -> tf_keras.Model:
    tf_keras.backend.set_floatx(dtype)
    if weights[0].ndim == 4:  # the conv net on 8×8×1 images
        layers = [
            tf_keras.Input((8, 8, 1)),
            tf_keras.layers.Conv2D(8, 3, activation="relu"),
            tf_keras.layers.Flatten(),
            tf_keras.layers.Dense(10),
        ]
    else:
        layers = [
            tf_keras.Input((64,)),
            tf_keras.layers.Dense(32, activation="tanh"),
            tf_keras.layers.Dense(10),
        ]
    model = tf_keras.Sequential(layers)
    model.set_weights([w.astype(dtype) for w in weights])
    return model


def main(workload: str, repeats: int) -> None:
    s = load_setup(workload)
    kind, which = workload.split("_")[0], WORKLOADS[workload][1]
    dtype = "float32" if kind == "lissa" else "float64"
    loss = tf_keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=tf_keras.losses.Reduction.NONE
    )
    # Influenciae watches layers start_layer..last_layer; last_layer=None means start_layer only.
    start_layer, last_layer = (-1, None) if which == "last" else (0, -1)

    def wrap(weights):
        return InfluenceModel(
            keras2_model(weights, dtype),
            start_layer=start_layer,
            last_layer=last_layer,
            loss_function=loss,
        )

    def dataset(X, y, batch=BATCH):
        return tf.data.Dataset.from_tensor_slices((X.astype(dtype), y.astype("int64"))).batch(batch)

    train = dataset(s["X_train"], s["y_train"])
    # Its top_k sizes its buffers by the declared batch size and fails on a shorter last
    # batch (ConcatOp: [256,10] vs [100,256]), so the 100 test points come as one batch.
    test = dataset(s["X_test"], s["y_test"], len(s["X_test"]))
    hessian_data = dataset(s["X_train"], s["y_train"], HESSIAN_BATCH)
    model = wrap(unflatten(s["theta"]))
    note = ""

    def matrix(
        calc,
    ) -> np.ndarray:  # the (n_test, n_train) scores from Influenciae's nested datasets
        rows = []
        for _, per_train in calc.estimate_influence_values_in_batches(test, train):
            rows.append(np.concatenate([v.numpy() for _, v in per_train], axis=1))
        return np.concatenate(rows, axis=0)

    def self_influence(calc) -> np.ndarray:
        return np.concatenate(
            [v.numpy().reshape(-1) for _, v in calc.compute_influence_values(train)]
        )

    def exact():
        calc = FirstOrderInfluenceCalculator(model, train, ExactIHVP(model, hessian_data))
        if kind == "topk":
            found = [
                v.numpy()
                for _, v, _ in calc.top_k(
                    test, train, k=TOP_K, order=ORDER.DESCENDING, d_type=tf.float64
                )
            ]
            return {"topk": np.concatenate(found)}
        return {"scores": matrix(calc), "self": self_influence(calc)}

    def iterative():
        if kind == "cg":
            ihvp = ConjugateGradientDescentIHVP(model, -1, train, n_opt_iters=CG_ITERATIONS)
        else:
            ihvp = LissaIHVP(
                model,
                -1,
                train,
                n_opt_iters=LISSA_DEPTH,
                damping=DAMPING / LISSA_SCALE,
                scale=LISSA_SCALE,
            )
        return {"scores": matrix(FirstOrderInfluenceCalculator(model, train, ihvp))}

    def arnoldi():
        calc = ArnoldiInfluenceCalculator(
            model,
            train,
            subspace_dim=ARNOLDI_ITERATIONS,
            force_hermitian=True,
            k_largest_eig_vals=ARNOLDI_RANK,
            dtype=tf.float64,
        )
        return {"scores": matrix(calc), "self": self_influence(calc)}

    def tracin():
        models = [wrap(unflatten(theta)) for theta in s["checkpoints"]]
        calc = TracIn(models, CHECKPOINT_RATE)
        return {"scores": matrix(calc), "self": self_influence(calc)}

    run = {"exact": exact, "topk": exact, "cg": iterative, "lissa": iterative}.get(kind)
    run = run or {"arnoldi": arnoldi, "tracin": tracin}[kind]
    times, scores = timed(run, repeats)
    if kind in ("exact", "topk"):
        # Agreement at the damped inverse of the same H (outside the timing, see the docstring).
        ihvp = ExactIHVP(model, hessian_data)
        hessian = tf.linalg.pinv(ihvp.inv_hessian)
        ihvp.inv_hessian = tf.linalg.inv(
            hessian + DAMPING * tf.eye(hessian.shape[0], dtype=hessian.dtype)
        )
        calc = FirstOrderInfluenceCalculator(model, train, ihvp)
        if kind == "topk":
            found = list(
                calc.top_k(test, train, k=TOP_K, order=ORDER.DESCENDING, d_type=tf.float64)
            )
            scores = {"topk": np.concatenate([v.numpy() for _, v, _ in found])}
        else:
            scores = {"scores": matrix(calc), "self": self_influence(calc)}
        note = "timed without damping (pinv); scores at the damped inverse"
    elif kind in ("cg", "arnoldi"):
        note = "no damping option"
    elif kind == "lissa":
        note = "float32 (its LiSSA casts to float32)"
    write("Influenciae 0.3.0", "tensorflow", workload, times, scores, note)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
