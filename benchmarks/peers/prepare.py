"""Train the benchmark models once (influence_core's demo recipe) and save data, weights, checkpoints.

    .venv/bin/python benchmarks/peers/prepare.py

The MLP (the demo's) and the conv net, each with 5 checkpoints: 4 L-BFGS
iterates and the final weights, all in the canonical (Keras) layout.
"""

from __future__ import annotations

import os

import numpy as np
from common import RESULTS, SETUP
from run_ours import CONV_SPEC

from influence_conformance.specs import make_weights
from influence_core import InfluenceModel, get_registry
from influence_core.app.demo import SPEC, fit, load_digits_with_flips


def train(spec, X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """θ and 5 checkpoints, canonical layout."""
    reference = (
        get_registry()
        .by_name("torch")
        .load_reference_models()(spec, make_weights(spec, seed=0), "float64")
    )
    model = InfluenceModel(reference.model, reference.loss_fn, batch_size=400)
    iterates: dict[int, np.ndarray] = {}
    theta, _ = fit(model, (X, y), 300, lambda i, t: iterates.__setitem__(i, t.copy()))
    checkpoints = [reference.to_canonical(iterates[i]) for i in (15, 45, 90, 180)]
    checkpoints.append(reference.to_canonical(theta))
    return reference.to_canonical(theta), np.stack(checkpoints)


def main() -> None:
    data = load_digits_with_flips()
    X, y = data["X_train"], data["y_train"]
    theta, checkpoints = train(SPEC, X, y)
    theta_conv, checkpoints_conv = train(CONV_SPEC, X.reshape(-1, 8, 8, 1), y)
    RESULTS.mkdir(parents=True, exist_ok=True)
    partial = RESULTS / "setup.partial.npz"
    np.savez(
        partial,
        X_train=X,
        y_train=y,
        X_test=data["X_test"][:100],
        y_test=data["y_test"][:100],
        theta=theta,
        checkpoints=checkpoints,
        theta_conv=theta_conv,
        checkpoints_conv=checkpoints_conv,
    )
    os.replace(partial, SETUP)  # atomic: a run reading the old file is never disturbed
    print(f"saved {SETUP}: 1200 train, 100 test, MLP d = {theta.size}, conv d = {theta_conv.size}")


if __name__ == "__main__":
    main()
