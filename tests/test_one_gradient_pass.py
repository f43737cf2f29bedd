"""`influence_and_self_influence` takes the training gradients once, not once per result.

Counted at the model's batch stream (every training pass, whether it takes
per-sample gradients or a solver's layer-wise statistics): the two results asked for
apart pass over the training data twice (TracIn: twice per checkpoint), together
once. The values themselves are checked against their definitions in the
conformance suite and in test_tracin.
"""

from __future__ import annotations

import numpy as np
from digits_problem import digits_model, problem

from influence_core import ExactIHVP, FirstOrderInfluenceCalculator, TracIn

MU = 1e-2


def counting_training_passes(model, train_X: np.ndarray) -> list[int]:
    """Patch ``model.batches`` to count the passes that start on ``train_X``."""
    passes = [0]
    stream = model.batches

    def counted(data, *args, **kwargs):
        if data[0] is train_X:
            passes[0] += 1
        return stream(data, *args, **kwargs)

    model.batches = counted
    return passes


def test_first_order_and_tracin_take_training_gradients_once_for_both() -> None:
    p = problem()
    model = digits_model("torch", batch_size=100)
    train, test = (p["X"][:300], p["y"][:300]), (p["X_test"][:5], p["y_test"][:5])
    first_order = FirstOrderInfluenceCalculator(model, ExactIHVP(damping=MU)).fit(train)
    state = model.kernels.save_state()
    tracin = TracIn(model, [state, state, state], 0.1).fit(train)
    passes = counting_training_passes(model, train[0])
    for calculator, per_call in ((first_order, 1), (tracin, 3)):
        passes[0] = 0
        apart = calculator.influence(test), calculator.self_influence()
        assert passes[0] == 2 * per_call
        passes[0] = 0
        together = calculator.influence_and_self_influence(test)
        assert passes[0] == per_call
        for a, b in zip(apart, together, strict=True):
            np.testing.assert_allclose(model.to_numpy(b), model.to_numpy(a), rtol=1e-12)
