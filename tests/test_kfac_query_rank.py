"""EK-FAC's low-rank query side: the rank-r SVD of each solved test layer matrix, scored unformed.

Reference: the whole solver's solved test matrices P, truncated to rank r by
NumPy's SVD and scored through the whole path. The low-rank solver must give
the same scores (it never forms P_r), record the truncation error
(Σ_{j>r} σ_j² / Σ σ_j²)^{1/2}, and stay within the Cauchy–Schwarz bound
Σ_l ‖G_l‖_F ‖P_l − P_r,l‖_F of the whole scores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influence_conformance.cases import build_case
from influence_core import EKFACIHVP, KFACIHVP, FirstOrderInfluenceCalculator
from influence_core.layerwise import layer_gradient_matrices


def truncated(matrices: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    u, s, vt = np.linalg.svd(matrices, full_matrices=False)
    kept = (u[:, :, :rank] * s[:, None, :rank]) @ vt[:, :rank, :]
    error = np.sqrt((s[:, rank:] ** 2).sum(axis=1) / (s**2).sum(axis=1))
    return kept, error


@pytest.mark.parametrize("solver", [EKFACIHVP, KFACIHVP])
@pytest.mark.parametrize("rank", [1, 2])
def test_low_rank_scores_equal_the_truncated_whole_scores(solver, rank: int) -> None:
    case = build_case("torch", "convnet", "float64")  # a conv layer (T > 1) and a dense one
    model, test = case.model, (case.X[:4], case.y[:4])
    whole = FirstOrderInfluenceCalculator(model, solver(seed=1)).fit(case.data)
    low = FirstOrderInfluenceCalculator(model, solver(seed=1, query_rank=rank)).fit(case.data)
    ranks = low.ihvp.query_ranks()
    assert any(r is not None for r in ranks), ranks  # the test exercises the low-rank path

    P = model.to_numpy(whole.prepare_test(test))  # (d, 4), layer after layer
    sizes = [block.rows * block.layer.outputs for block in whole.ihvp.blocks_]
    starts = np.cumsum([0, *sizes])
    pieces, errors = [], []
    for block, r, start in zip(whole.ihvp.blocks_, ranks, starts, strict=False):
        layer = P[start : start + block.rows * block.layer.outputs]
        layer = layer.T.reshape(4, block.rows, block.layer.outputs)
        if r is not None:
            layer, error = truncated(layer, r)
            errors.append(float(error.max()))
        else:
            errors.append(0.0)
        pieces.append(layer.reshape(4, -1).T)
    reference = whole.influence_from_prepared(torch.from_numpy(np.concatenate(pieces)))

    scores = low.influence(test)
    assert float((scores - reference).abs().max() / reference.abs().max()) < 1e-11
    np.testing.assert_allclose(low.ihvp.query_truncation_, errors, rtol=1e-9, atol=1e-12)
    assert max(errors) > 1e-3  # rank 1 and 2 really truncate here

    # The bound on the error of every score, from the layers' gradient norms.
    exact = whole.influence(test)
    train_batch = next(iter(model.batches(case.data, len(case.y))))
    stats = model.kernels.layer_statistics(train_batch.inputs, train_batch.targets)
    bound = 0.0
    for block, err, start, size in zip(whole.ihvp.blocks_, errors, starts, sizes, strict=False):
        (G,) = layer_gradient_matrices(model.xp, [block], stats)
        g_norm = torch.linalg.norm(G.reshape(len(G), -1), dim=1).numpy()
        p_norm = np.linalg.norm(P[start : start + size], axis=0)
        bound = bound + np.outer(p_norm * err, g_norm)
    assert np.all((scores - exact).abs().numpy() <= bound * (1 + 1e-9) + 1e-15)


def test_low_rank_with_the_full_rank_equals_whole() -> None:
    case = build_case("torch", "convnet", "float64")
    model, test = case.model, (case.X[:3], case.y[:3])
    whole = FirstOrderInfluenceCalculator(model, EKFACIHVP(seed=1)).fit(case.data)
    full = FirstOrderInfluenceCalculator(model, EKFACIHVP(seed=1, query_rank=10_000))
    full.fit(case.data)
    assert all(r is None for r in full.ihvp.query_ranks())  # r (p + o) ≥ p o: kept whole
    assert torch.equal(full.influence(test), whole.influence(test))


def test_query_rank_is_validated_and_the_flat_train_side_refused() -> None:
    with pytest.raises(ValueError, match="query_rank"):
        EKFACIHVP(query_rank=0)
    case = build_case("torch", "convnet", "float64")
    solver = EKFACIHVP(query_rank=1).fit(case.model, case.data)
    with pytest.raises(ValueError, match="training_side"):
        solver.train_side(case.model.per_sample_grads((case.X[:2], case.y[:2])))
    assert solver.get_params()["query_rank"] == 1


def test_a_large_layer_takes_the_randomized_range_finder_near_the_optimum() -> None:
    """min(p, o) > 2 (r + 10): randomized; its recorded error is exact and near the SVD's."""
    from influence_core import InfluenceModel
    from influence_core.ihvp.kfac import _low_rank

    model = InfluenceModel(torch.nn.Linear(3, 2).double(), torch.nn.MSELoss(reduction="none"))
    rng = np.random.default_rng(1)
    decay = np.exp(-0.15 * np.arange(40))  # a decaying spectrum, as solved gradients have
    host = np.stack(
        [
            np.linalg.qr(rng.normal(size=(65, 40)))[0]
            * decay
            @ np.linalg.qr(rng.normal(size=(48, 40)))[0].T
            for _ in range(11)  # more than one chunk of 8
        ]
    )
    left, right, error = _low_rank(model, torch.from_numpy(host), 3)
    approx = (left @ right).numpy()
    assert left.shape == (11, 65, 3) and right.shape == (11, 3, 48)
    actual = np.linalg.norm(host - approx, axis=(1, 2)) / np.linalg.norm(host, axis=(1, 2))
    assert error == pytest.approx(actual.max(), rel=1e-9)
    _, optimal = truncated(host, 3)
    # Within 0.5 % of the optimum here; without the power iterations it is 3 % off.
    assert np.all(actual <= optimal * 1.005 + 1e-12), actual / optimal


def test_the_recorded_truncation_is_the_worst_over_every_test_batch() -> None:
    """Seven test points in batches of three: the record is not the last batch's alone."""
    case = build_case("torch", "convnet", "float64")
    model, test = case.model, (case.X[:7], case.y[:7])
    whole = FirstOrderInfluenceCalculator(model, EKFACIHVP(seed=1), batch_size=3).fit(case.data)
    low = FirstOrderInfluenceCalculator(model, EKFACIHVP(seed=1, query_rank=1), batch_size=3).fit(
        case.data
    )
    low.influence(test)
    P = model.to_numpy(whole.prepare_test(test))
    sizes = [block.rows * block.layer.outputs for block in whole.ihvp.blocks_]
    expected = []
    for block, r, start in zip(
        whole.ihvp.blocks_, low.ihvp.query_ranks(), np.cumsum([0, *sizes]), strict=False
    ):
        layer = P[start : start + block.rows * block.layer.outputs].T.reshape(
            7, block.rows, block.layer.outputs
        )
        expected.append(0.0 if r is None else float(truncated(layer, r)[1].max()))
    np.testing.assert_allclose(low.ihvp.query_truncation_, expected, rtol=1e-9, atol=1e-12)
