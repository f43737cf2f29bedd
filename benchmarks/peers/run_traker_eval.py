"""traker's TRAK on the digits evaluation's models; runs in traker's venv.

    benchmarks/.envs/traker/bin/python benchmarks/peers/run_traker_eval.py SETUP.npz OUT.npz

TRAK with 1 and 5 models, its CPU projector (``BasicProjector``), the setup's k,
float32 features (``use_half_precision=False``), the cross-entropy margin task.
Writes ``scores:<label>`` (n_test × n_train) and ``seconds:<label>``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_setup import network, states
from run_traker_spec import trak_scores


def main(setup_path: str, out_path: str) -> None:
    torch.set_num_threads(2)
    setup = np.load(setup_path)
    model = network(int(setup["hidden"])).float()
    X, y = torch.from_numpy(setup["X"]).float(), torch.from_numpy(setup["y"])
    Xt, yt = torch.from_numpy(setup["Xt"]).float(), torch.from_numpy(setup["yt"])

    def as_float(states_):
        return [{k: v.float() for k, v in s.items()} for s in states_]

    out, k = {}, int(setup["k"])
    for label, checkpoints in (
        (f"traker TRAK-1 (k = {k})", as_float(states(setup, "final"))),
        (f"traker TRAK-5 (k = {k})", as_float(states(setup, "ensemble"))),
    ):
        scores, featurise, score = trak_scores(model, checkpoints, X, y, Xt, yt, k, 250)
        out[f"scores:{label}"] = scores
        out[f"seconds:{label}"] = np.array(featurise + score)
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
