"""Every estimator gives the same numbers through torch and TensorFlow on the same weights (float64)."""

from __future__ import annotations

import numpy as np
from digits_problem import MU, digits_model, problem

from influence_core import (
    ArnoldiIHVP,
    ArnoldiInfluenceCalculator,
    ExactIHVP,
    SecondOrderInfluenceCalculator,
    TracIn,
)


def relative_gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def results(backend: str) -> dict[str, np.ndarray]:
    p = problem()
    model = digits_model(backend, batch_size=1000)
    host = model.to_numpy
    train, test = (p["X"], p["y"]), (p["X_test"], p["y_test"])
    group = (p["X"][:120], p["y"][:120])
    second = SecondOrderInfluenceCalculator(model, ExactIHVP(damping=MU)).fit(train)
    # Arnoldi with a full Krylov space (iterations = d): the top 50 eigenpairs are then
    # determined up to rounding, so both frameworks keep the same subspace.
    arnoldi = ArnoldiInfluenceCalculator(
        model, ArnoldiIHVP(rank=50, iterations=650, damping=MU)
    ).fit(train)
    theta = host(model.get_parameters())
    with model.parameters_set_to(theta * 0.5):
        halfway = model.kernels.save_state()
    tracin = TracIn(model, [halfway, model.kernels.save_state()], [0.3, 0.1]).fit(train)
    # Seeded randomness is drawn in the canonical layout, so a partial Krylov space and a
    # random projection are the same in both frameworks too.
    partial = ArnoldiInfluenceCalculator(
        model, ArnoldiIHVP(rank=20, iterations=40, damping=MU, seed=3)
    ).fit(train)
    projected = TracIn(model, [model.kernels.save_state()], 0.1, projection_dim=64, seed=5)
    projected.fit(train)
    return {
        "second-order group influence": host(second.group_influence(test, group)),
        "arnoldi eigenvalues": host(arnoldi.ihvp.eigenvalues_),
        "arnoldi influence": host(arnoldi.influence(test)),
        "arnoldi self-influence": host(arnoldi.self_influence((p["X"][:100], p["y"][:100]))),
        "tracin influence": host(tracin.influence(test)),
        "tracin self-influence": host(tracin.self_influence()),
        "arnoldi rank 20 of 40 iterations, influence": host(partial.influence(test)),
        "tracin with a random projection, influence": host(projected.influence(test)),
    }


def test_estimators_agree_across_backends() -> None:
    torch_results, tf_results = results("torch"), results("tensorflow")
    gaps = {name: relative_gap(tf_results[name], value) for name, value in torch_results.items()}
    print({name: f"{gap:.1e}" for name, gap in gaps.items()})
    # Only layout-free quantities: θ's flat order differs (torch keeps W as (10, 64)).
    for name, gap in gaps.items():
        assert gap < 1e-8, f"{name}: {gap:.3g}"
    for name in (
        "arnoldi rank 20 of 40 iterations, influence",
        "tracin with a random projection, influence",
    ):
        assert gaps[name] < 1e-10, f"{name}: {gaps[name]:.3g}"
