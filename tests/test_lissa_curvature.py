"""LiSSA on the curvature it was given: its residual is measured on it, and negative
curvature (which no scale mends) is refused at the first divergence, not after restarts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influence_core import InfluenceModel, LissaIHVP, set_progress
from influence_core.errors import NotPositiveDefiniteError

set_progress(False)


@pytest.fixture(scope="module")
def untrained_tanh() -> tuple[InfluenceModel, tuple[torch.Tensor, torch.Tensor]]:
    """A tanh MLP at its initialisation: the Hessian is indefinite (λ_min ≈ −0.36), G is not."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()
    X = 2 * torch.randn(128, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (128,))
    model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=32)
    return model, (X, y)


def test_the_residual_is_that_of_the_gauss_newton_system_it_solved(untrained_tanh) -> None:
    model, data = untrained_tanh
    solver = LissaIHVP(damping=1e-2, depth=300, tol=10.0).fit(model, data)  # ggn, the default
    v = torch.randn(
        model.num_parameters, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    x = solver.solve(v)
    on_g = model.ggn_vp(data, x) + 1e-2 * x - v
    on_h = model.hvp(data, x) + 1e-2 * x - v
    expected = (on_g.norm(dim=0) / v.norm(dim=0)).numpy()
    np.testing.assert_allclose(solver.residuals_, expected, rtol=1e-10)
    other = (on_h.norm(dim=0) / v.norm(dim=0)).numpy()
    assert np.all(np.abs(other - expected) > 0.05 * expected)  # the Hessian's would differ


def test_negative_curvature_is_refused_at_the_first_divergence(untrained_tanh, monkeypatch) -> None:
    model, data = untrained_tanh
    smallest = float(torch.linalg.eigvalsh(torch.as_tensor(model.hessian(data)))[0])
    assert smallest + 1e-3 < -0.3
    recursions = []
    original = LissaIHVP._recursion
    monkeypatch.setattr(
        LissaIHVP,
        "_recursion",
        lambda self, v, s: recursions.append(s) or original(self, v, s),
    )
    solver = LissaIHVP(curvature="hessian", damping=1e-3, tol=None).fit(model, data)
    with pytest.raises(NotPositiveDefiniteError, match="no LiSSA scale mends") as caught:
        solver.solve(torch.ones(model.num_parameters, 1, dtype=torch.float64))
    assert len(recursions) == 1  # no 4x restarts
    # A Rayleigh quotient: an upper bound on λ_min, here within 10 % of it.
    assert smallest <= caught.value.smallest_eigenvalue < 0.9 * smallest
    assert caught.value.damping == 1e-3
