"""dattri 0.3 on one workload (peer venv): ``run_dattri.py WORKLOAD [REPEATS]``."""

from __future__ import annotations

import sys
import warnings

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
    WORKLOADS,
    load_setup,
    timed,
    unflatten,
    write,
)
from dattri.algorithm.influence_function import (
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorExplicit,
    IFAttributorLiSSA,
)
from dattri.algorithm.tracin import TracInAttributor
from dattri.task import AttributionTask
from torch.utils.data import DataLoader, TensorDataset


def main(workload: str, repeats: int) -> None:
    s = load_setup(workload)
    net = torch_model.build(unflatten(s["theta"]))
    loss = torch.nn.CrossEntropyLoss()

    def loss_func(params, data):
        x, y = data  # .long(): dattri's LiSSA casts every tensor of a batch, labels too, to float
        return loss(torch.func.functional_call(net, params, (x,)), y.long())

    kind = workload.split("_")[0]
    # dattri's Arnoldi and LiSSA only run in float32 (its LiSSA casts each batch to float32).
    dtype = torch.float32 if kind in ("arnoldi", "lissa") else torch.float64
    net.to(dtype)

    def loader(X, y, batch_size=256):
        data = TensorDataset(torch.tensor(X, dtype=dtype), torch.tensor(y))
        return DataLoader(data, batch_size=batch_size, shuffle=False)

    train, test = loader(s["X_train"], s["y_train"]), loader(s["X_test"], s["y_test"])
    if kind == "lissa":  # dattri vmaps LiSSA over a test batch: 100 at once peaks at 23 GB
        test = loader(s["X_test"], s["y_test"], batch_size=25)
    # dattri's inverse-Hessian attributors sum one inverse per batch of the loader given
    # to cache(), Σ_b (H_b + λI)⁻¹ g, which is not (H + λI)⁻¹ g: pass the training set as
    # one batch. Its self_attribute also fails unless the whole set is one batch.
    train_whole = loader(s["X_train"], s["y_train"], batch_size=len(s["y_train"]))
    layers = torch_model.last_layer_names() if WORKLOADS[workload][1] == "last" else None

    def influence():
        task = AttributionTask(loss_func=loss_func, model=net, checkpoints=net.state_dict())
        if kind == "exact":
            attributor = IFAttributorExplicit(task, layer_name=layers, regularization=DAMPING)
        elif kind == "cg":
            attributor = IFAttributorCG(
                task, layer_name=layers, max_iter=CG_ITERATIONS, tol=0.0, regularization=DAMPING
            )
        elif kind == "lissa":
            # dattri's recursion x ← v + (1 − δ)x − Hx/s converges to s(H + δsI)⁻¹v: δ = λ/s.
            attributor = IFAttributorLiSSA(
                task,
                layer_name=layers,
                batch_size=len(s["y_train"]),
                recursion_depth=LISSA_DEPTH,
                damping=DAMPING / LISSA_SCALE,
                scaling=LISSA_SCALE,
            )
        else:
            attributor = IFAttributorArnoldi(
                task,
                layer_name=layers,
                proj_dim=ARNOLDI_RANK,
                max_iter=ARNOLDI_ITERATIONS,
                regularization=DAMPING,
            )
        attributor.cache(train_whole)
        out = {"scores": attributor.attribute(train, test).T.detach().numpy()}
        if kind in ("exact", "arnoldi"):
            out["self"] = attributor.self_attribute(train_whole).detach().numpy()
        return out

    checkpoints = [torch_model.state_dict(unflatten(t)) for t in s["checkpoints"]]

    def tracin():
        task = AttributionTask(loss_func=loss_func, model=net, checkpoints=checkpoints)
        attributor = TracInAttributor(
            task,
            weight_list=torch.full((len(checkpoints),), CHECKPOINT_RATE, dtype=torch.float64),
            normalized_grad=False,
            layer_name=layers,
        )
        # dattri 0.3 projects the gradients randomly even when projector_kwargs is None (its
        # defaults replace None): unset them after construction for the exact TracInCP.
        attributor.projector_kwargs = None
        return {
            "scores": attributor.attribute(train, test).T.detach().numpy(),
            "self": attributor.self_attribute(train_whole).detach().numpy(),
        }

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times, scores = timed(tracin if kind == "tracin" else influence, repeats)
    note = "float32: dattri's Arnoldi and LiSSA fail in float64" if dtype == torch.float32 else ""
    write(
        "dattri 0.3.0",
        "torch",
        workload,
        times,
        {k: np.asarray(v) for k, v in scores.items()},
        note,
    )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
