"""kronfluence's EK-FAC / K-FAC on the setup ``agree_ekfac.py`` wrote; runs in its own venv.

    benchmarks/.envs/kronfluence/bin/python benchmarks/peers/run_kronfluence.py SETUP.npz OUT.npz

The model is the torch MLP of the setup (float64), the Fisher empirical (the
training labels), and the damping the setup's, so the comparison is
deterministic. Writes pairwise scores (n_test, n_train), self-influence
(n_train,) and the seconds each strategy took.
"""

from __future__ import annotations

import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task


class Classification(Task):
    def compute_train_loss(self, batch, model, sample=False):
        inputs, labels = batch
        logits = model(inputs)
        if sample:  # never used here: the empirical Fisher
            with torch.no_grad():
                labels = torch.multinomial(torch.softmax(logits, -1), 1).flatten()
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch, model):
        inputs, labels = batch
        return F.cross_entropy(model(inputs), labels, reduction="sum")


def main(setup_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    setup = np.load(setup_path)
    hidden = int(setup["hidden"])
    model = torch.nn.Sequential(
        torch.nn.Linear(setup["X_train"].shape[1], hidden),
        torch.nn.Tanh(),
        torch.nn.Linear(hidden, 10),
    ).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.from_numpy(setup["W0"]))
        model[0].bias.copy_(torch.from_numpy(setup["b0"]))
        model[2].weight.copy_(torch.from_numpy(setup["W1"]))
        model[2].bias.copy_(torch.from_numpy(setup["b1"]))
    model.eval()
    train = torch.utils.data.TensorDataset(
        torch.from_numpy(setup["X_train"]), torch.from_numpy(setup["y_train"])
    )
    test = torch.utils.data.TensorDataset(
        torch.from_numpy(setup["X_test"]), torch.from_numpy(setup["y_test"])
    )
    task = Classification()
    model = prepare_model(model, task)
    results = {}
    with tempfile.TemporaryDirectory() as output:
        analyzer = Analyzer("agree", model=model, task=task, cpu=True, output_dir=output)
        for strategy in ("ekfac", "kfac"):
            dtype = torch.float64
            factor_args = FactorArguments(
                strategy=strategy,
                use_empirical_fisher=True,
                activation_covariance_dtype=dtype,
                gradient_covariance_dtype=dtype,
                eigendecomposition_dtype=dtype,
                lambda_dtype=dtype,
            )
            score_args = ScoreArguments(
                damping_factor=float(setup["damping"]),
                score_dtype=dtype,
                per_sample_gradient_dtype=dtype,
                precondition_dtype=dtype,
            )
            start = time.perf_counter()
            analyzer.fit_all_factors(
                strategy,
                dataset=train,
                factor_args=factor_args,
                per_device_batch_size=len(train),
                overwrite_output_dir=True,
            )
            analyzer.compute_pairwise_scores(
                f"{strategy}_pairwise",
                factors_name=strategy,
                query_dataset=test,
                train_dataset=train,
                per_device_query_batch_size=len(test),
                per_device_train_batch_size=len(train),
                score_args=score_args,
                overwrite_output_dir=True,
            )
            analyzer.compute_self_scores(
                f"{strategy}_self",
                factors_name=strategy,
                train_dataset=train,
                per_device_train_batch_size=len(train),
                score_args=score_args,
                overwrite_output_dir=True,
            )
            seconds = time.perf_counter() - start
            pairwise = analyzer.load_pairwise_scores(f"{strategy}_pairwise")["all_modules"]
            own = analyzer.load_self_scores(f"{strategy}_self")["all_modules"]
            results[f"{strategy}_pairwise"] = pairwise.double().numpy()
            results[f"{strategy}_self"] = own.double().numpy()
            results[f"{strategy}_seconds"] = np.array(seconds)
    np.savez(out_path, **results)


if __name__ == "__main__":
    main(*sys.argv[1:3])
