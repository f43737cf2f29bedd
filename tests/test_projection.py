"""Seeded projectors: the matrix they define, blockwise drawing, Kronecker form, JL error."""

from __future__ import annotations

import numpy as np
import pytest

from influence_conformance.cases import build_case
from influence_core import GradientSimilarity, KroneckerProjection, RandomProjection, TracIn
from influence_core.layerwise import covering_layers
from influence_core.measurements import LOSS, margin
from influence_core.projection import GradientProjector


def canonical_grads(case, measurement=LOSS) -> np.ndarray:
    m = case.model
    batch = next(iter(m.batches(case.data, 64)))
    grads = m.to_numpy(m.batch_per_sample_grads(batch, measurement))
    return m.to_numpy(m.to_canonical(grads.T)).T


def one_batch(case):
    return next(iter(case.model.batches(case.data, 64)))


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
@pytest.mark.parametrize("kind", ["gaussian", "rademacher"])
def test_dense_projection_is_the_canonical_matrix_kept_or_drawn_in_slabs(
    backend: str, kind: str
) -> None:
    case = build_case(backend, "convnet", "float64")
    G = canonical_grads(case)
    d = case.model.num_parameters
    kept = RandomProjection(7, seed=3, kind=kind, block_rows=5)
    P = kept.matrix(d)
    expected = G @ P
    host = case.model.to_numpy
    np.testing.assert_allclose(
        host(kept.features(case.model, one_batch(case), LOSS)), expected, atol=1e-13
    )
    # Kept, but in slabs of canonical rows (too large to keep whole in the backend's layout).
    slabbed = RandomProjection(7, seed=3, kind=kind, block_rows=5, memory_budget=d * 7 * 8)
    assert slabbed.fits(case.model) and not slabbed._whole(case.model)
    np.testing.assert_allclose(
        host(slabbed.features(case.model, one_batch(case), LOSS)), expected, atol=1e-13
    )
    assert kept._whole(case.model)
    # A budget of 7 × 8 × 10 bytes holds 5 rows per slab: the d × k matrix is never whole.
    drawn = RandomProjection(7, seed=3, kind=kind, block_rows=5, memory_budget=7 * 8 * 10)
    assert not drawn.fits(case.model)
    np.testing.assert_allclose(
        host(drawn.features(case.model, one_batch(case), LOSS)), expected, atol=1e-13
    )
    assert drawn.largest_slab_rows_ == 5 < d
    # Any block can be drawn alone, and a slab is a slice of the whole.
    np.testing.assert_array_equal(kept.rows(3, 12), P[3:12])
    if kind == "rademacher":
        np.testing.assert_allclose(np.abs(P), 1 / np.sqrt(7))
    assert not np.allclose(RandomProjection(7, seed=4, kind=kind, block_rows=5).matrix(d), P)


def test_the_same_seed_projects_the_same_way_in_torch_and_tensorflow() -> None:
    features = {}
    for backend in ("torch", "tensorflow"):
        case = build_case(backend, "convnet", "float64")
        batch = one_batch(case)
        features[backend] = [
            case.model.to_numpy(p.features(case.model, batch, margin()))
            for p in (RandomProjection(9, seed=1), KroneckerProjection(3, 2, seed=1))
        ]
    for a, b in zip(features["torch"], features["tensorflow"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
@pytest.mark.parametrize("spec", ["mlp_tanh", "convnet"])
def test_kronecker_projection_is_p_in_kron_p_out_applied_to_each_layer_gradient(
    backend: str, spec: str
) -> None:
    case = build_case(backend, spec, "float64")
    projector = KroneckerProjection(3, 2, seed=1)
    for measurement in (LOSS, margin()):
        G = canonical_grads(case, measurement)
        blocks = sorted(covering_layers(case.model), key=lambda b: b.kernel_offset)
        expected = []
        for block, (p_in, p_out) in zip(blocks, projector.layer_matrices(case.model), strict=True):
            p, o = block.layer.inputs, block.layer.outputs
            layer = G[:, block.kernel_offset : block.kernel_offset + p * o].reshape(-1, p, o)
            if block.bias_offset is not None:
                bias = G[:, block.bias_offset : block.bias_offset + o]
                layer = np.concatenate([layer, bias[:, None, :]], axis=1)
            # vec(P_inᵀ G P_out) = (P_in ⊗ P_out)ᵀ vec(G), row-major
            expected.append(layer.reshape(len(G), -1) @ np.kron(p_in, p_out))
        expected = np.concatenate(expected, axis=1)
        got = case.model.to_numpy(projector.features(case.model, one_batch(case), measurement))
        assert got.shape == (len(G), projector.dim(case.model))
        np.testing.assert_allclose(got, expected, atol=1e-12 * np.abs(expected).max())


def test_a_kronecker_side_no_larger_than_its_k_is_exact() -> None:
    case = build_case("torch", "mlp_tanh", "float64")  # layers 5 × 8 and 9 × 3 (bias rows)
    projector = KroneckerProjection(16, 16)
    got = case.model.to_numpy(projector.features(case.model, one_batch(case), LOSS))
    G = canonical_grads(case)
    # Every side is kept: the features are the layer gradients themselves, reordered.
    assert got.shape == G.shape
    np.testing.assert_allclose(np.sort(np.abs(got), axis=1), np.sort(np.abs(G), axis=1), atol=1e-14)
    np.testing.assert_allclose(got @ got.T, G @ G.T, rtol=1e-12)


class Unscaled(GradientProjector):
    """A broken projector: the Gaussian entries are N(0, 1), not N(0, 1/k)."""

    def __init__(self, inner: RandomProjection) -> None:
        self.inner, self.seed = inner, inner.seed

    def features(self, model, batch, measurement):
        return self.inner.features(model, batch, measurement) * np.sqrt(self.inner.k)

    def dim(self, model):
        return self.inner.k

    def reseeded(self, seed):
        return Unscaled(self.inner.reseeded(seed))

    def get_params(self):
        return {}


def jl_check(case, make) -> tuple[float, float]:
    """(|mean over seeds of (Pᵀa)·(Pᵀb) − a·b| in standard errors, worst sd / JL bound)."""
    G = canonical_grads(case)
    a, b = G[0], G[1]
    batch = one_batch(case)
    dots = []
    for seed in range(300):
        f = case.model.to_numpy(make(seed).features(case.model, batch, LOSS))
        dots.append(f[0] @ f[1])
    dots = np.array(dots)
    k = make(0).dim(case.model)
    bound = np.sqrt(2.0 / k) * np.linalg.norm(a) * np.linalg.norm(b)
    return abs(dots.mean() - a @ b) / (dots.std() / np.sqrt(len(dots))), dots.std() / bound


def test_projected_dot_products_are_unbiased_within_the_johnson_lindenstrauss_bound() -> None:
    case = build_case("torch", "convnet", "float64")
    for make in (
        lambda s: RandomProjection(16, seed=s),
        lambda s: RandomProjection(16, seed=s, kind="rademacher"),
    ):
        bias, spread = jl_check(case, make)
        assert bias < 4.0 and spread < 1.2, (bias, spread)
    # Kronecker: unbiased too; its spread is larger (entries are not independent), so no bound.
    bias, _ = jl_check(case, lambda s: KroneckerProjection(4, 3, seed=s))
    assert bias < 4.0
    # The check fails a projector that forgets the 1/√k: its mean is k times a·b.
    bias, spread = jl_check(case, lambda s: Unscaled(RandomProjection(16, seed=s)))
    assert bias > 10.0 and spread > 10.0


def test_projected_estimators_score_with_the_projected_gradients() -> None:
    case = build_case("tensorflow", "convnet", "float64")
    test = (case.X[:3], case.y[:3])
    host = case.model.to_numpy
    projector = KroneckerProjection(3, 2, seed=2)
    F_train = host(projector.features(case.model, one_batch(case), LOSS))
    F_test = F_train[:3]
    tracin = TracIn(case.model, [case.model.kernels.save_state()], 0.5, projector=projector)
    np.testing.assert_allclose(
        host(tracin.fit(case.data).influence(test)), 0.5 * F_test @ F_train.T, rtol=1e-10
    )
    np.testing.assert_allclose(host(tracin.self_influence()), 0.5 * (F_train**2).sum(1), rtol=1e-10)
    np.testing.assert_allclose(
        host(tracin.group_influence(test, (case.X[:5], case.y[:5]))),
        0.5 * F_test @ F_train[:5].sum(0),
        rtol=1e-10,
    )
    cosine = GradientSimilarity(case.model, "cosine", projection_dim=5, seed=1).fit(case.data)
    G = canonical_grads(case) @ RandomProjection(5, seed=1).matrix(case.model.num_parameters)
    G /= np.linalg.norm(G, axis=1, keepdims=True)
    np.testing.assert_allclose(host(cosine.influence(test)), G[:3] @ G.T, rtol=1e-10)


def test_projection_arguments_are_checked() -> None:
    case = build_case("torch", "mlp_tanh", "float64")
    with pytest.raises(ValueError, match="positive"):
        RandomProjection(0)
    with pytest.raises(ValueError, match="gaussian"):
        RandomProjection(4, kind="sparse")
    with pytest.raises(ValueError, match="not both"):
        TracIn(case.model, [{}], 0.1, projection_dim=4, projector=RandomProjection(4))
    with pytest.raises(TypeError, match="GradientProjector"):
        GradientSimilarity(case.model, projector=np.eye(3))


def test_a_redrawn_matrix_is_drawn_once_for_many_batches_from_layer_statistics(
    monkeypatch,
) -> None:
    """TRAK's fit over 13 samples in batches of 3: one draw of P, not one per batch."""
    import influence_core.projection as projection
    from influence_core import TRAK

    case = build_case("torch", "convnet", "float64")
    model, d, k = case.model, case.model.num_parameters, 6
    draws = []
    real = projection._draw
    monkeypatch.setattr(
        projection, "_draw", lambda seed, *rest: draws.append(seed) or real(seed, *rest)
    )

    def trak(kept: bool, batch_size: int | None = None) -> np.ndarray:
        projector = RandomProjection(k, seed=4, block_rows=16)
        if not kept:  # as if d·k exceeded the budget (a tiny model's statistics would not fit one)
            monkeypatch.setattr(RandomProjection, "fits", lambda self, model: False)
        calc = TRAK(model, projector=projector, batch_size=batch_size)
        calc.fit(case.data)
        fitted = len(draws)
        scores = model.to_numpy(calc.influence((case.X[:5], case.y[:5])))
        return scores, fitted, len(draws) - fitted

    kept, fit_draws, test_draws = trak(True)
    blocks = -(-d // 16)
    assert (fit_draws, test_draws) == (blocks, 0)  # kept: drawn once
    draws.clear()
    redrawn, fit_draws, test_draws = trak(False, batch_size=3)  # redrawn at every call
    assert len(case.y) >= 4 * 3
    # the fit's one call and the test side's one call draw P once each, whatever the batches
    assert (fit_draws, test_draws) == (blocks, blocks)
    np.testing.assert_allclose(redrawn, kept, rtol=1e-9, atol=1e-12 * np.abs(kept).max())


def test_without_layer_statistics_a_redrawn_matrix_projects_batch_by_batch(monkeypatch) -> None:
    import influence_core.projection as projection

    case = build_case("torch", "convnet", "float64")
    d = case.model.num_parameters

    def unsupported(model):
        raise ValueError("no layers")

    monkeypatch.setattr(projection, "covering_layers", unsupported)
    drawn = RandomProjection(7, seed=3, block_rows=5, memory_budget=7 * 8 * 10)
    assert drawn.samples_per_call(case.model) == 0
    got = case.model.to_numpy(drawn.features(case.model, one_batch(case), LOSS))
    np.testing.assert_allclose(got, canonical_grads(case) @ drawn.matrix(d), atol=1e-13)
