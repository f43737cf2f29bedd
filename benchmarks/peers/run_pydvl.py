"""pyDVL 0.10 on one workload (its own venv: it pins numpy < 2).

    run_pydvl.py WORKLOAD [REPEATS] [--per-vector]

``DirectInfluence`` (exact), ``CgInfluence``, ``LissaInfluence`` and
``ArnoldiInfluence`` on the same weights. pyDVL differentiates every parameter
with ``requires_grad``, so the first layer is frozen for the last-layer
workloads. CG runs pyDVL's block CG (``solve_simultaneously=True``), its fast
mode; ``--per-vector`` runs its default, one test point at a time. pyDVL has no
self-influence call: it is the diagonal of ``influences(x_train, y_train)``.
"""

from __future__ import annotations

import logging
import sys
import warnings

import pydvl
import torch
import torch_model
from common import (
    ARNOLDI_ITERATIONS,
    ARNOLDI_RANK,
    CG_ITERATIONS,
    DAMPING,
    LISSA_DEPTH,
    LISSA_SCALE,
    WORKLOADS,
    load_setup,
    timed,
    unflatten,
    write,
)
from pydvl.influence.torch import ArnoldiInfluence, CgInfluence, DirectInfluence, LissaInfluence
from torch.utils.data import DataLoader, TensorDataset


def main(workload: str, repeats: int, per_vector: bool) -> None:
    logging.disable(logging.WARNING)  # pyDVL logs every CG that stops at maxiter
    s = load_setup(workload)
    kind = workload.split("_")[0]
    net = torch_model.build(unflatten(s["theta"]))
    if WORKLOADS[workload][1] == "last":
        for name, parameter in net.named_parameters():
            parameter.requires_grad_(name in torch_model.last_layer_names())
    loss = torch.nn.functional.cross_entropy
    X_train, y_train = torch.tensor(s["X_train"]), torch.tensor(s["y_train"])
    X_test, y_test = torch.tensor(s["X_test"]), torch.tensor(s["y_test"])
    # One batch: LiSSA then runs full-batch like every other library here.
    batch = len(y_train) if kind == "lissa" else 256
    train = DataLoader(TensorDataset(X_train, y_train), batch_size=batch)

    def run():
        if kind == "exact":
            model = DirectInfluence(net, loss, regularization=DAMPING)
        elif kind == "cg":
            model = CgInfluence(
                net,
                loss,
                regularization=DAMPING,
                rtol=0.0,
                atol=0.0,
                maxiter=CG_ITERATIONS,
                solve_simultaneously=not per_vector,
                warn_on_max_iteration=False,
            )
        elif kind == "lissa":
            model = LissaInfluence(
                net,
                loss,
                regularization=DAMPING,
                maxiter=LISSA_DEPTH,
                dampen=0.0,
                scale=LISSA_SCALE,
                rtol=0.0,
                warn_on_max_iteration=False,
            )
        else:
            model = ArnoldiInfluence(
                net,
                loss,
                regularization=DAMPING,
                rank=ARNOLDI_RANK,
                krylov_dimension=ARNOLDI_ITERATIONS,
            )
        model = model.fit(train)
        out = {"scores": model.influences(X_test, y_test, X_train, y_train).detach().numpy()}
        if kind in ("exact", "arnoldi"):
            out["self"] = torch.diagonal(model.influences(X_train, y_train)).detach().numpy()
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times, scores = timed(run, repeats)
    library = f"pyDVL {pydvl.__version__}" + (" (per vector)" if per_vector else "")
    note = "block CG (solve_simultaneously)" if kind == "cg" and not per_vector else ""
    write(library, "torch", workload, times, scores, note)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    main(args[0], int(args[1]) if len(args) > 1 else 3, "--per-vector" in sys.argv)
