"""LiSSA over any dataset type: full mini-batches, honest advice, and a warning when it is off (fault 5).

Softmax regression on 130 standardised wine samples (13 features, 3 classes,
d = 42), trained to convergence with L2 μ; LiSSA runs with damping μ. Batches
of 64 from a ``DataLoader`` are 64 + 64 + 2: the partial last batch used to
count as much as a full one (14 % off exact, where arrays were 0.4 % off).
"""

from __future__ import annotations

import warnings
from functools import cache

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from sklearn.datasets import load_wine

from influence_core import (
    ConvergenceWarning,
    ExactIHVP,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
    LissaDivergenceError,
    LissaIHVP,
)

MU = 1e-2


@cache
def wine() -> dict:
    X, y = load_wine(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    order = np.random.default_rng(0).permutation(len(X))
    X, y = X[order], y[order]
    net = torch.nn.Linear(13, 3).double()
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    Xt, yt = torch.tensor(X[:130]), torch.tensor(y[:130])

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        with torch.no_grad():
            net.weight.copy_(torch.tensor(theta[:39].reshape(3, 13)))
            net.bias.copy_(torch.tensor(theta[39:]))
        net.zero_grad()
        value = loss(net(Xt), yt).mean() + 0.5 * MU * sum((p**2).sum() for p in net.parameters())
        value.backward()
        return value.item(), np.concatenate([p.grad.numpy().ravel() for p in net.parameters()])

    theta = minimize(
        objective, np.zeros(42), jac=True, method="L-BFGS-B", options={"gtol": 1e-10}
    ).x
    objective(theta)
    model = InfluenceModel(net, loss)
    train, test = (X[:130], y[:130]), (X[130:140], y[130:140])
    exact = FirstOrderInfluenceCalculator(model, ExactIHVP(damping=MU)).fit(train).influence(test)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(Xt, yt), batch_size=64)
    return {"model": model, "train": train, "test": test, "exact": exact.numpy(), "loader": loader}


def error(data, **settings) -> float:
    w = wine()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        solver = LissaIHVP(damping=MU, batch_size=64, **settings)
        scores = FirstOrderInfluenceCalculator(w["model"], solver).fit(data).influence(w["test"])
    return float(np.abs(scores.numpy() - w["exact"]).max() / np.abs(w["exact"]).max())


def test_a_dataloader_with_a_partial_last_batch_is_as_good_as_arrays() -> None:
    w = wine()
    arrays = error(w["train"], scale=3.0, depth=2000)
    loader = error(w["loader"], scale=3.0, depth=2000)
    print(f"LiSSA depth 2000 off exact by {arrays:.2%} over arrays, {loader:.2%} over a DataLoader")
    assert arrays < 0.01
    assert loader < 0.02


def test_batch_size_is_honoured_for_a_dataloader() -> None:
    w = wine()
    sizes = []
    kernels = w["model"].kernels
    original = kernels.mean_loss_hvp

    def recording(inputs, targets, vectors):
        sizes.append(int(targets.shape[0]))
        return original(inputs, targets, vectors)

    kernels.mean_loss_hvp = recording
    try:
        solver = LissaIHVP(
            damping=MU, batch_size=50, scale=3.0, depth=20, tol=None, curvature="hessian"
        )
        FirstOrderInfluenceCalculator(w["model"], solver).fit(w["loader"]).influence(w["test"])
    finally:
        del kernels.mean_loss_hvp
    assert set(sizes) == {50}  # the loader's 64 + 64 + 2 re-cut into full batches of 50


def test_the_divergence_advice_names_the_minibatch_eigenvalue_and_a_scale_that_works() -> None:
    w = wine()
    full = float(np.linalg.eigvalsh(w["model"].hessian(w["train"]).numpy()).max()) + MU
    scale = 1.5 * full  # above the whole data's λ_max, below single samples'
    solver = LissaIHVP(damping=MU, batch_size=1, scale=scale, depth=3000)
    with pytest.raises(LissaDivergenceError) as info:
        FirstOrderInfluenceCalculator(w["model"], solver).fit(w["train"]).influence(w["test"])
    message = str(info.value)
    assert "mini-batch" in message and info.value.largest_batch_eigenvalue > scale
    suggested = float(message.split("Use scale=")[1].split(" ")[0])
    assert suggested > info.value.largest_batch_eigenvalue  # the advice is above what diverged
    assert np.isfinite(error(w["train"], scale=suggested, depth=50))  # raises no divergence


def test_lissa_warns_when_its_own_residual_says_it_is_off() -> None:
    w = wine()
    solver = LissaIHVP(damping=MU, scale=3.0, depth=100)
    with pytest.warns(ConvergenceWarning, match="relative residual"):
        FirstOrderInfluenceCalculator(w["model"], solver).fit(w["train"]).influence(w["test"])
    assert solver.residuals_.max() > 0.1 and error(w["train"], scale=3.0, depth=100) > 0.05
    good = LissaIHVP(damping=MU, scale=3.0, depth=2000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        FirstOrderInfluenceCalculator(w["model"], good).fit(w["train"]).influence(w["test"])
    assert good.residuals_.max() < 0.1
