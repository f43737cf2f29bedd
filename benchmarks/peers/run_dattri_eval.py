"""dattri's attributors on the digits evaluation's models; runs in the torch-peers venv.

    benchmarks/.envs/torch-peers/bin/python benchmarks/peers/run_dattri_eval.py SETUP.npz OUT.npz

Writes ``scores:<label>`` (n_test × n_train, positive = proponent: dattri's
own orientation, transposed) and ``seconds:<label>`` for: explicit-Hessian IF
(regularisation = the evaluation's damping), Grad-Dot and TracIn (dattri's
``TracInAttributor`` with its default projector settings), and TRAK with 1
and 5 models (the margin as target, the setup's k).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from dattri.algorithm.influence_function import IFAttributorExplicit
from dattri.algorithm.tracin import TracInAttributor
from dattri.algorithm.trak import TRAKAttributor
from dattri.task import AttributionTask
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_setup import network, states


def main(setup_path: str, out_path: str) -> None:
    torch.set_num_threads(2)
    setup = np.load(setup_path)
    model = network(int(setup["hidden"]))
    train = TensorDataset(torch.from_numpy(setup["X"]), torch.from_numpy(setup["y"]))
    test = TensorDataset(torch.from_numpy(setup["Xt"]), torch.from_numpy(setup["yt"]))
    train_loader = DataLoader(train, batch_size=250, shuffle=False)
    test_loader = DataLoader(test, batch_size=100, shuffle=False)

    def loss(params, data):
        x, y = data
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, params, x), y)

    def margin(params, data):
        x, y = data
        logp = -torch.nn.functional.cross_entropy(torch.func.functional_call(model, params, x), y)
        return logp - torch.log1p(-torch.exp(logp))

    def probability(params, data):
        x, y = data
        out = torch.func.functional_call(model, params, x.unsqueeze(0))
        return torch.exp(-torch.nn.functional.cross_entropy(out, y.unsqueeze(0)))

    final, ensemble, gd = states(setup, "final"), states(setup, "ensemble"), states(setup, "gd")
    rate, k = float(setup["gd_rate"]), int(setup["k"])
    runs = {
        "dattri IF explicit": lambda: IFAttributorExplicit(
            AttributionTask(loss, model, final[0]), regularization=float(setup["damping"])
        ),
        # dattri's TracIn projects to 512 whatever it is told (its default projector kwargs).
        "dattri Grad-Dot (its default projection)": lambda: TracInAttributor(
            AttributionTask(loss, model, final), torch.ones(1), normalized_grad=False
        ),
        "dattri TracIn (5 checkpoints, its default projection)": lambda: TracInAttributor(
            AttributionTask(loss, model, gd), torch.full((len(gd),), rate), normalized_grad=False
        ),
        f"dattri TRAK-1 (k = {k})": lambda: TRAKAttributor(
            AttributionTask(loss, model, final, target_func=margin),
            probability,
            projector_kwargs={"proj_dim": k, "device": "cpu"},
        ),
        f"dattri TRAK-5 (k = {k})": lambda: TRAKAttributor(
            AttributionTask(loss, model, ensemble, target_func=margin),
            probability,
            projector_kwargs={"proj_dim": k, "device": "cpu"},
        ),
    }
    out = {}
    for label, make in runs.items():
        began = time.perf_counter()
        attributor = make()
        if isinstance(attributor, TRAKAttributor):
            attributor.cache(train_loader)
            scores = attributor.attribute(test_loader)
        elif isinstance(attributor, TracInAttributor):
            scores = attributor.attribute(train_loader, test_loader)
        else:
            attributor.cache(train_loader)
            scores = attributor.attribute(train_loader, test_loader)
        out[f"seconds:{label}"] = np.array(time.perf_counter() - began)
        out[f"scores:{label}"] = np.asarray(scores.detach().double().numpy()).T
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
