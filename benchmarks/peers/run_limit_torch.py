"""The limit row in PyTorch: no library, just ``torch.func`` and ``torch.linalg`` (project venv).

    run_limit_torch.py WORKLOAD [REPEATS]

Every workload is the least work its answer needs, written by hand: one
``vmap(grad)`` pass over the data (in batches of 256, as the libraries use),
the Hessian as a whole (exact) or as batched HVPs (iterative), and dense
linear algebra. It is what a careful engineer would write for this one model.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch_model
from common import (
    ARNOLDI_ITERATIONS,
    ARNOLDI_RANK,
    CG_ITERATIONS,
    CHECKPOINT_RATE,
    DAMPING,
    LISSA_DEPTH,
    LISSA_SCALE,
    TOP_K,
    WORKLOADS,
    load_setup,
    timed,
    unflatten,
    write,
)
from torch.func import functional_call, grad, jvp, vmap

BATCH = 256


def main(workload: str, repeats: int) -> None:
    s = load_setup(workload)
    net = torch_model.build(unflatten(s["theta"]))
    kind, which = workload.split("_")[0], WORKLOADS[workload][1]
    names = (
        torch_model.last_layer_names()
        if which == "last"
        else [n for n, _ in net.named_parameters()]
    )
    X_train, y_train = torch.tensor(s["X_train"]), torch.tensor(s["y_train"])
    X_test, y_test = torch.tensor(s["X_test"]), torch.tensor(s["y_test"])

    def flat_state(state: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([state[n].reshape(-1) for n in names])

    def as_dict(theta: torch.Tensor, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        params, start = dict(base), 0
        for n in names:
            size = base[n].numel()
            params[n] = theta[start : start + size].reshape(base[n].shape)
            start += size
        return params

    def sample_loss(theta, base, x, y):
        logits = functional_call(net, as_dict(theta, base), (x[None],))
        return torch.nn.functional.cross_entropy(logits, y[None])

    def mean_loss(theta, base, x, y):
        logits = functional_call(net, as_dict(theta, base), (x,))
        return torch.nn.functional.cross_entropy(logits, y)

    per_sample = vmap(grad(sample_loss), in_dims=(None, None, 0, 0))

    def grads(theta, base, X, y):
        return torch.cat(
            [
                per_sample(theta, base, X[i : i + BATCH], y[i : i + BATCH])
                for i in range(0, len(y), BATCH)
            ]
        )

    def hvps(theta, base, V):  # (H + λI) V, H of the mean loss over all training data, V (d, m)
        def one(v):
            return jvp(lambda t: grad(mean_loss)(t, base, X_train, y_train), (theta,), (v,))[1]

        return vmap(one, in_dims=1, out_dims=1)(V) + DAMPING * V

    base = {k: v.detach() for k, v in net.state_dict().items()}
    theta = flat_state(base)

    def exact_inverse():
        H = torch.func.hessian(mean_loss)(theta, base, X_train, y_train)
        return torch.cholesky_inverse(
            torch.linalg.cholesky(H + DAMPING * torch.eye(len(theta), dtype=H.dtype))
        )

    def run_grads():
        return {"grads": grads(theta, base, X_train, y_train).numpy()}

    def run_exact():
        inverse = exact_inverse()
        G = grads(theta, base, X_train, y_train)
        S = grads(theta, base, X_test, y_test) @ inverse
        return {"scores": (S @ G.T).numpy(), "self": ((G @ inverse) * G).sum(1).numpy()}

    def run_topk():
        inverse = exact_inverse()
        S = grads(theta, base, X_test, y_test) @ inverse
        G = grads(theta, base, X_train, y_train)
        top = torch.topk(S @ G.T, TOP_K, dim=1)
        return {"indices": top.indices.numpy(), "topk": top.values.numpy()}

    def run_cg():
        B = grads(theta, base, X_test, y_test).T  # block CG, every test point at once
        x = torch.zeros_like(B)
        r = B.clone()
        p = r.clone()
        rr = (r * r).sum(0)
        for _ in range(CG_ITERATIONS):
            Ap = hvps(theta, base, p)
            alpha = rr / (p * Ap).sum(0)
            x, r = x + alpha * p, r - alpha * Ap
            rr_new = (r * r).sum(0)
            p, rr = r + (rr_new / rr) * p, rr_new
        return {"scores": (grads(theta, base, X_train, y_train) @ x).T.numpy()}

    def run_lissa():
        V = grads(theta, base, X_test, y_test).T
        x = V
        for _ in range(LISSA_DEPTH):
            x = V + x - hvps(theta, base, x) / LISSA_SCALE
        return {"scores": (grads(theta, base, X_train, y_train) @ (x / LISSA_SCALE)).T.numpy()}

    def run_arnoldi():
        # Arnoldi on H (undamped), the top-r Ritz pairs, then H⁻¹ ≈ U diag(1/(μ + λ)) Uᵀ.
        d = len(theta)
        Q = torch.zeros(d, ARNOLDI_ITERATIONS + 1, dtype=theta.dtype)
        Hess = torch.zeros(ARNOLDI_ITERATIONS + 1, ARNOLDI_ITERATIONS, dtype=theta.dtype)
        q = torch.ones(d, dtype=theta.dtype)
        Q[:, 0] = q / q.norm()
        for k in range(ARNOLDI_ITERATIONS):
            w = hvps(theta, base, Q[:, k : k + 1])[:, 0] - DAMPING * Q[:, k]
            h = Q[:, : k + 1].T @ w
            w = w - Q[:, : k + 1] @ h
            Hess[: k + 1, k], Hess[k + 1, k] = h, w.norm()
            Q[:, k + 1] = w / w.norm()
        small = Hess[:ARNOLDI_ITERATIONS, :ARNOLDI_ITERATIONS]
        mu, V = torch.linalg.eigh((small + small.T) / 2)
        mu, V = mu[-ARNOLDI_RANK:], V[:, -ARNOLDI_RANK:]
        P = Q[:, :ARNOLDI_ITERATIONS] @ V / torch.sqrt(mu + DAMPING)  # projections p = D^-1/2 Uᵀ g
        train_p = grads(theta, base, X_train, y_train) @ P
        test_p = grads(theta, base, X_test, y_test) @ P
        return {"scores": (test_p @ train_p.T).numpy(), "self": (train_p * train_p).sum(1).numpy()}

    checkpoints = [torch_model.state_dict(unflatten(t)) for t in s["checkpoints"]]

    def run_tracin():
        scores, self_ = 0.0, 0.0
        for state in checkpoints:
            c_theta = flat_state(state)
            G = grads(c_theta, state, X_train, y_train)
            T = grads(c_theta, state, X_test, y_test)
            scores = scores + CHECKPOINT_RATE * (T @ G.T)
            self_ = self_ + CHECKPOINT_RATE * (G * G).sum(1)
        return {"scores": scores.numpy(), "self": self_.numpy()}

    run = {
        "grads": run_grads,
        "exact": run_exact,
        "cg": run_cg,
        "lissa": run_lissa,
        "arnoldi": run_arnoldi,
        "tracin": run_tracin,
        "topk": run_topk,
    }[kind]
    with torch.no_grad():
        times, scores = timed(run, repeats)
    write("limit", "torch", workload, times, {k: np.asarray(v) for k, v in scores.items()})


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
