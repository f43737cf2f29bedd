"""K-FAC and EK-FAC on the digits MLP: leave-one-out retraining, exact Hessian and exact Gauss–Newton.

    .venv/bin/python benchmarks/ekfac_loo_mlp.py

The MLP of the representer tests (64-16-10, tanh; d = 1210), float64 torch,
trained on the first 1000 digits with mean cross-entropy + (μ/2)‖θ‖², μ = 1e-2,
by L-BFGS (gradient norm 2e-8 here). For 3 test points, the 20 training
points the exact-Hessian solver ranks most influential on each are removed
one at a time and the model retrained from θ̂ (warm start, as for a non-convex
model the LOO optimum is the one near θ̂); the predicted test-loss change is
score / n. Every solver is damped by μ, which makes its curvature that of the
training objective (EK-FAC/K-FAC: F̂ + μI). Prints each solver's LOO Pearson,
and its Pearson (all 3 × 1000 scores) with exact influence under the
Hessian and under the Gauss–Newton matrix.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.stats import pearsonr
from sklearn.datasets import load_digits
from torch.func import functional_call

from influence_core import (
    EKFACIHVP,
    KFACIHVP,
    ExactIHVP,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
    set_progress,
)

MU, N, TOP = 1e-2, 1000, 20
set_progress(False)
torch.manual_seed(0)
net = torch.nn.Sequential(
    torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10)
).double()
names = [name for name, _ in net.named_parameters()]
shapes = [p.shape for p in net.parameters()]
sizes = [p.numel() for p in net.parameters()]
X_all, y_all = load_digits(return_X_y=True)
X = torch.tensor(X_all[:N] / 16.0)
y = torch.tensor(y_all[:N])
X_test, y_test = torch.tensor(X_all[N : N + 3] / 16.0), torch.tensor(y_all[N : N + 3])


def unflatten(theta: torch.Tensor) -> dict[str, torch.Tensor]:
    return {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes, strict=True)}


def objective(theta: np.ndarray, Xs: torch.Tensor, ys: torch.Tensor) -> tuple[float, np.ndarray]:
    t = torch.tensor(theta, requires_grad=True)
    logits = functional_call(net, unflatten(t), (Xs,))
    loss = torch.nn.functional.cross_entropy(logits, ys) + 0.5 * MU * (t * t).sum()
    (grad,) = torch.autograd.grad(loss, t)
    return float(loss.detach()), grad.numpy()


def fit(Xs: torch.Tensor, ys: torch.Tensor, start: np.ndarray) -> np.ndarray:
    options = {"maxiter": 50000, "ftol": 0.0, "gtol": 1e-11, "maxcor": 50}
    return minimize(objective, start, args=(Xs, ys), jac=True, method="L-BFGS-B", options=options).x


def test_losses(theta: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = functional_call(net, unflatten(torch.tensor(theta)), (X_test,))
        return torch.nn.functional.cross_entropy(logits, y_test, reduction="none").numpy()


start = torch.cat([p.detach().ravel() for p in net.parameters()]).numpy()
theta = fit(X, y, start)
print(f"trained: gradient norm {np.linalg.norm(objective(theta, X, y)[1]):.1e}")
with torch.no_grad():
    for p, value in zip(net.parameters(), unflatten(torch.tensor(theta)).values(), strict=True):
        p.copy_(value)
model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=250)
train, test = (X, y), (X_test, y_test)

solvers = {
    "exact Hessian": ExactIHVP(damping=MU),
    "exact Gauss-Newton": ExactIHVP(damping=MU, curvature="ggn"),
    "EK-FAC, true Fisher": EKFACIHVP(damping=MU),
    "EK-FAC, empirical Fisher": EKFACIHVP(damping=MU, fisher="empirical"),
    "K-FAC, true Fisher": KFACIHVP(damping=MU),
}
scores, seconds = {}, {}
for name, solver in solvers.items():
    began = time.perf_counter()
    scores[name] = model.to_numpy(
        FirstOrderInfluenceCalculator(model, solver).fit(train).influence(test)
    )
    seconds[name] = time.perf_counter() - began

removed = {int(i) for t in range(3) for i in np.argsort(-np.abs(scores["exact Hessian"][t]))[:TOP]}
base = test_losses(theta)
began = time.perf_counter()
change = {}
for i in sorted(removed):
    keep = torch.arange(N) != i
    change[i] = test_losses(fit(X[keep], y[keep], theta)) - base
print(f"{len(removed)} retrainings in {time.perf_counter() - began:.0f} s")
pairs = [
    (t, int(i)) for t in range(3) for i in np.argsort(-np.abs(scores["exact Hessian"][t]))[:TOP]
]
actual = np.array([change[i][t] for t, i in pairs])
print(
    f"| solver | LOO Pearson ({len(pairs)} removals) | Pearson with exact Hessian | Pearson with exact GN | time (s) |"
)
print("|---|---:|---:|---:|---:|")
for name, s in scores.items():
    predicted = np.array([s[t, i] / N for t, i in pairs])
    r_loo = pearsonr(predicted, actual).statistic
    r_h = np.corrcoef(s.ravel(), scores["exact Hessian"].ravel())[0, 1]
    r_gn = np.corrcoef(s.ravel(), scores["exact Gauss-Newton"].ravel())[0, 1]
    print(f"| {name} | {r_loo:.3f} | {r_h:.4f} | {r_gn:.4f} | {seconds[name]:.2f} |")
