"""traker's TRAK on the digits evaluation's models; runs in traker's venv.

    benchmarks/.envs/traker/bin/python benchmarks/peers/run_traker_eval.py SETUP.npz OUT.npz

TRAK with 1 and 5 models, its CPU projector (``BasicProjector``), the setup's k,
float32 features (``use_half_precision=False``), the cross-entropy margin task.
Writes ``scores:<label>`` (n_test × n_train) and ``seconds:<label>``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from trak import TRAKer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_setup import network, states


def trak_scores(model, checkpoints, X, y, Xt, yt, k: int) -> np.ndarray:
    with tempfile.TemporaryDirectory() as save_dir:
        traker = TRAKer(
            model=model,
            task="image_classification",
            train_set_size=len(X),
            save_dir=save_dir,
            device="cpu",
            proj_dim=k,
            use_half_precision=False,
        )
        for s, state in enumerate(checkpoints):
            traker.load_checkpoint(state, model_id=s)
            for start in range(0, len(X), 250):
                batch = [X[start : start + 250], y[start : start + 250]]
                traker.featurize(batch=batch, num_samples=len(batch[0]))
        traker.finalize_features()
        for s, state in enumerate(checkpoints):
            traker.start_scoring_checkpoint(
                exp_name="test", checkpoint=state, model_id=s, num_targets=len(Xt)
            )
            traker.score(batch=[Xt, yt], num_samples=len(Xt))
        return np.asarray(traker.finalize_scores(exp_name="test"), np.float64).T


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
        began = time.perf_counter()
        out[f"scores:{label}"] = trak_scores(model, checkpoints, X, y, Xt, yt, k)
        out[f"seconds:{label}"] = np.array(time.perf_counter() - began)
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
