"""Self-influence and RelatIF through an iterative solver are refused up front when too costly.

Each training batch is one block solve, so CG costs d × n_train × maxiter × n_fit
multiply-adds: on the 0.1M-parameter MLP with 2,000 points it ran past 15
minutes. The estimate is checked here against its formula on the digits problem
(d = 650, n = 300): CG at maxiter = 50 is 650 × 300 × 50 × 300 = 2.9e9.
"""

from __future__ import annotations

import numpy as np
import pytest
from digits_problem import MU, digits_model, problem

from influence_core import (
    ArnoldiIHVP,
    ConjugateGradientIHVP,
    CostLimitError,
    ExactIHVP,
    FirstOrderInfluenceCalculator,
    LissaIHVP,
    run_self_influence,
)

N = 300


@pytest.fixture(scope="module")
def data():
    p = problem()
    return digits_model("torch"), (p["X"][:N], p["y"][:N]), (p["X_test"][:3], p["y_test"][:3])


def test_cg_self_influence_over_its_limit_is_refused_with_the_estimate(data) -> None:
    model, train, _ = data
    calc = FirstOrderInfluenceCalculator(
        model, ConjugateGradientIHVP(damping=MU, maxiter=50, per_point_limit=1e9)
    ).fit(train)
    with pytest.raises(CostLimitError) as raised:
        calc.self_influence()
    message = str(raised.value)
    assert "2.9e+09" in message, message  # 650 × 300 × 50 × 300
    assert "EKFACIHVP" in message and "per_point_limit=None" in message
    assert "maxiter=50" in message
    with pytest.raises(CostLimitError):
        calc.influence_and_self_influence(data[2])


def test_the_estimate_is_d_times_points_times_samples_per_solve(data) -> None:
    model, train, _ = data
    cg = ConjugateGradientIHVP(damping=MU, maxiter=50, per_point_limit=650 * N * 50 * N)
    FirstOrderInfluenceCalculator(model, cg).fit(train)
    assert cg.samples_per_solve() == 50 * N
    cg.check_per_point_solves(N, "self-influence")  # at the limit: allowed
    with pytest.raises(CostLimitError):
        cg.check_per_point_solves(N + 1, "self-influence")
    lissa = LissaIHVP(damping=MU, depth=10, batch_size=32, tol=None)
    FirstOrderInfluenceCalculator(model, lissa).fit(train)
    assert lissa.samples_per_solve() == 10 * 32


def test_under_the_limit_or_without_it_self_influence_runs(data) -> None:
    model, train, _ = data
    limited = FirstOrderInfluenceCalculator(
        model, ConjugateGradientIHVP(damping=MU, maxiter=50, tol=1e-10, per_point_limit=None)
    ).fit(train)
    exact = FirstOrderInfluenceCalculator(model, ExactIHVP(damping=MU)).fit(train)
    np.testing.assert_allclose(
        model.to_numpy(limited.self_influence()), model.to_numpy(exact.self_influence()), rtol=1e-8
    )
    # Factored solvers are products per batch: never refused, whatever the limit.
    assert ExactIHVP().samples_per_solve() is None
    assert ArnoldiIHVP(rank=5).samples_per_solve() is None


def test_relatif_scores_through_cg_are_refused_but_plain_scores_are_not(data) -> None:
    model, train, test = data
    solver = ConjugateGradientIHVP(damping=MU, maxiter=50, per_point_limit=1e9)
    relatif = FirstOrderInfluenceCalculator(model, solver, normalize=True).fit(train)
    with pytest.raises(CostLimitError, match="RelatIF influence"):
        relatif.influence(test)
    with pytest.raises(CostLimitError, match="RelatIF"):
        relatif.top_k(test, k=3)
    plain = FirstOrderInfluenceCalculator(model, solver).fit(train)
    assert tuple(plain.influence(test).shape) == (3, N)


def test_a_chunked_run_is_judged_on_all_its_chunks(data, tmp_path) -> None:
    _, train, _ = data
    model = digits_model("torch", batch_size=50)  # chunks of 100 are two batches of 50
    # One chunk of 100 is 9.75e8 (under 1e9); the run of 300 is 2.9e9.
    solver = ConjugateGradientIHVP(damping=MU, maxiter=50, per_point_limit=1e9)
    calc = FirstOrderInfluenceCalculator(model, solver).fit(train)
    solver.check_per_point_solves(100, "self-influence")  # a chunk alone would pass
    with pytest.raises(CostLimitError):
        run_self_influence(calc, tmp_path / "run", chunk_size=100)
    assert not (tmp_path / "run" / "metadata.json").exists()


def test_arnoldi_refuses_a_basis_over_its_memory_budget(data) -> None:
    model, train, _ = data
    need = 650 * (40 + 10 + ArnoldiIHVP.BLOCK) * 8  # d × (iterations + rank + block) × float64
    with pytest.raises(CostLimitError, match="memory_budget") as raised:
        ArnoldiIHVP(rank=10, iterations=40, memory_budget=need - 1).fit(model, train)
    assert "EKFACIHVP" in str(raised.value)
    fitted = ArnoldiIHVP(rank=10, iterations=40, memory_budget=need).fit(model, train)
    assert fitted.memory_bytes_ == need


def test_arnoldi_basis_in_blocks_equals_one_block(data) -> None:
    """Block Gram-Schmidt over blocks of 3 columns spans what blocks of 32 do."""

    class SmallBlocks(ArnoldiIHVP):
        BLOCK = 3

    model, train, _ = data
    one = ArnoldiIHVP(damping=MU, rank=10, iterations=20).fit(model, train)
    many = SmallBlocks(damping=MU, rank=10, iterations=20).fit(model, train)
    np.testing.assert_allclose(
        model.to_numpy(many.eigenvalues_), model.to_numpy(one.eigenvalues_), rtol=1e-9
    )
    u, v = model.to_numpy(one.eigenvectors_), model.to_numpy(many.eigenvectors_)
    np.testing.assert_allclose(np.abs(np.sum(u * v, axis=0)), 1.0, atol=1e-8)
