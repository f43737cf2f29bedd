"""captum 0.9 on one workload (peer venv): ``run_captum.py WORKLOAD [REPEATS]``.

captum's influence functions (``NaiveInfluenceFunction``: the explicit Hessian,
kept at full rank here so it is exact; ``ArnoldiInfluenceFunction``) and
``TracInCP``, each given its fastest documented settings: batches of 256 and
``sample_wise_grads_per_batch=True`` (per-sample gradients from hooks, not a
Python loop over samples, which is captum's default).
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch_model
from captum.influence import TracInCP
from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction
from captum.influence._core.influence_function import NaiveInfluenceFunction
from common import (
    ARNOLDI_ITERATIONS,
    ARNOLDI_RANK,
    CHECKPOINT_RATE,
    DAMPING,
    TOP_K,
    WORKLOADS,
    load_setup,
    timed,
    unflatten,
    write,
)
from torch.utils.data import DataLoader, TensorDataset

BATCH = 256


def main(workload: str, repeats: int) -> None:
    s = load_setup(workload)
    kind = workload.split("_")[0]
    net = torch_model.build(unflatten(s["theta"]))
    # captum selects layers by module name ("2" is the last nn.Linear), not by parameter.
    layers = ["2"] if WORKLOADS[workload][1] == "last" else None
    train = DataLoader(
        TensorDataset(torch.tensor(s["X_train"]), torch.tensor(s["y_train"])), batch_size=BATCH
    )
    test = (torch.tensor(s["X_test"]), torch.tensor(s["y_test"]))
    folder = Path(tempfile.mkdtemp(prefix="captum-checkpoints-"))

    def save(theta: np.ndarray, name: str) -> str:
        path = folder / name
        torch.save(torch_model.state_dict(unflatten(theta)), path)
        return str(path)

    def load(model: torch.nn.Module, path: str) -> float:  # returns the checkpoint's learning rate
        model.load_state_dict(torch.load(path, weights_only=True))
        return CHECKPOINT_RATE

    final = save(s["theta"], "final.pt")
    checkpoints = [save(theta, f"checkpoint-{i}.pt") for i, theta in enumerate(s["checkpoints"])]
    # captum's Hessian is the sum of its per-batch loss Hessians: with reduction "sum" that is
    # n·H exactly (with "mean" it depends on the batch sizes). So hessian_reg = n·λ, and its
    # scores g_testᵀ(nH + nλI)⁻¹g are multiplied by n to be on our scale.
    loss = torch.nn.CrossEntropyLoss(reduction="sum")
    n = len(s["y_train"])
    common = dict(
        checkpoints_load_func=load, layers=layers, loss_fn=loss, sample_wise_grads_per_batch=True
    )
    d = sum(p.numel() for n, p in net.named_parameters() if layers is None or n.startswith("2."))

    def influence_function():
        if kind == "arnoldi":
            calc = ArnoldiInfluenceFunction(
                net,
                train,
                final,
                projection_dim=ARNOLDI_RANK,
                arnoldi_dim=ARNOLDI_ITERATIONS,
                arnoldi_tol=0.0,
                hessian_reg=DAMPING * n,
                **common,
            )
        else:  # full rank: the exact (H + λI)⁻¹ (no eigenvalue falls below the tolerance)
            calc = NaiveInfluenceFunction(
                net, train, final, projection_dim=d, hessian_reg=DAMPING * n, **common
            )
        if kind == "topk":
            found = calc.influence(test, k=TOP_K, proponents=True)
            return {"indices": found.indices.numpy(), "topk": n * found.influence_scores.numpy()}
        return {
            "scores": n * calc.influence(test).detach().numpy(),
            "self": n * calc.self_influence().detach().numpy(),
        }

    def tracin():
        calc = TracInCP(net, train, checkpoints, **common)
        return {
            "scores": calc.influence(test).detach().numpy(),
            "self": calc.self_influence().detach().numpy(),
        }

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times, scores = timed(tracin if kind == "tracin" else influence_function, repeats)
    write("captum 0.9.0", "torch", workload, times, scores)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
