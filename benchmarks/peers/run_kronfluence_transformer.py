"""kronfluence's EK-FAC on the benchmarks' 5.2M transformer (its nn.Linear layers); runs in kronfluence's venv.

    benchmarks/.envs/kronfluence/bin/python benchmarks/peers/run_kronfluence_transformer.py \
        SETUP.npz OUT.npz

SETUP.npz holds the model's state (``state.<name>``) and the data
(``train_ids``, ``train_y``, ``test_ids``, ``test_y``) that
``bench_transformer.py --kronfluence`` wrote. kronfluence covers
``nn.Linear`` and ``nn.Conv2d`` only, so its answer is on the 25 dense layers
(the token and positional tables and the LayerNorms are left out). Float32,
empirical Fisher, damping 1e-3 (absolute, as ours), batch 32, 2 threads.
Writes pairwise scores, self-influence, the seconds of fit, pairwise and
self, and the peak RSS.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from run_kronfluence_spec import run_and_save  # the same task and calls: empirical Fisher
from transformer_model import from_setup

BATCH, DAMPING = 32, 1e-3


def main(setup_path: str, out_path: str) -> None:
    torch.set_num_threads(2)
    setup = np.load(setup_path)
    model = from_setup(setup)
    train = torch.utils.data.TensorDataset(
        torch.from_numpy(setup["train_ids"]), torch.from_numpy(setup["train_y"])
    )
    test = torch.utils.data.TensorDataset(
        torch.from_numpy(setup["test_ids"]), torch.from_numpy(setup["test_y"])
    )
    run_and_save(model, train, test, "ekfac", BATCH, BATCH, DAMPING, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
