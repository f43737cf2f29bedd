"""Representer points: RPS-L2's decomposition and RPS-LJE's defining identity, both backends."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from sklearn.datasets import load_digits

from influence_conformance.specs import Dense, ModelSpec, make_weights
from influence_core import (
    ExactIHVP,
    InfluenceModel,
    RepresenterPointL2,
    RepresenterPointLJE,
    get_registry,
)

BACKENDS = pytest.mark.parametrize("backend", ["torch", "tensorflow"])
MLP = ModelSpec("digits_mlp", (64,), (Dense(16, "tanh"), Dense(10)), "cross_entropy", "-")
REGRESSION = ModelSpec("regression", (5,), (Dense(6, "tanh"), Dense(1)), "mse", "-")


def digits(n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    X, y = load_digits(return_X_y=True)
    return X[:n] / 16.0, y[:n]


def build(backend: str, spec: ModelSpec, weights=None, dtype: str = "float64") -> InfluenceModel:
    reference = (
        get_registry()
        .by_name(backend)
        .load_reference_models()(
            spec, weights if weights is not None else make_weights(spec, seed=3), dtype
        )
    )
    return InfluenceModel(reference.model, reference.loss_fn, batch_size=64)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# -- RPS-L2 ------------------------------------------------------------------------------
@BACKENDS
def test_l2_decomposition_holds_at_the_stationary_point(backend: str) -> None:
    X, y = digits()
    model = build(backend, MLP)
    rps = RepresenterPointL2(model, l2=1e-2).fit((X[:250], y[:250]))
    test = (X[250:], y[250:])
    host = model.to_numpy
    assert rps.gradient_norm_ < 1e-8
    surrogate = host(rps.surrogate_outputs(test))
    assert rel(host(rps.decompose(test)), surrogate) < 1e-8

    # Scores are the label components of α_i k(x_i, x_t), computed here by hand.
    features = np.c_[
        host(model.kernels.penultimate_features(model.kernels.as_native(X))), np.ones(len(X))
    ]
    alpha = host(rps.alpha())
    kernel = features[250:] @ features[:250].T
    expected = alpha[:, y[250:]].T * kernel
    scores = host(rps.influence(test))
    assert rel(scores, expected) < 1e-10
    # ... and summed over the training points they give the test point's own logit.
    assert rel(scores.sum(axis=1), surrogate[np.arange(50), y[250:]]) < 1e-8
    np.testing.assert_allclose(
        host(rps.self_influence()),
        alpha[np.arange(250), y[:250]] * (features[:250] ** 2).sum(axis=1),
        rtol=1e-10,
    )
    top = rps.top_k(test, k=3)
    np.testing.assert_array_equal(
        host(top.proponents), np.argsort(-expected, axis=1, kind="stable")[:, :3]
    )
    # Excitatory for its own class: α_{i, y_i} > 0 for every training point.
    assert np.all(alpha[np.arange(250), y[:250]] > 0)


@BACKENDS
def test_l2_regression_head(backend: str) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 5))
    y = rng.normal(size=(80, 1))
    model = build(backend, REGRESSION)
    rps = RepresenterPointL2(model, l2=1e-3).fit((X[:60], y[:60]))
    test = (X[60:], y[60:])
    host = model.to_numpy
    surrogate = host(rps.surrogate_outputs(test))
    assert rel(host(rps.decompose(test)), surrogate) < 1e-8
    assert rel(host(rps.influence(test)).sum(axis=1), surrogate[:, 0]) < 1e-8


def test_l2_without_bias_torch_and_keras() -> None:
    import keras
    import torch

    X, y = digits(120)
    torch.manual_seed(0)
    torch_model = torch.nn.Sequential(
        torch.nn.Linear(64, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10, bias=False)
    ).double()
    keras_model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(8, activation="tanh", dtype="float64"),
            keras.layers.Dense(10, use_bias=False, dtype="float64"),
        ]
    )
    keras_model.set_weights(
        [
            torch_model[0].weight.detach().numpy().T,
            torch_model[0].bias.detach().numpy(),
            torch_model[2].weight.detach().numpy().T,
        ]
    )
    results = []
    for native, loss in [
        (torch_model, torch.nn.CrossEntropyLoss(reduction="none")),
        (
            keras_model,
            keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, reduction=None, dtype="float64"
            ),
        ),
    ]:
        model = InfluenceModel(native, loss)
        rps = RepresenterPointL2(model, l2=1e-2).fit((X[:100], y[:100]))
        assert tuple(rps.weights_.shape) == (8, 10)  # no bias row
        test = (X[100:], y[100:])
        assert (
            rel(model.to_numpy(rps.decompose(test)), model.to_numpy(rps.surrogate_outputs(test)))
            < 1e-8
        )
        results.append(model.to_numpy(rps.influence(test)))
    assert rel(results[1], results[0]) < 1e-8  # the same numbers in both frameworks


def test_l2_rejects_a_model_that_does_not_end_linearly() -> None:
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(64, 10), torch.nn.Softmax(dim=1)).double()
    X, y = digits(20)
    with pytest.raises(ValueError, match="not those of its last linear layer"):
        RepresenterPointL2(
            InfluenceModel(model, lambda out, t: -torch.log(out[torch.arange(len(t)), t]))
        ).fit((X, y))


# -- RPS-LJE -----------------------------------------------------------------------------
@BACKENDS
def test_lje_terms_sum_to_the_newton_step_output(backend: str) -> None:
    """Σ_i r_i(x_t) = Φ_k(x_t; θ* − (H* + λI)⁻¹ ∇L(θ*)), with H* built densely here."""
    X, y = digits()
    model = build(backend, MLP)
    train, test = (X[:250], y[:250]), (X[250:], y[250:])
    lje = RepresenterPointLJE(model, ExactIHVP(damping=1e-3), step=0.5).fit(train)
    head, host = lje.head_, model.to_numpy
    star = host(lje.expansion_point_)
    with head.parameters_set_to(star):
        H = host(head.hessian(train)) + 1e-3 * np.eye(head.num_parameters)
        newton = star - np.linalg.solve(H, host(head.loss_grad(train)))
    with head.parameters_set_to(newton):
        expected = host(head.kernels.outputs(head.kernels.as_native(test[0])))[
            np.arange(50), y[250:]
        ]
    scores = host(lje.influence(test))
    assert scores.shape == (50, 250)
    assert rel(scores.sum(axis=1), expected) < 1e-8
    assert rel(host(lje.decompose(test)), expected) < 1e-8
    # Self-influence is the diagonal of the scores of the training points themselves.
    diagonal = np.diag(host(lje.influence((X[:20], y[:20]), (X[:20], y[:20]))))
    # (n stays that of the full training set, so the diagonal of a 20-point block matches.)
    np.testing.assert_allclose(host(lje.self_influence((X[:20], y[:20]))), diagonal, rtol=1e-8)
    np.testing.assert_array_equal(
        host(model.get_parameters()), host(build(backend, MLP).get_parameters())
    )


@BACKENDS
def test_lje_is_exact_for_a_quadratic_loss(backend: str) -> None:
    """With a squared loss one Newton step is exact: Σ_i r_i(x_t) = Φ(x_t) of the least-squares fit."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(70, 5))
    y = rng.normal(size=(70, 1))
    model = build(backend, REGRESSION)
    lje = RepresenterPointLJE(model, ExactIHVP(damping=0.0), step=0.3).fit((X[:60], y[:60]))
    features = model.to_numpy(model.kernels.penultimate_features(model.kernels.as_native(X)))
    design = np.c_[features, np.ones(70)]
    coefficients, *_ = np.linalg.lstsq(design[:60], y[:60], rcond=None)
    expected = (design[60:] @ coefficients)[:, 0]
    assert rel(model.to_numpy(lje.influence((X[60:], y[60:]))).sum(axis=1), expected) < 1e-8


@BACKENDS
def test_lje_recovers_the_optimum_to_second_order(backend: str) -> None:
    """A last layer δ away from the optimum θ̂: |Σ_i r_i − Φ(θ̂)| shrinks like δ² (one Newton step)."""
    rng = np.random.default_rng(2)
    centres = np.array([[0.0, 0.0], [1.0, 0.5], [0.2, 1.2]])
    y = np.repeat(np.arange(3), 60)
    X = centres[y] + rng.normal(scale=0.6, size=(180, 2))  # overlapping: a finite optimum
    spec = ModelSpec("blobs", (2,), (Dense(3),), "cross_entropy", "-")

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        z = X @ theta[:6].reshape(2, 3) + theta[6:]
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        loss = -np.mean(np.log(p[np.arange(180), y]))
        p[np.arange(180), y] -= 1.0
        return loss, np.concatenate([(X.T @ p).ravel(), p.sum(axis=0)]) / 180

    theta = minimize(
        objective, np.zeros(9), jac=True, method="L-BFGS-B", options={"gtol": 1e-13, "ftol": 0}
    ).x
    # Zero-sum over classes: shifting every logit equally changes Φ but not the loss (H's
    # null space), so no Newton step could undo it.
    direction = np.random.default_rng(3).normal(size=(3, 3))
    direction = (direction - direction.mean(axis=1, keepdims=True)).ravel()
    optimum = build(backend, spec, [theta[:6].reshape(2, 3), theta[6:]])
    test = (X[:30], y[:30])
    expected = optimum.to_numpy(optimum.kernels.outputs(optimum.kernels.as_native(X[:30])))
    expected = expected[np.arange(30), y[:30]]
    errors = []
    for delta in (0.3, 0.03):
        off = theta + delta * direction
        model = build(backend, spec, [off[:6].reshape(2, 3), off[6:]])
        lje = RepresenterPointLJE(model, ExactIHVP(damping=1e-12), step=0.0).fit((X, y))
        errors.append(rel(model.to_numpy(lje.decompose(test)), expected))
    print(backend, "error of Σ r_i against Φ(θ̂) at δ = 0.3, 0.03:", errors)
    assert errors[1] < errors[0] / 30  # quadratic: 100x in theory
    assert errors[1] < 1e-3


def test_representers_agree_across_backends() -> None:
    X, y = digits(120)
    train, test = (X[:100], y[:100]), (X[100:], y[100:])
    results = {}
    for name in ("torch", "tensorflow"):
        model = build(name, MLP)
        results[name] = {
            "l2": model.to_numpy(RepresenterPointL2(model).fit(train).influence(test)),
            "lje": model.to_numpy(RepresenterPointLJE(model).fit(train).influence(test)),
        }
    for method in ("l2", "lje"):
        assert rel(results["tensorflow"][method], results["torch"][method]) < 1e-8, method


# -- a named last layer (every backend, JAX included) --------------------------------
@BACKENDS
def test_a_named_last_layer_gives_the_backend_s_own_numbers(backend: str) -> None:
    """last_layer= derives W, b and f(x) in the core; they match the backend's own head exactly."""
    X, y = digits()
    model = build(backend, MLP)
    train, test = (X[:250], y[:250]), (X[250:260], y[250:260])
    name = model.last_layer().name
    host = model.to_numpy
    for method in (
        lambda **kw: RepresenterPointL2(model, l2=1e-2, **kw),
        lambda **kw: RepresenterPointLJE(model, ExactIHVP(damping=0.1), **kw),
    ):
        found = host(method().fit(train).influence(test))
        named = host(method(last_layer=name).fit(train).influence(test))
        assert rel(named, found) < 1e-10


@BACKENDS
def test_a_named_layer_that_is_not_the_last_is_refused(backend: str) -> None:
    X, y = digits(50)
    model = build(backend, MLP)
    first = model.parameter_names[0].rpartition("." if backend == "torch" else "/")[0]
    with pytest.raises(ValueError, match="outputs have shape"):
        RepresenterPointL2(model, last_layer=first).fit((X, y))
    with pytest.raises(ValueError, match="a linear layer has a kernel"):
        RepresenterPointL2(model, last_layer=model.parameter_names[-1]).fit((X, y))


@BACKENDS
def test_a_named_layer_followed_by_an_activation_is_refused(backend: str) -> None:
    """The linearity guard: Φ must be f W + b of the named layer, not tanh of it."""
    X, y = digits(50)
    spec = ModelSpec(
        "squashed", (64,), (Dense(16, "tanh"), Dense(10, "tanh")), "cross_entropy", "-"
    )
    model = build(backend, spec)
    name = model.parameter_names[-1].rpartition("." if backend == "torch" else "/")[0]
    with pytest.raises(ValueError, match=r"not f\(x\) W \+ b"):
        RepresenterPointL2(model, last_layer=name).fit((X, y))
    linear = build(backend, MLP)  # the same name on a linear head passes the guard
    linear_name = linear.parameter_names[-1].rpartition("." if backend == "torch" else "/")[0]
    RepresenterPointL2(linear, last_layer=linear_name).fit((X, y))
