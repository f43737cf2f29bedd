"""Metagradients of a replayed training run (influence_core.unrolling) against finite differences.

A tiny run on digits (40 training points, batches of 10, 3 epochs: 12 SGD
steps with momentum 0.9 and weight decay), float64. The metagradient
−∂ℓ(z_test, θ_T)/∂wᵢ must equal central finite differences of the replayed
run in wᵢ, for softmax regression and a tanh MLP; torch and TensorFlow must
agree on the same initialisation; an adjoint without its Hessian term (a
mutant) must fail the same check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from influence_conformance.specs import Dense, ModelSpec
from influence_core import InfluenceModel, get_registry
from influence_core.unrolling import SGD, Adam, AdamW, ReplayedTraining

SOFTMAX = ModelSpec("softmax", (64,), (Dense(10),), "cross_entropy", "closed_form")
MLP = ModelSpec("mlp", (64,), (Dense(8, "tanh"), Dense(10)), "cross_entropy", "finite_differences")
OPTIMIZER = SGD(lr=0.5, momentum=0.9, weight_decay=1e-2)
ADAM = Adam(lr=0.05, betas=(0.9, 0.99), weight_decay=1e-2)
ADAMW = AdamW(lr=0.05, betas=(0.9, 0.99), weight_decay=0.1)
#: SGD on a schedule: 12 steps of a cosine decay from 0.5 (one rate per step).
SCHEDULED = SGD(lr=[0.25 * (1 + np.cos(np.pi * t / 12)) for t in range(12)], momentum=0.9)


def data() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    return (X[:40], y[:40]), (X[40:43], y[40:43])


def initial_weights(spec: ModelSpec) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    weights, width = [], spec.input_shape[0]
    for layer in spec.layers:
        weights += [rng.normal(size=(width, layer.units)) / np.sqrt(width), np.zeros(layer.units)]
        width = layer.units
    return weights


def run(
    spec: ModelSpec, backend: str, optimizer=OPTIMIZER
) -> tuple[ReplayedTraining, InfluenceModel]:
    reference = (
        get_registry()
        .by_name(backend)
        .load_reference_models()(spec, initial_weights(spec), "float64")
    )
    model = InfluenceModel(reference.model, reference.loss_fn, batch_size=10)
    train, _ = data()
    return ReplayedTraining(model, train, optimizer, epochs=3, batch_size=10, seed=0), model


def test_loss(replay: ReplayedTraining, model: InfluenceModel, w: np.ndarray) -> np.ndarray:
    _, test = data()
    with model.parameters_set_to(replay.train(w)):
        return model.to_numpy(model.per_sample_loss(test))


test_loss.__test__ = False  # a helper, not a test


def finite_differences(replay, model, indices, eps: float = 1e-5) -> np.ndarray:
    """−∂ℓ_test/∂wᵢ by central differences of the replayed run: (n_test, len(indices))."""
    columns = []
    for i in indices:
        up, down = np.ones(replay.n), np.ones(replay.n)
        up[i] += eps
        down[i] -= eps
        columns.append(-(test_loss(replay, model, up) - test_loss(replay, model, down)) / (2 * eps))
    return np.stack(columns, axis=1)


INDICES = [0, 7, 19, 33]


@pytest.mark.parametrize(
    "optimizer", [OPTIMIZER, ADAM, ADAMW, SCHEDULED], ids=["sgd", "adam", "adamw", "scheduled-sgd"]
)
@pytest.mark.parametrize("spec", [SOFTMAX, MLP], ids=lambda s: s.name)
def test_the_metagradient_equals_finite_differences_of_the_replayed_run(spec, optimizer) -> None:
    replay, model = run(spec, "torch", optimizer)
    assert replay.steps == 12 and replay.checkpoint_every == 4
    _, test = data()
    scores = model.to_numpy(replay.metagradient_scores(test))
    assert scores.shape == (3, 40)
    expected = finite_differences(replay, model, INDICES)
    np.testing.assert_allclose(scores[:, INDICES], expected, rtol=1e-6, atol=1e-9)
    assert np.abs(expected).max() > 1e-3  # the weights matter: the check can tell
    # The checkpoint spacing changes memory, never the numbers.
    every_step = ReplayedTraining(
        model, data()[0], optimizer, epochs=3, batch_size=10, seed=0, checkpoint_every=1
    )
    np.testing.assert_allclose(
        model.to_numpy(every_step.metagradient_scores(test)), scores, rtol=1e-12, atol=1e-15
    )


def test_top_k_is_the_sorted_metagradient_scores() -> None:
    replay, model = run(MLP, "torch")
    _, test = data()
    scores = model.to_numpy(replay.metagradient_scores(test))
    top = replay.top_k(test, k=4)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(model.to_numpy(top.proponents), order)
    np.testing.assert_allclose(
        model.to_numpy(top.proponent_scores), np.take_along_axis(scores, order, 1), rtol=1e-12
    )
    lowest = np.argsort(scores, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(model.to_numpy(top.opponents), lowest)


def test_self_influence_is_the_diagonal_of_the_training_points_own_metagradients() -> None:
    replay, model = run(MLP, "torch")
    train, _ = data()
    full = model.to_numpy(replay.metagradient_scores(train))  # (40, 40): every point as a test
    got = model.to_numpy(replay.self_influence(block_size=16))  # 3 blocks, the last partial
    np.testing.assert_allclose(got, np.diag(full), rtol=1e-10, atol=1e-14)
    assert np.median(got) > 0  # training on a point lowers its own loss, mostly


def test_a_run_with_left_out_samples_is_differentiated_too() -> None:
    """At a 0/1 weighting (a retraining on a subset), the metagradient still equals its differences."""
    replay, model = run(SOFTMAX, "torch")
    _, test = data()
    w = np.ones(replay.n)
    w[[3, 7, 25]] = 0.0
    scores = model.to_numpy(replay.metagradient_scores(test, weights=w))
    eps = 1e-5
    for i in (7, 19):  # a left-out sample's weight has a derivative as well
        up, down = w.copy(), w.copy()
        up[i] += eps
        down[i] -= eps
        expected = -(test_loss(replay, model, up) - test_loss(replay, model, down)) / (2 * eps)
        np.testing.assert_allclose(scores[:, i], expected, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="weights of 0 or 1"):
        replay.metagradient_scores(test, weights=np.full(replay.n, 0.5))


@pytest.mark.parametrize(
    "optimizer", [OPTIMIZER, ADAM, ADAMW, SCHEDULED], ids=["sgd", "adam", "adamw", "scheduled-sgd"]
)
def test_torch_and_tensorflow_replay_the_same_run_to_1e_8(optimizer) -> None:
    _, test = data()
    results = {}
    for backend in ("torch", "tensorflow"):
        replay, model = run(MLP, backend, optimizer)
        results[backend] = (
            model.to_numpy(replay.metagradient_scores(test)),
            model.to_numpy(model.to_canonical(replay.train())),  # one layout for both
        )
    for a, b in zip(results["torch"], results["tensorflow"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-12)


def test_retrain_is_the_run_on_a_subset_and_matches_train_with_zero_weights() -> None:
    replay, model = run(SOFTMAX, "torch")
    subset = np.arange(0, 40, 2)
    w = np.zeros(40)
    w[subset] = 1.0
    with model.checkpoint_loaded(replay.retrain(subset)):
        np.testing.assert_allclose(
            model.to_numpy(model.get_parameters()), model.to_numpy(replay.train(w)), rtol=1e-14
        )
    # TracIn's checkpoints: the states after steps 4, 8 and 12, the last one θ_T.
    states = replay.checkpoints(4)
    assert len(states) == 3 and len(replay.checkpoints(5)) == 3  # after 5, 10 and 12
    with model.checkpoint_loaded(states[-1]):
        np.testing.assert_array_equal(
            model.to_numpy(model.get_parameters()), model.to_numpy(replay.train())
        )
    # The model is left at its initialisation: the run never writes it.
    np.testing.assert_array_equal(
        model.to_numpy(model.get_parameters()), model.to_numpy(replay.initial)
    )


@pytest.mark.parametrize("optimizer", [OPTIMIZER, ADAM], ids=["sgd", "adam"])
def test_an_adjoint_without_its_hessian_term_fails_the_finite_differences(
    monkeypatch, optimizer
) -> None:
    """The mutant: θ̄_t without H_t ḡ_t (the curvature dropped). The check must turn red on it."""
    replay, model = run(MLP, "torch", optimizer)
    _, test = data()
    expected = finite_differences(replay, model, INDICES)
    monkeypatch.setattr(
        ReplayedTraining, "_curvature", lambda self, kept, size, vectors: vectors * 0.0
    )
    mutant = model.to_numpy(replay.metagradient_scores(test))[:, INDICES]
    assert not np.allclose(mutant, expected, rtol=1e-6, atol=1e-9)
    assert np.abs(mutant - expected).max() > 1e-3 * np.abs(expected).max()


@pytest.mark.parametrize("kind", ["adamw", "scheduled-sgd"])
def test_the_replayed_run_is_torch_s_own_loop_step_for_step(kind: str) -> None:
    """torch.optim.AdamW, and SGD under a torch LR scheduler, on the run's batches: same θ_T."""
    replay, model = run(MLP, "torch", ADAMW if kind == "adamw" else SCHEDULED)
    net = model.kernels.module
    X, y = (torch.as_tensor(a) for a in data()[0])
    if kind == "adamw":
        optimizer = torch.optim.AdamW(
            net.parameters(), lr=0.05, betas=(0.9, 0.99), weight_decay=0.1
        )
        scheduler = None
    else:
        optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=12)
    final = model.to_numpy(replay.train())
    for batch in replay.order:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(X[batch]), y[batch])
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    mine = model.to_numpy(model.get_parameters())
    np.testing.assert_allclose(mine, final, rtol=1e-10, atol=1e-12)


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="lr must be"):
        SGD(lr=0.0)
    with pytest.raises(ValueError, match="momentum must be"):
        SGD(lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match=r"betas\[1\] must be"):
        Adam(lr=0.1, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"lr\[1\] must be"):
        SGD(lr=[0.1, -0.1])
    with pytest.raises(ValueError, match="one rate per step"):
        ReplayedTraining(
            run(SOFTMAX, "torch")[1], data()[0], SGD(lr=[0.1] * 3), epochs=1, batch_size=10
        )
    with pytest.raises(TypeError, match="an SGD, Adam or AdamW"):
        ReplayedTraining(run(SOFTMAX, "torch")[1], data()[0], "sgd", epochs=1, batch_size=10)
    replay, model = run(SOFTMAX, "torch")
    with pytest.raises(TypeError, match=r"\(X, y\) arrays"):
        ReplayedTraining(model, [data()[0]], OPTIMIZER, epochs=1, batch_size=10)
    with pytest.raises(ValueError, match="40 finite numbers"):
        replay.train(np.ones(39))


def test_saved_metagradients_are_reloaded_and_refused_for_another_run(
    tmp_path, monkeypatch
) -> None:
    from influence_core.errors import FingerprintMismatchError

    replay, model = run(SOFTMAX, "torch")
    _, test = data()
    scores = model.to_numpy(replay.metagradient_scores(test, save_to=tmp_path / "run"))
    assert (tmp_path / "run" / "metadata.json").exists()
    # Loaded, not recomputed: the reverse pass is not reached.
    monkeypatch.setattr(ReplayedTraining, "_metagradient_scores", lambda *a: 1 / 0)
    again = replay.metagradient_scores(test, save_to=tmp_path / "run")
    np.testing.assert_array_equal(model.to_numpy(again), scores)
    top = replay.top_k(test, k=2, save_to=tmp_path / "run")
    np.testing.assert_array_equal(
        model.to_numpy(top.proponents), np.argsort(-scores, axis=1, kind="stable")[:, :2]
    )
    # Another learning rate, another order, other test points, other initial weights: refused.
    other = ReplayedTraining(model, data()[0], SGD(lr=0.4), epochs=3, batch_size=10, seed=0)
    with pytest.raises(FingerprintMismatchError, match="optimizer"):
        other.metagradient_scores(test, save_to=tmp_path / "run")
    shuffled = ReplayedTraining(model, data()[0], OPTIMIZER, epochs=3, batch_size=10, seed=1)
    with pytest.raises(FingerprintMismatchError, match="order_sha256"):
        shuffled.metagradient_scores(test, save_to=tmp_path / "run")
    with pytest.raises(FingerprintMismatchError, match="'test' data"):
        replay.metagradient_scores((test[0][:2], test[1][:2]), save_to=tmp_path / "run")
    with model.parameters_set_to(replay.train()):  # a run from other initial weights
        moved = ReplayedTraining(model, data()[0], OPTIMIZER, epochs=3, batch_size=10, seed=0)
    with pytest.raises(FingerprintMismatchError, match="other parameter values"):
        moved.metagradient_scores(test, save_to=tmp_path / "run")


def test_a_margin_s_metagradient_equals_its_finite_differences_with_a_proponent_raising_it() -> (
    None
):
    """measurement="margin": τ = +∂f/∂wᵢ (a proponent raises the margin), as every calculator has it."""
    import torch

    reference = (
        get_registry()
        .by_name("torch")
        .load_reference_models()(MLP, initial_weights(MLP), "float64")
    )
    model = InfluenceModel(reference.model, reference.loss_fn, batch_size=10)
    train, test = data()
    replay = ReplayedTraining(
        model, train, OPTIMIZER, epochs=3, batch_size=10, seed=0, measurement="margin"
    )
    scores = model.to_numpy(replay.metagradient_scores(test))

    def margins(w: np.ndarray) -> np.ndarray:
        with model.parameters_set_to(replay.train(w)), torch.no_grad():
            z = reference.model(torch.as_tensor(test[0]))
        y = torch.as_tensor(test[1])
        others = z.masked_fill(torch.nn.functional.one_hot(y, 10).bool(), -torch.inf)
        return (z.gather(1, y[:, None])[:, 0] - torch.logsumexp(others, 1)).numpy()

    eps = 1e-5
    for i in INDICES:
        up, down = np.ones(replay.n), np.ones(replay.n)
        up[i], down[i] = 1 + eps, 1 - eps
        expected = (margins(up) - margins(down)) / (2 * eps)
        np.testing.assert_allclose(scores[:, i], expected, rtol=1e-6, atol=1e-9)
    assert replay.settings()["measurement"] == "margin"


def test_a_hugging_face_bert_s_run_is_differentiated_exactly_and_sdpa_names_the_fix() -> None:
    """A model the project did not write, with dict inputs: BERT from a small config (no download)."""
    import torch
    import transformers

    from influence_core import UnsupportedByBackendError

    ids = np.random.default_rng(0).integers(0, 50, size=(12, 6))
    labels = np.random.default_rng(1).integers(0, 2, size=12)
    train, test = ({"input_ids": ids}, labels), ({"input_ids": ids[:2]}, labels[:2])

    def replay(attention: str) -> tuple[ReplayedTraining, InfluenceModel]:
        torch.manual_seed(0)
        config = transformers.BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, num_labels=2, attn_implementation=attention,
        )  # fmt: skip
        net = transformers.BertForSequenceClassification(config).double().eval()
        model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=4)
        return ReplayedTraining(
            model, train, SGD(lr=0.5, momentum=0.9), epochs=1, batch_size=4
        ), model

    with pytest.raises(UnsupportedByBackendError, match="eager"):
        replay("sdpa")[0].metagradient_scores(test)
    run_, model = replay("eager")
    scores = model.to_numpy(run_.metagradient_scores(test))
    eps = 1e-5
    for i in (1, 10):
        up, down = np.ones(12), np.ones(12)
        up[i], down[i] = 1 + eps, 1 - eps
        losses = []
        for w in (up, down):
            with model.parameters_set_to(run_.train(w)):
                losses.append(model.to_numpy(model.per_sample_loss(test)))
        np.testing.assert_allclose(
            scores[:, i], -(losses[0] - losses[1]) / (2 * eps), rtol=1e-6, atol=1e-10
        )


def test_gradient_products_fall_back_to_per_sample_gradients_and_name_non_finite_samples() -> None:
    import torch

    from influence_core import NonFiniteGradientError, UnsupportedByBackendError
    from influence_torch.model import TorchKernels

    _, model = run(MLP, "torch")
    train, _ = data()
    batch = (train[0][:5], train[1][:5])
    V = np.random.default_rng(3).normal(size=(model.num_parameters, 2))
    expected = model.to_numpy(model.per_sample_grads(batch)) @ V
    np.testing.assert_allclose(
        model.to_numpy(model.per_sample_grad_products(batch, V)), expected, rtol=1e-10
    )

    class WithoutForwardMode(TorchKernels):
        def per_sample_loss_jvp(self, inputs, targets, vectors):
            raise UnsupportedByBackendError("no jvp here")

    # A sample with NaN inputs is named, by the forward-mode products' own check.
    broken = (np.where(np.arange(5)[:, None] == 3, np.nan, batch[0]), batch[1])
    with pytest.raises(NonFiniteGradientError, match=r"gradient products.*\b3\b"):
        model.per_sample_grad_products(broken, torch.as_tensor(V))
    model.kernels = WithoutForwardMode(model.kernels.module, model.kernels.loss_fn, None)
    np.testing.assert_allclose(
        model.to_numpy(model.per_sample_grad_products(batch, V)), expected, rtol=1e-10
    )
    assert model._forward_products is False  # asked once, then the fallback directly
    with pytest.raises(NonFiniteGradientError, match=r"\b3\b"):
        model.per_sample_grad_products(broken, torch.as_tensor(V))


def test_an_adamw_adjoint_that_forgets_the_decoupled_decay_fails_the_finite_differences(
    monkeypatch,
) -> None:
    """The mutant: θ̄_t = θ̄_{t+1} (the (1 − η μ) factor of AdamW's step dropped)."""
    replay, model = run(MLP, "torch", ADAMW)
    _, test = data()
    expected = finite_differences(replay, model, INDICES)
    original = AdamW.adjoint

    def forgetful(self, xp, theta, state, g, t, theta_bar, bars):
        g_bar, _, new_bars = original(self, xp, theta, state, g, t, theta_bar, bars)
        return g_bar, theta_bar, new_bars

    monkeypatch.setattr(AdamW, "adjoint", forgetful)
    mutant = model.to_numpy(replay.metagradient_scores(test))[:, INDICES]
    assert np.abs(mutant - expected).max() > 1e-3 * np.abs(expected).max()


@dataclass(frozen=True)
class Nesterov:
    """A user's own rule: SGD with Nesterov momentum (torch's nesterov=True), its adjoint by hand.

    d = g + μθ;  m' = β m + d;  θ' = θ − η (d + β m').
    """

    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    broken: bool = False  # the mutant: the momentum path of the adjoint dropped

    def init(self, xp, theta):
        return (xp.zeros_like(theta),)

    def step(self, xp, theta, state, g, t):
        d = g + self.weight_decay * theta
        m = self.momentum * state[0] + d
        return theta - self.lr * (d + self.momentum * m), (m,)

    def adjoint(self, xp, theta, state, g, t, theta_bar, bars):
        u_bar = -self.lr * theta_bar
        m_bar = (0 * bars[0] if self.broken else bars[0]) + self.momentum * u_bar
        d_bar = u_bar + m_bar
        return d_bar, theta_bar + self.weight_decay * d_bar, (self.momentum * m_bar,)


def test_a_users_own_update_rule_is_differentiated_with_its_adjoint() -> None:
    """A hand-written rule with its adjoint matches the finite differences; a broken one does not."""
    replay, model = run(MLP, "torch", Nesterov(lr=0.3, weight_decay=1e-2))
    _, test = data()
    expected = finite_differences(replay, model, INDICES)
    scores = model.to_numpy(replay.metagradient_scores(test))[:, INDICES]
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-9)
    assert replay.settings()["optimizer"]["kind"] == "Nesterov"
    broken, model = run(MLP, "torch", Nesterov(lr=0.3, weight_decay=1e-2, broken=True))
    mutant = model.to_numpy(broken.metagradient_scores(test))[:, INDICES]
    assert np.abs(mutant - expected).max() > 1e-3 * np.abs(expected).max()


def test_a_rule_without_an_adjoint_or_settings_is_refused_naming_what_it_lacks() -> None:
    class NoAdjoint:
        lr = 0.1

        def init(self, xp, theta):
            return ()

        def step(self, xp, theta, state, g, t):
            return theta - self.lr * g, ()

    model = run(SOFTMAX, "torch")[1]
    with pytest.raises(TypeError, match="lacks adjoint"):
        ReplayedTraining(model, data()[0], NoAdjoint(), epochs=1, batch_size=10)

    class NoSettings(NoAdjoint):
        def adjoint(self, xp, theta, state, g, t, theta_bar, bars):
            return -self.lr * theta_bar, theta_bar, ()

    with pytest.raises(TypeError, match="get_params"):
        ReplayedTraining(model, data()[0], NoSettings(), epochs=1, batch_size=10)


def test_a_killed_reverse_pass_resumes_from_its_last_segment(tmp_path, monkeypatch) -> None:
    """12 steps in 3 segments of 4: killed in the second segment, the rerun does 8 steps, not 12."""
    from influence_core.errors import FingerprintMismatchError

    replay, model = run(MLP, "torch")
    _, test = data()
    assert replay.checkpoint_every == 4 and replay.steps == 12
    expected = model.to_numpy(replay.metagradient_scores(test))
    real, calls = ReplayedTraining._through_the_gradient, []

    def killed_after(limit):
        def step(self, *args):
            if len(calls) == limit:
                raise KeyboardInterrupt("killed")
            calls.append(1)
            return real(self, *args)

        return step

    monkeypatch.setattr(ReplayedTraining, "_through_the_gradient", killed_after(6))
    with pytest.raises(KeyboardInterrupt):
        replay.metagradient_scores(test, save_to=tmp_path / "run")
    assert (tmp_path / "run" / "reverse_pass" / "metadata.json").exists()
    assert not (tmp_path / "run" / "metadata.json").exists()
    # Another run is refused its progress.
    other = ReplayedTraining(model, data()[0], SGD(lr=0.4), epochs=3, batch_size=10, seed=0)
    with pytest.raises(FingerprintMismatchError, match="reverse pass of another run"):
        other.metagradient_scores(test, save_to=tmp_path / "run")
    # The same run in other segments (the k-ary scheme) cannot take this progress either.
    k_ary = ReplayedTraining(model, data()[0], OPTIMIZER, epochs=3, batch_size=10, branching=2)
    with pytest.raises(FingerprintMismatchError, match="same checkpoint_every and branching"):
        k_ary.metagradient_scores(test, save_to=tmp_path / "run")
    calls.clear()
    monkeypatch.setattr(ReplayedTraining, "_through_the_gradient", killed_after(10**9))
    resumed = model.to_numpy(replay.metagradient_scores(test, save_to=tmp_path / "run"))
    assert len(calls) == 8  # the first segment (4 steps) came from the saved progress
    np.testing.assert_allclose(resumed, expected, rtol=1e-12, atol=1e-15)
    assert (tmp_path / "run" / "metadata.json").exists()
    assert not (tmp_path / "run" / "reverse_pass").exists()  # superseded by the result


@pytest.mark.parametrize("branching", [2, 3])
@pytest.mark.parametrize("optimizer", [OPTIMIZER, ADAM], ids=["sgd", "adam"])
def test_the_k_ary_replay_gives_the_same_metagradients_in_log_levels(branching, optimizer) -> None:
    """REPLAY's k-ary scheme: at most k states per level, ⌈log_k T⌉ levels, the same numbers."""
    replay, model = run(MLP, "torch", optimizer)
    _, test = data()
    expected = model.to_numpy(replay.metagradient_scores(test))
    assert replay.replay_levels_ == 1  # the √T scheme: kept states, each segment replayed once
    k_ary = ReplayedTraining(
        model, data()[0], optimizer, epochs=3, batch_size=10, seed=0, branching=branching
    )
    calls = []
    real = ReplayedTraining._step
    k_ary._step = lambda *a: calls.append(1) or real(k_ary, *a)
    got = model.to_numpy(k_ary.metagradient_scores(test))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    levels = math.ceil(math.log(replay.steps, branching))
    assert 2 <= k_ary.replay_levels_ <= levels
    # every level replays the run once, the first is the forward run: T · (levels + 1) at most
    assert replay.steps < len(calls) <= replay.steps * (levels + 1)
    with pytest.raises(ValueError, match="branching must be ≥ 2"):
        ReplayedTraining(model, data()[0], optimizer, epochs=1, batch_size=10, branching=1)
