"""Train-time capture (influence_core.capture): TracIn from captured checkpoints equals TracIn
from the same checkpoints saved by hand, in a PyTorch loop and in a Keras ``fit``.

Each run saves by hand beside the capture, at the same steps, so the two lists
of checkpoints come from one training run and the scores must be identical.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from influence_core import InfluenceModel, TracIn
from influence_core.capture import CheckpointCapture


def digits(n: int = 120) -> tuple[np.ndarray, np.ndarray]:
    X, y = load_digits(return_X_y=True)
    return (X[:n] / 16.0).astype(np.float32), y[:n]


def test_a_torch_loop_captures_what_tracin_saved_by_hand_reads() -> None:
    import torch

    X, y = digits()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10))
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    model = InfluenceModel(net, loss_fn, batch_size=40)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=6, gamma=0.5)
    capture = CheckpointCapture(model, every=4)
    by_hand, rates = [], []
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    for step in range(12):
        rows = slice(10 * (step % 12), 10 * (step % 12) + 10)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad()
        loss_fn(net(Xt[rows]), yt[rows]).mean().backward()
        optimizer.step()
        capture.after_step(lr)
        if (step + 1) % 4 == 0:
            by_hand.append({k: v.detach().clone() for k, v in net.state_dict().items()})
            rates.append(lr)
        schedule.step()
    assert capture.at_steps == [4, 8, 12] and capture.learning_rates == rates == [0.2, 0.1, 0.1]
    train, test = (X[:60], y[:60]), (X[100:105], y[100:105])
    captured = model.to_numpy(capture.tracin().fit(train).influence(test))
    expected = model.to_numpy(TracIn(model, by_hand, rates).fit(train).influence(test))
    np.testing.assert_array_equal(captured, expected)
    assert np.abs(expected).max() > 0
    # The same capture as SOURCE's segments: 4 steps each, at the kept rates.
    from influence_core import EKFACIHVP
    from influence_core.unrolling import ApproximateUnrolling

    solver = EKFACIHVP(damping=1e-2)
    unrolled = capture.approximate_unrolling(solver=solver)
    assert unrolled.steps == [4, 4, 4] and unrolled.learning_rates == rates
    captured = model.to_numpy(unrolled.fit(train).influence(test))
    by_hand_unrolled = ApproximateUnrolling(model, by_hand, rates, [4, 4, 4], solver=solver)
    expected = model.to_numpy(by_hand_unrolled.fit(train).influence(test))
    np.testing.assert_array_equal(captured, expected)


def test_a_keras_fit_captures_what_tracin_saved_by_hand_reads() -> None:
    keras = pytest.importorskip("keras")
    from influence_tensorflow.capture import TracInCallback

    X, y = digits()
    keras.utils.set_random_seed(0)
    net = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(10)]
    )
    schedule = keras.optimizers.schedules.ExponentialDecay(0.2, decay_steps=1, decay_rate=0.9)
    net.compile(
        optimizer=keras.optimizers.SGD(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    model = InfluenceModel(net, loss, batch_size=40)
    capture = CheckpointCapture(model, every=3)

    class ByHand(keras.callbacks.Callback):
        checkpoints, rates, seen = [], [], 0

        def on_train_batch_begin(self, batch, logs=None):
            self.rate = float(schedule(self.model.optimizer.iterations))

        def on_train_batch_end(self, batch, logs=None):
            ByHand.seen += 1
            if ByHand.seen % 3 == 0:
                ByHand.checkpoints.append(self.model.get_weights())
                ByHand.rates.append(self.rate)

    net.fit(X, y, batch_size=20, epochs=1, shuffle=False, verbose=0,
            callbacks=[TracInCallback(capture), ByHand()])  # fmt: skip
    assert capture.at_steps == [3, 6] and len(ByHand.checkpoints) == 2
    np.testing.assert_allclose(capture.learning_rates, ByHand.rates, rtol=1e-6)
    np.testing.assert_allclose(capture.learning_rates, [0.2 * 0.9**2, 0.2 * 0.9**5], rtol=1e-6)
    train, test = (X[:60], y[:60]), (X[100:105], y[100:105])
    captured = model.to_numpy(capture.tracin().fit(train).influence(test))
    expected = model.to_numpy(
        TracIn(model, ByHand.checkpoints, capture.learning_rates).fit(train).influence(test)
    )
    np.testing.assert_array_equal(captured, expected)
    assert np.abs(expected).max() > 0


def test_capture_refuses_what_it_cannot_use() -> None:
    import torch

    net = torch.nn.Linear(64, 10)
    model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"))
    with pytest.raises(ValueError, match="every must be"):
        CheckpointCapture(model, every=0)
    capture = CheckpointCapture(model, every=5)
    with pytest.raises(ValueError, match="learning rate must be"):
        capture.after_step(0.0)
    capture.after_step(0.1)
    with pytest.raises(ValueError, match="no checkpoint kept yet: 1 step"):
        capture.tracin()
    with pytest.raises(TypeError, match="takes an InfluenceModel"):
        CheckpointCapture(net)
