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

import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from run_kronfluence import Classification  # the same task: empirical Fisher
from transformer_model import Transformer

BATCH, DAMPING = 32, 1e-3


def main(setup_path: str, out_path: str) -> None:
    torch.set_num_threads(2)
    setup = np.load(setup_path)
    model = Transformer().eval()
    state = {
        k[len("state.") :]: torch.from_numpy(setup[k]) for k in setup if k.startswith("state.")
    }
    model.load_state_dict(state)
    train = torch.utils.data.TensorDataset(
        torch.from_numpy(setup["train_ids"]), torch.from_numpy(setup["train_y"])
    )
    test = torch.utils.data.TensorDataset(
        torch.from_numpy(setup["test_ids"]), torch.from_numpy(setup["test_y"])
    )
    task = Classification()
    model = prepare_model(model, task)
    with tempfile.TemporaryDirectory() as output:
        analyzer = Analyzer("transformer", model=model, task=task, cpu=True, output_dir=output)
        factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
        score_args = ScoreArguments(damping_factor=DAMPING)
        began = time.perf_counter()
        analyzer.fit_all_factors(
            "ekfac",
            dataset=train,
            factor_args=factor_args,
            per_device_batch_size=BATCH,
            overwrite_output_dir=True,
        )
        fitted = time.perf_counter()
        analyzer.compute_pairwise_scores(
            "pairwise",
            factors_name="ekfac",
            query_dataset=test,
            train_dataset=train,
            per_device_query_batch_size=len(test),
            per_device_train_batch_size=BATCH,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        paired = time.perf_counter()
        analyzer.compute_self_scores(
            "self",
            factors_name="ekfac",
            train_dataset=train,
            per_device_train_batch_size=BATCH,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        done = time.perf_counter()
        pairwise = analyzer.load_pairwise_scores("pairwise")["all_modules"].double().numpy()
        own = analyzer.load_self_scores("self")["all_modules"].double().numpy()
    np.savez(
        out_path,
        pairwise=pairwise,
        self=own,
        seconds=np.array([fitted - began, paired - fitted, done - paired]),
        rss_gb=np.array(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20),
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
