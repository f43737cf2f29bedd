"""captum's TracInCP on a ``scale_specs`` model; runs in the torch-peers venv.

    benchmarks/.envs/torch-peers/bin/python benchmarks/peers/run_captum_tracin_spec.py \
        SPEC_NAME SETUP.npz OUT.npz

Its fastest documented settings (per-sample gradients from hooks,
``sample_wise_grads_per_batch=True``), all parameters, the setup's
checkpoints and rate: test × train scores and self-influence, float32.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from captum.influence import TracInCP
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spec_models import torch_model


def main(spec_name: str, setup_path: str, out_path: str) -> None:
    torch.set_num_threads(2)
    setup = np.load(setup_path)
    count, models = int(setup["count"]), int(setup["models"])
    rate = float(setup["rate"])
    folder = Path(tempfile.mkdtemp(prefix="captum-tracin-"))
    paths = []
    for s in range(models):
        net = torch_model(spec_name, [setup[f"m{s}_w{i}"] for i in range(count)])
        paths.append(str(folder / f"checkpoint-{s}.pt"))
        torch.save(net.state_dict(), paths[-1])
    net = torch_model(spec_name, [setup[f"m0_w{i}"] for i in range(count)])

    def load(model: torch.nn.Module, path: str) -> float:
        model.load_state_dict(torch.load(path, weights_only=True))
        return rate

    train = DataLoader(
        TensorDataset(torch.from_numpy(setup["X_train"]), torch.from_numpy(setup["y_train"])),
        batch_size=int(setup["batch_size"]),
    )
    test = (torch.from_numpy(setup["X_test"]), torch.from_numpy(setup["y_test"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        began = time.perf_counter()
        calc = TracInCP(
            net,
            train,
            paths,
            checkpoints_load_func=load,
            loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"),
            sample_wise_grads_per_batch=True,
        )
        scores = calc.influence(test).detach().double().numpy()
        own = calc.self_influence().detach().double().numpy()
        seconds = time.perf_counter() - began
    np.savez(
        out_path,
        scores=scores,
        self=own,
        seconds=np.array(seconds),
        rss_gb=np.array(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20),
    )


if __name__ == "__main__":
    main(*sys.argv[1:4])
