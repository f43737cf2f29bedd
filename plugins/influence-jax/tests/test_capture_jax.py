"""Train-time capture in a JAX loop: an immutable model's new parameters are passed to the capture.

TracIn from the captured checkpoints equals TracIn from the same parameters
kept by hand in the same loop.
"""

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from influence_core import InfluenceModel, TracIn  # noqa: E402
from influence_core.capture import CheckpointCapture  # noqa: E402
from influence_jax import Functional  # noqa: E402


def test_a_jax_loop_captures_what_tracin_saved_by_hand_reads() -> None:
    X, y = load_digits(return_X_y=True)
    X, y = jnp.asarray(X[:120] / 16), jnp.asarray(y[:120])
    params = {"head": {"kernel": jnp.zeros((64, 10)), "bias": jnp.zeros(10)}}
    forward = lambda p, x: x @ p["head"]["kernel"] + p["head"]["bias"]  # noqa: E731
    loss = optax.softmax_cross_entropy_with_integer_labels
    model = InfluenceModel(Functional(forward, params), loss)
    capture = CheckpointCapture(model, every=2)
    gradient = jax.grad(lambda p, xb, yb: loss(forward(p, xb), yb).mean())
    by_hand = []
    for step in range(6):
        rows = slice(20 * step, 20 * step + 20)
        params = jax.tree.map(lambda p, g: p - 0.5 * g, params, gradient(params, X[rows], y[rows]))
        capture.after_step(0.5, state=params)
        if (step + 1) % 2 == 0:
            by_hand.append(params)
    assert capture.at_steps == [2, 4, 6]
    train, test = (X[:60], y[:60]), (X[100:104], y[100:104])
    captured = np.asarray(capture.tracin().fit(train).influence(test))
    expected = np.asarray(TracIn(model, by_hand, 0.5).fit(train).influence(test))
    np.testing.assert_array_equal(captured, expected)
    assert np.abs(expected).max() > 0
