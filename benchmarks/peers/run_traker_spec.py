"""traker's TRAK on a ``scale_specs`` model; runs in traker's own venv.

    benchmarks/.envs/traker/bin/python benchmarks/peers/run_traker_spec.py \
        SPEC_NAME SETUP.npz OUT.npz [MATRICES.npz]

The setup holds the models of the ensemble (``m{s}_w{i}``: canonical weights
of model s), the data and k. With ``MATRICES.npz`` (``P{s}``, model s's
projection matrix in torch's parameter order) traker projects with those
matrices: the agreement run. Without it traker uses its own CPU projector
(``BasicProjector``, which redraws its matrix at every call): the speed run.
float32 throughout (``use_half_precision=False``), λ = 0, the margin of the
cross-entropy task. Writes the scores (n_test × n_train), the seconds of
featurising and of scoring, and the peak RSS.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from trak import TRAKer
from trak.projectors import AbstractProjector
from trak.utils import vectorize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spec_models import torch_model


class GivenMatrices(AbstractProjector):
    """A projector with fixed matrices, one per model id (traker accepts a user projector)."""

    def __init__(self, matrices: list[torch.Tensor]) -> None:
        grad_dim, proj_dim = matrices[0].shape
        super().__init__(grad_dim, proj_dim, 0, "normal", "cpu")
        self.matrices = matrices

    def project(self, grads, model_id: int) -> torch.Tensor:
        if isinstance(grads, dict):
            grads = vectorize(grads, device="cpu")
        return grads.to(torch.float32) @ self.matrices[model_id]

    def free_memory(self) -> None:
        pass


def batches(X, y, size: int):
    for start in range(0, len(X), size):
        yield [torch.as_tensor(X[start : start + size]), torch.as_tensor(y[start : start + size])]


def trak_scores(model, states, X, y, Xt, yt, k: int, size: int, projector=None):
    """traker's TRAK over the models ``states``: (scores (n_test, n_train), featurise s, score s)."""
    with tempfile.TemporaryDirectory() as save_dir:
        traker = TRAKer(
            model=model,
            task="image_classification",
            train_set_size=len(X),
            save_dir=save_dir,
            device="cpu",
            proj_dim=k,
            projector=projector,
            use_half_precision=False,
            proj_max_batch_size=size,
        )
        began = time.perf_counter()
        for s, state in enumerate(states):
            traker.load_checkpoint(state, model_id=s)
            for batch in batches(X, y, size):
                traker.featurize(batch=batch, num_samples=len(batch[0]))
        traker.finalize_features()
        featurised = time.perf_counter()
        for s, state in enumerate(states):
            traker.start_scoring_checkpoint(
                exp_name="test", checkpoint=state, model_id=s, num_targets=len(Xt)
            )
            for batch in batches(Xt, yt, size):
                traker.score(batch=batch, num_samples=len(batch[0]))
        scores = np.asarray(traker.finalize_scores(exp_name="test"), dtype=np.float64).T
    return scores, featurised - began, time.perf_counter() - featurised


def main(spec_name: str, setup_path: str, out_path: str, matrices_path: str | None = None) -> None:
    torch.set_num_threads(2)
    setup = np.load(setup_path)
    models, count = int(setup["models"]), int(setup["count"])
    states = [
        torch_model(spec_name, [setup[f"m{s}_w{i}"] for i in range(count)]).state_dict()
        for s in range(models)
    ]
    model = torch_model(spec_name, [setup[f"m0_w{i}"] for i in range(count)])
    projector = None
    if matrices_path:
        stored = np.load(matrices_path)
        projector = GivenMatrices([torch.from_numpy(stored[f"P{s}"]) for s in range(models)])
    scores, featurise, score = trak_scores(
        model,
        states,
        setup["X_train"],
        setup["y_train"],
        setup["X_test"],
        setup["y_test"],
        int(setup["k"]),
        int(setup["batch_size"]),
        projector,
    )
    save_result(out_path, scores, featurise, score)


def save_result(out_path: str, scores: np.ndarray, featurise: float, score: float) -> None:
    """The scores, the seconds of featurising and scoring, and this process's peak RSS (GB)."""
    np.savez(
        out_path,
        scores=scores,
        seconds=np.array([featurise, score]),
        rss_gb=np.array(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20),
    )


if __name__ == "__main__":
    main(*sys.argv[1:5])
