"""kronfluence's EK-FAC or K-FAC on a ``scale_specs`` model; runs in kronfluence's own venv.

    benchmarks/.envs/kronfluence/bin/python benchmarks/peers/run_kronfluence_spec.py \
        SPEC_NAME STRATEGY SETUP.npz OUT.npz

The torch network is built by the torch backend's reference-model builder
(loaded by file, so this venv needs only torch and numpy from this repo's
side), float32, empirical Fisher, the setup's damping. Writes pairwise scores,
self-influence, the seconds of fit, pairwise and self, and the peak RSS.
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
from run_kronfluence import Classification  # the same task: empirical Fisher
from spec_models import torch_model


def main(spec_name: str, strategy: str, setup_path: str, out_path: str) -> None:
    torch.set_num_threads(2)
    setup = np.load(setup_path)
    weights = [setup[f"w{i}"] for i in range(int(setup["count"]))]
    model = torch_model(spec_name, weights)
    train = torch.utils.data.TensorDataset(
        torch.from_numpy(setup["X_train"]), torch.from_numpy(setup["y_train"])
    )
    test = torch.utils.data.TensorDataset(
        torch.from_numpy(setup["X_test"]), torch.from_numpy(setup["y_test"])
    )
    batch, train_batch = int(setup["batch_size"]), int(setup["score_batch_size"])
    run_and_save(
        model, train, test, strategy, batch, train_batch, float(setup["damping"]), out_path
    )


def run_and_save(
    model: torch.nn.Module,
    train: torch.utils.data.Dataset,
    test: torch.utils.data.Dataset,
    strategy: str,
    batch: int,
    train_batch: int,
    damping: float,
    out_path: str,
) -> None:
    """kronfluence's fit, pairwise scores and self-influence (empirical Fisher), timed, to ``out_path``.

    Writes the pairwise scores, the self-influence, the seconds of fit,
    pairwise and self, and the peak RSS (``.npz``).
    """
    task = Classification()
    model = prepare_model(model, task)
    with tempfile.TemporaryDirectory() as output:
        analyzer = Analyzer("scale", model=model, task=task, cpu=True, output_dir=output)
        factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=True)
        score_args = ScoreArguments(damping_factor=damping)
        began = time.perf_counter()
        analyzer.fit_all_factors(
            strategy,
            dataset=train,
            factor_args=factor_args,
            per_device_batch_size=batch,
            overwrite_output_dir=True,
        )
        fitted = time.perf_counter()
        analyzer.compute_pairwise_scores(
            "pairwise",
            factors_name=strategy,
            query_dataset=test,
            train_dataset=train,
            per_device_query_batch_size=len(test),
            per_device_train_batch_size=train_batch,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        paired = time.perf_counter()
        analyzer.compute_self_scores(
            "self",
            factors_name=strategy,
            train_dataset=train,
            per_device_train_batch_size=train_batch,
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
    main(*sys.argv[1:5])
