"""TracIn against the training run it traces, and against its definition.

Softmax regression on digits trained by plain SGD, batch size 1, step η = 5e-4,
from θ = 0: two epochs over 75 examples (150 steps), a checkpoint before every
step. The TracIn term of step t, η g(z_test; θ_t)·g(z_t; θ_t), must match the
actual drop of the test loss in that step.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
from digits_problem import SPEC, digits_model, loss_at, problem
from scipy.stats import pearsonr

from influence_core import InfluenceModel, TracIn, get_registry

ETA = 5e-4
N_EXAMPLES = 75


def per_sample_grads(theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """∇ℓ for each row, canonical layout (W (64 × 10) row-major, then b)."""
    z = X @ theta[:640].reshape(64, 10) + theta[640:]
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return np.concatenate([(X[:, :, None] * p[:, None, :]).reshape(len(y), -1), p], axis=1)


@cache
def sgd_run() -> dict[str, np.ndarray]:
    p = problem()
    rng = np.random.default_rng(0)
    order = np.concatenate([rng.permutation(N_EXAMPLES) for _ in range(2)])
    thetas = [np.zeros(650)]
    for i in order:
        g = per_sample_grads(thetas[-1], p["X"][i : i + 1], p["y"][i : i + 1])[0]
        thetas.append(thetas[-1] - ETA * g)
    return {"order": order, "thetas": np.array(thetas)}


def build(backend: str):
    reference = (
        get_registry()
        .by_name(backend)
        .load_reference_models()(SPEC, [np.zeros((64, 10)), np.zeros(10)], "float64")
    )
    return reference, InfluenceModel(reference.model, reference.loss_fn, batch_size=64)


def native_checkpoint(backend: str, reference, model: InfluenceModel, theta: np.ndarray):
    """The checkpoint a user would have saved at canonical θ: a state dict or a weight list."""
    with model.parameters_set_to(reference.from_canonical(theta)):
        if backend == "torch":
            return {k: v.detach().clone() for k, v in reference.model.state_dict().items()}
        return reference.model.get_weights()


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_tracin_terms_match_actual_test_loss_drops(backend: str) -> None:
    p, run = problem(), sgd_run()
    reference, model = build(backend)
    test = (p["X_test"], p["y_test"])
    terms, drops = [], []
    for t, i in enumerate(run["order"]):
        checkpoint = native_checkpoint(backend, reference, model, run["thetas"][t])
        tracin = TracIn(model, [checkpoint], ETA).fit(None)
        terms.append(
            model.to_numpy(tracin.influence(test, (p["X"][i : i + 1], p["y"][i : i + 1])))[:, 0]
        )
        drops.append(loss_at(run["thetas"][t], *test) - loss_at(run["thetas"][t + 1], *test))
    terms, drops = np.array(terms), np.array(drops)  # (steps, n_test)
    # Per example: the sum of its steps' TracIn terms against the sum of its steps' drops.
    per_example_terms = np.zeros((N_EXAMPLES, 3))
    per_example_drops = np.zeros((N_EXAMPLES, 3))
    np.add.at(per_example_terms, run["order"], terms)
    np.add.at(per_example_drops, run["order"], drops)
    r = pearsonr(per_example_terms.ravel(), per_example_drops.ravel()).statistic
    total_gap = abs(terms.sum() - drops.sum()) / abs(drops.sum())
    print(f"{backend}: Pearson {r:.7f}, total {terms.sum():.5f} vs actual {drops.sum():.5f}")
    assert r >= 0.999
    assert total_gap <= 0.02
    # The model was restored after every checkpoint.
    np.testing.assert_array_equal(model.to_numpy(model.get_parameters()), np.zeros(650))


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_tracin_checkpoint_sum_matches_numpy(backend: str, tmp_path) -> None:
    p, run = problem(), sgd_run()
    reference, model = build(backend)
    steps = [0, 40, 100, 149]
    rates = [0.5, 1.0, 1.5, 2.0]
    checkpoints = [native_checkpoint(backend, reference, model, run["thetas"][t]) for t in steps]
    X, y = p["X"][:30], p["y"][:30]
    test = (p["X_test"], p["y_test"])
    expected = sum(
        rate
        * per_sample_grads(run["thetas"][t], *test)
        @ per_sample_grads(run["thetas"][t], X, y).T
        for t, rate in zip(steps, rates, strict=True)
    )
    expected_self = sum(
        rate * (per_sample_grads(run["thetas"][t], X, y) ** 2).sum(axis=1)
        for t, rate in zip(steps, rates, strict=True)
    )
    tracin = TracIn(model, checkpoints, rates, batch_size=8, chunk_size=16).fit((X, y))
    host = model.to_numpy
    np.testing.assert_allclose(host(tracin.influence(test)), expected, rtol=1e-10)
    np.testing.assert_allclose(host(tracin.self_influence()), expected_self, rtol=1e-10)
    scores, self_influence = tracin.influence_and_self_influence(test)  # one pass for both
    np.testing.assert_allclose(host(scores), expected, rtol=1e-10)
    np.testing.assert_allclose(host(self_influence), expected_self, rtol=1e-10)
    np.testing.assert_allclose(
        host(tracin.group_influence(test, (X[:7], y[:7]))), expected[:, :7].sum(axis=1), rtol=1e-10
    )
    top = tracin.top_k(test, k=4)  # chunks of 16 samples, 4 checkpoint loads each
    order = np.argsort(-expected, axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(host(top.proponents), order)
    np.testing.assert_allclose(
        host(top.proponent_scores), np.take_along_axis(expected, order, 1), rtol=1e-10
    )
    np.testing.assert_array_equal(
        host(top.opponents), np.argsort(expected, axis=1, kind="stable")[:, :4]
    )

    # Checkpoints saved to files give the same scores.
    paths = []
    for k, checkpoint in enumerate(checkpoints):
        if backend == "torch":
            import torch

            paths.append(tmp_path / f"step{k}.pt")
            torch.save(checkpoint, paths[-1])
        else:
            reference.model.set_weights(checkpoint)
            paths.append(tmp_path / f"step{k}.weights.h5")
            reference.model.save_weights(paths[-1])
    reference.model.set_weights(
        native_checkpoint(backend, reference, model, np.zeros(650))
    ) if backend == "tensorflow" else None
    from_files = TracIn(model, [str(path) for path in paths], rates).fit((X, y))
    np.testing.assert_allclose(host(from_files.influence(test)), expected, rtol=1e-10)


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_random_projection_error_shrinks_with_dimension(backend: str) -> None:
    p, run = problem(), sgd_run()
    reference, model = build(backend)
    checkpoint = [native_checkpoint(backend, reference, model, run["thetas"][100])]
    train, test = (p["X"][:200], p["y"][:200]), (p["X_test"], p["y_test"])
    plain = TracIn(model, checkpoint, 1.0).fit(train)
    exact = model.to_numpy(plain.influence(test))
    # Johnson-Lindenstrauss scale of each entry's error: ‖g_test‖‖g_train‖ √(2/m).
    norms = np.sqrt(
        np.outer(model.to_numpy(plain.self_influence(test)), model.to_numpy(plain.self_influence()))
    )
    errors, worst = [], []
    for m in (16, 128, 1024):
        projected = model.to_numpy(
            TracIn(model, checkpoint, 1.0, projection_dim=m, seed=1).fit(train).influence(test)
        )
        errors.append(np.linalg.norm(projected - exact) / np.linalg.norm(exact))
        worst.append(np.max(np.abs(projected - exact) / (norms * np.sqrt(2.0 / m))))
    print(
        backend,
        "relative error at m = 16, 128, 1024:",
        np.round(errors, 3),
        "worst entry / JL scale:",
        np.round(worst, 2),
    )
    assert errors[0] > errors[1] > errors[2]
    assert max(worst) < 5.0  # no entry beyond 5 standard deviations


def test_tracin_argument_errors() -> None:
    _, model = build("torch")
    with pytest.raises(ValueError, match="at least one checkpoint"):
        TracIn(model, [], 0.1).fit(None)
    with pytest.raises(ValueError, match="2 learning rates for 1 checkpoints"):
        TracIn(model, [{}], [0.1, 0.2]).fit(None)
    with pytest.raises(TypeError, match="state dict"):
        TracIn(model, [42], 0.1).fit(None).self_influence((problem()["X"][:2], problem()["y"][:2]))


def test_tracin_explains_a_measurement_with_the_library_sign() -> None:
    """measurement="logit": score = Σ_k η_k (−∇Φ_y(z_test)) · g(z_train); positive raises the logit."""
    from influence_core.measurements import resolve_measurement

    p = problem()
    model = digits_model("torch", batch_size=100)
    train, test = (p["X"][:200], p["y"][:200]), (p["X_test"], p["y_test"])
    tracin = TracIn(model, [model.kernels.save_state()], 0.5, measurement="logit").fit(train)
    G = model.to_numpy(model.per_sample_grads(train))
    T = np.concatenate(
        [
            model.to_numpy(g)
            for _, g in model.iter_measurement_grads(test, resolve_measurement("logit"))
        ]
    )
    np.testing.assert_allclose(model.to_numpy(tracin.influence(test)), 0.5 * T @ G.T, rtol=1e-12)
    # A step of SGD on the strongest proponent raises the test logit.
    score = model.to_numpy(tracin.influence(test))
    t, i = np.unravel_index(np.argmax(score), score.shape)
    theta = model.to_numpy(model.get_parameters())

    def logit_at(flat):
        with model.parameters_set_to(flat):
            out = model.to_numpy(model.kernels.outputs(model.kernels.as_native(test[0])))
        return out[t, test[1][t]]

    assert logit_at(theta - 1e-3 * G[i]) > logit_at(theta)


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
@pytest.mark.parametrize("spec", ["mlp_tanh", "convnet"])
def test_layerwise_dot_products_equal_the_per_sample_gradients(backend: str, spec: str) -> None:
    from influence_conformance.cases import build_case

    case = build_case(backend, spec, "float64")
    model, host = case.model, case.model.to_numpy
    with model.parameters_set_to(model.get_parameters() * 0.5):
        halfway = model.kernels.save_state()
    checkpoints = [halfway, model.kernels.save_state()]
    test, group = (case.X[:3], case.y[:3]), (case.X[:5], case.y[:5])
    results = {}
    for layerwise in (True, False):
        calc = TracIn(model, checkpoints, [0.3, 0.1], layerwise=layerwise, measurement="margin")
        scores, own = calc.fit(case.data).influence_and_self_influence(test)
        top = calc.top_k(test, k=2)
        results[layerwise] = [
            host(scores),
            host(own),
            host(calc.group_influence(test, group)),
            host(top.proponent_scores),
        ]
    assert TracIn(model, checkpoints, 0.1).fit(case.data)._layer_blocks() is not None  # the default
    for a, b in zip(results[True], results[False], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="no projection"):
        TracIn(model, checkpoints, 0.1, projection_dim=4, layerwise=True)


def test_layerwise_tracin_names_the_samples_with_non_finite_gradients() -> None:
    from influence_conformance.cases import build_case
    from influence_core import NonFiniteGradientError

    case = build_case("torch", "mlp_tanh", "float64")
    X = case.X.copy()
    X[6, 0] = np.nan
    calc = TracIn(case.model, [case.model.kernels.save_state()], 0.1, layerwise=True)
    with pytest.raises(NonFiniteGradientError, match=r"\[6\]"):
        calc.fit((X, case.y)).self_influence()
