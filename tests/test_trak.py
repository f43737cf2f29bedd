"""TRAK against its closed form in NumPy, saved features, chunked runs and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from influence_conformance.cases import build_case
from influence_core import (
    TRAK,
    FingerprintMismatchError,
    KroneckerProjection,
    NotPositiveDefiniteError,
    RandomProjection,
    run_influence,
)

RNG = np.random.default_rng(0)
X, Y = RNG.normal(size=(40, 5)), RNG.integers(0, 3, 40)
XT, YT = RNG.normal(size=(6, 5)), RNG.integers(0, 3, 6)


def margin_features(W: np.ndarray, b: np.ndarray, X: np.ndarray, y: np.ndarray):
    """Canonical ∇_θ margin (kernel row-major, then bias) and Q = 1 − p_y, for softmax regression."""
    z = X @ W + b
    e = np.exp(z - z.max(axis=1, keepdims=True))
    rows = np.arange(len(y))
    others = e.copy()
    others[rows, y] = 0
    dz = -others / others.sum(axis=1, keepdims=True)  # ∂/∂z of −log Σ_{k≠y} exp z_k
    dz[rows, y] = 1.0
    grads = np.concatenate([np.einsum("bi,bj->bij", X, dz).reshape(len(X), -1), dz], axis=1)
    return grads, 1.0 - (e / e.sum(axis=1, keepdims=True))[rows, y]


def closed_form(models, damping: float, project=lambda s, F: F):
    """(1/M) Σ_s φ_s (Φ_sᵀΦ_s + λI)⁻¹ Φ_sᵀ · (1/M) Σ_s q_s, and the self-influences."""
    scores, own, weights = 0.0, 0.0, 0.0
    for s, (W, b) in enumerate(models):
        F, q = margin_features(W, b, X, Y)
        Ft, _ = margin_features(W, b, XT, YT)
        F, Ft = project(s, F), project(s, Ft)
        K = np.linalg.inv(F.T @ F + damping * np.eye(F.shape[1]))
        scores = scores + Ft @ K @ F.T
        own = own + np.einsum("ij,jk,ik->i", F, K, F)
        weights = weights + q
    M = len(models)
    return scores / M * weights / M, own / M * weights / M


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_unprojected_trak_equals_its_closed_form(backend: str) -> None:
    case = build_case(backend, "logistic_regression", "float64")
    W, b = case.weights
    calc = TRAK(case.model, projection_dim=None, damping=0.01, chunk_size=16).fit((X, Y))
    scores, own = closed_form([(W, b)], 0.01)
    host = case.model.to_numpy
    np.testing.assert_allclose(host(calc.influence((XT, YT))), scores, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(host(calc.self_influence()), own, rtol=1e-8)
    top = calc.top_k((XT, YT), k=4)
    np.testing.assert_array_equal(host(top.proponents), np.argsort(-scores, axis=1)[:, :4])


def test_an_ensemble_of_checkpoints_with_projection_equals_the_closed_form() -> None:
    case = build_case("torch", "logistic_regression", "float64")
    W, b = case.weights
    model = case.model
    with model.parameters_set_to(model.get_parameters() * 0.5):
        halfway = model.kernels.save_state()
    projector = RandomProjection(12, seed=7)
    d = model.num_parameters
    calc = TRAK(model, [halfway, model.kernels.save_state()], projector=projector, damping=0.1)
    calc.fit((X, Y))
    scores, own = closed_form(
        [(0.5 * W, 0.5 * b), (W, b)],
        0.1,
        project=lambda s, F: F @ RandomProjection(12, seed=7 + s).matrix(d),
    )
    np.testing.assert_allclose(model.to_numpy(calc.influence((XT, YT))), scores, rtol=1e-8)
    np.testing.assert_allclose(model.to_numpy(calc.self_influence()), own, rtol=1e-8)
    # A formula that forgets the weights Q is a different number: the test can fail.
    unweighted = TRAK(
        model,
        [halfway, model.kernels.save_state()],
        projector=projector,
        damping=0.1,
        weighting=None,
    ).fit((X, Y))
    assert (
        np.max(np.abs(model.to_numpy(unweighted.influence((XT, YT))) - scores))
        > 0.1 * np.abs(scores).max()
    )


def test_saved_features_give_the_same_scores_and_a_second_fit_reuses_them(tmp_path) -> None:
    case = build_case("tensorflow", "convnet", "float64")
    model, host = case.model, case.model.to_numpy
    test = (case.X[:3], case.y[:3])
    settings = dict(projector=KroneckerProjection(3, 2), damping=0.1, chunk_size=5)
    memory = TRAK(model, **settings).fit(case.data)
    disk = TRAK(model, features_dir=tmp_path / "features", **settings).fit(case.data)
    np.testing.assert_array_equal(host(disk.influence(test)), host(memory.influence(test)))
    np.testing.assert_array_equal(host(disk.self_influence()), host(memory.self_influence()))
    assert (
        len(list((tmp_path / "features" / "checkpoint_000").glob("chunk_*.npz"))) == 2
    )  # 8 + 5 samples

    again = TRAK(model, features_dir=tmp_path / "features", **settings)
    again._features = lambda *a: pytest.fail("recomputed a saved chunk")
    np.testing.assert_array_equal(
        host(again.fit(case.data).influence(test)), host(memory.influence(test))
    )

    with model.parameters_set_to(model.get_parameters() * 0.5):
        other = model.kernels.save_state()
    TRAK(model, [model.kernels.save_state()], features_dir=tmp_path / "ours", **settings).fit(
        case.data
    )
    with pytest.raises(FingerprintMismatchError, match="other weights for checkpoint 0"):
        TRAK(model, [other], features_dir=tmp_path / "ours", **settings).fit(case.data)
    with pytest.raises(FingerprintMismatchError, match="damping"):
        TRAK(
            model,
            features_dir=tmp_path / "features",
            projector=KroneckerProjection(3, 2),
            damping=0.2,
            chunk_size=5,
        ).fit(case.data)


def test_chunked_runs_score_new_data_like_the_fitted_features(tmp_path) -> None:
    case = build_case("torch", "mlp_tanh", "float64")
    model = case.model
    calc = TRAK(model, projection_dim=6, damping=0.1).fit(case.data)
    test = (case.X[:4], case.y[:4])
    whole = model.to_numpy(calc.influence(test))
    chunked = model.to_numpy(run_influence(calc, tmp_path / "run", test, chunk_size=4))
    np.testing.assert_allclose(chunked, whole, rtol=1e-12)
    fresh = model.to_numpy(calc.self_influence((case.X.copy(), case.y.copy())))
    np.testing.assert_allclose(fresh, model.to_numpy(calc.self_influence()), rtol=1e-12)


def test_a_singular_feature_kernel_names_its_eigenvalue_and_the_damping() -> None:
    case = build_case("torch", "logistic_regression", "float64")
    # The margin gradients of a softmax sum to zero over its bias: ΦᵀΦ is singular at λ = 0.
    with pytest.raises(NotPositiveDefiniteError, match=r"feature kernel.*damping="):
        TRAK(case.model, projection_dim=None).fit((X, Y))
    with pytest.raises(ValueError, match="weighting"):
        TRAK(case.model, weighting="loss")
    with pytest.raises(ValueError, match="damping"):
        TRAK(case.model, damping=-1.0)
    with pytest.raises(ValueError, match="empty"):
        TRAK(case.model, [])


def test_relative_damping_is_scale_free_and_each_model_keeps_its_projector() -> None:
    case = build_case("torch", "mlp_tanh", "float64")
    projector = KroneckerProjection(16, 16)  # every side exact: the softmax's null direction stays
    with pytest.raises(NotPositiveDefiniteError, match="feature kernel"):
        TRAK(case.model, projector=projector).fit(case.data)
    calc = TRAK(case.model, projector=projector, relative_damping=1e-3).fit(case.data)
    F = case.model.to_numpy(
        projector.features(
            case.model, next(iter(case.model.batches(case.data, 64))), calc.measurement
        )
    )
    np.testing.assert_allclose(calc.dampings_[0], 1e-3 * np.trace(F.T @ F) / F.shape[1], rtol=1e-10)
    dense = TRAK(case.model, projection_dim=6, damping=0.1).fit(case.data)
    kept = dense._projectors[0]._kept
    dense.influence((case.X[:2], case.y[:2]))
    assert dense._projectors[0]._kept is kept  # the test side reuses the fitted matrix


def test_a_damaged_feature_chunk_is_recomputed_with_a_warning(tmp_path) -> None:
    from influence_core import ChunkRecomputedWarning

    case = build_case("torch", "mlp_tanh", "float64")
    settings = dict(projection_dim=6, damping=0.1, chunk_size=5, features_dir=tmp_path / "f")
    first = TRAK(case.model, **settings).fit(case.data)
    expected = case.model.to_numpy(first.self_influence())
    chunk = tmp_path / "f" / "checkpoint_000" / "chunk_000001.npz"
    chunk.write_bytes(chunk.read_bytes()[:-7] + b"damaged")
    with pytest.warns(ChunkRecomputedWarning, match="chunk_000001.npz does not match"):
        again = TRAK(case.model, **settings).fit(case.data)
    np.testing.assert_array_equal(case.model.to_numpy(again.self_influence()), expected)
