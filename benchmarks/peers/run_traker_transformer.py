"""traker's TRAK on the benchmarks' 5.2M transformer (all parameters); runs in traker's venv.

    benchmarks/.envs/traker/bin/python benchmarks/peers/run_traker_transformer.py \
        SETUP.npz OUT.npz

SETUP.npz holds the model's state (``state.<name>``), the data
(``train_ids``, ``train_y``, ``test_ids``, ``test_y``), ``k`` and
``batch_size``, as ``bench_transformer.py --trak`` wrote them. traker's own
CPU projector (``BasicProjector``: a Gaussian matrix redrawn at every call in
blocks of 100 columns), float32, λ = 0, the margin; 2 threads. Writes the
scores, the seconds of featurising and of scoring, and the peak RSS.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from run_traker_spec import save_result, trak_scores  # the same TRAKer calls as the specs
from transformer_model import from_setup


def main(setup_path: str, out_path: str) -> None:
    torch.set_num_threads(2)
    setup = np.load(setup_path)
    model = from_setup(setup)
    scores, featurise, score = trak_scores(
        model,
        [model.state_dict()],
        setup["train_ids"],
        setup["train_y"],
        setup["test_ids"],
        setup["test_y"],
        int(setup["k"]),
        int(setup["batch_size"]),
    )
    save_result(out_path, scores, featurise, score)


if __name__ == "__main__":
    main(*sys.argv[1:3])
