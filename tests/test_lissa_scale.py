"""LiSSA's default scale (``scale=None``): above every mini-batch's largest eigenvalue, at least 10."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influence_core import ExactIHVP, InfluenceModel, LissaIHVP, set_progress
from influence_core.errors import LissaDivergenceError
from influence_core.ihvp import LISSA_MIN_SCALE

set_progress(False)


def steep_case(spread: float) -> tuple[InfluenceModel, tuple[torch.Tensor, torch.Tensor]]:
    """Softmax regression on inputs of standard deviation ``spread``: λ_max grows as spread²."""
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 3).double()
    X = spread * torch.randn(256, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (256,))
    return InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=64), (X, y)


def test_a_steep_loss_gets_a_scale_above_its_eigenvalues_and_converges() -> None:
    model, data = steep_case(20.0)
    exact = ExactIHVP(damping=0.5).fit(model, data)
    largest = 1.0 / float(torch.linalg.eigvalsh(exact.inverse_).min())  # λ_max(H + λI)
    assert largest > 2 * LISSA_MIN_SCALE  # the former fixed default, 10, diverges here
    with pytest.raises(LissaDivergenceError):
        LissaIHVP(damping=0.5, scale=LISSA_MIN_SCALE, tol=None).fit(model, data).solve(
            torch.ones(model.num_parameters, 1, dtype=torch.float64)
        )
    solver = LissaIHVP(damping=0.5, depth=3000, tol=None).fit(model, data)
    v = torch.randn(model.num_parameters, 2, dtype=torch.float64)
    got, expected = solver.solve(v), exact.solve(v)
    assert largest < solver.scale_ < 4 * largest  # chosen at the first solve
    assert float((got - expected).norm() / expected.norm()) < 0.05


def test_a_gentle_loss_keeps_the_former_scale() -> None:
    model, data = steep_case(0.5)
    solver = LissaIHVP(depth=50, tol=None).fit(model, data)
    assert solver.scale_ is None and solver.get_params()["scale"] is None  # nothing read yet
    v = torch.ones(model.num_parameters, 1, dtype=torch.float64)
    same = LissaIHVP(scale=LISSA_MIN_SCALE, depth=50, tol=None).fit(model, data)
    np.testing.assert_array_equal(same.solve(v).numpy(), solver.solve(v).numpy())
    assert solver.scale_ == LISSA_MIN_SCALE and LissaIHVP(scale=3.0).fit(model, data).scale_ == 3


def test_a_chosen_scale_that_misses_a_mini_batch_is_raised_and_the_solve_restarted(
    monkeypatch,
) -> None:
    """An estimate too low (here forced to 1, so the scale is 10 where λ_max is 25) costs a retry."""
    model, data = steep_case(20.0)
    monkeypatch.setattr(LissaIHVP, "_batch_eigenvalue", lambda self: 1.0)
    solver = LissaIHVP(damping=0.5, depth=3000, tol=None).fit(model, data)
    v = torch.randn(model.num_parameters, 2, dtype=torch.float64)
    got = solver.solve(v)
    assert solver.scale_ == 4 * LISSA_MIN_SCALE  # 10 diverged, 40 did not
    expected = ExactIHVP(damping=0.5).fit(model, data).solve(v)
    assert float((got - expected).norm() / expected.norm()) < 0.05
