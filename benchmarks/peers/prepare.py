"""Train the benchmark MLP once (influence_core's demo recipe) and save weights, checkpoints, data.

.venv/bin/python benchmarks/peers/prepare.py
"""

from __future__ import annotations

import numpy as np
from common import RESULTS, SETUP

from influence_core.demo import SPEC, build, fit, load_digits_with_flips
from influence_core.specs import make_weights


def main() -> None:
    data = load_digits_with_flips()
    train = (data["X_train"], data["y_train"])
    reference, model = build("torch", make_weights(SPEC, seed=0))
    iterates: dict[int, np.ndarray] = {}
    theta, _ = fit(model, train, 300, lambda i, t: iterates.__setitem__(i, t.copy()))
    checkpoints = [reference.to_canonical(iterates[i]) for i in (15, 45, 90, 180)]
    checkpoints.append(reference.to_canonical(theta))
    RESULTS.mkdir(parents=True, exist_ok=True)
    np.savez(
        SETUP,
        X_train=data["X_train"],
        y_train=data["y_train"],
        X_test=data["X_test"][:100],
        y_test=data["y_test"][:100],
        theta=reference.to_canonical(theta),
        checkpoints=np.stack(checkpoints),
    )
    print(f"saved {SETUP}: 1200 train, 100 test, d = {theta.size}, 5 checkpoints")


if __name__ == "__main__":
    main()
