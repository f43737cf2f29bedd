"""Saved and resumed runs never mix: faults 1-4 of the trustworthy-results issue, one test each.

Each test names the fault it guards; each fails on the code before the fix
(resumes that mixed runs, fingerprints of θ only, batching-dependent data
fingerprints, raw errors from malformed metadata).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from digits_problem import MU, digits_model, problem

from influence_core import (
    ChunkRecomputedWarning,
    ConjugateGradientIHVP,
    ExactIHVP,
    FingerprintMismatchError,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
    ResultFileError,
    RunLockedError,
    load_result,
    run_self_influence,
    save_result,
)


def digits(n: int = 300):
    p = problem()
    return (p["X"][:n], p["y"][:n]), (p["X_test"], p["y_test"])


def calculator(model, solver=None):
    return FirstOrderInfluenceCalculator(model, solver or ExactIHVP(damping=MU), batch_size=50)


def two_layer_model():
    """A 64-16-10 MLP whose θ is its last layer, so a first-layer change is outside θ."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10)
    ).double()
    return net, InfluenceModel(
        net, torch.nn.CrossEntropyLoss(reduction="none"), parameters="2", batch_size=50
    )


# -- fault 1: a resumed run must be the same run -------------------------------------------
def test_fault1_resuming_with_other_settings_data_solver_or_weights_is_refused(
    tmp_path: Path,
) -> None:
    model = digits_model("torch", batch_size=50)
    train, _ = digits()
    run_self_influence(calculator(model).fit(train), tmp_path / "run", chunk_size=100)
    with pytest.raises(FingerprintMismatchError, match=r"ihvp.damping: 0\.01 → 10\.0"):
        run_self_influence(
            calculator(model, ExactIHVP(damping=10.0)).fit(train), tmp_path / "run", chunk_size=100
        )
    with pytest.raises(FingerprintMismatchError, match=r"ihvp.class: .ExactIHVP. → .Conjugate"):
        run_self_influence(
            calculator(model, ConjugateGradientIHVP(damping=MU)).fit(train),
            tmp_path / "run",
            chunk_size=100,
        )
    other = digits(299)[0]
    with pytest.raises(FingerprintMismatchError, match="different train"):
        run_self_influence(calculator(model).fit(other), tmp_path / "run", chunk_size=100)

    net, head = two_layer_model()
    data = (train[0].astype(np.float64), train[1])
    run_self_influence(calculator(head).fit(data), tmp_path / "head", chunk_size=100)
    with torch.no_grad():
        net[0].weight.mul_(1.5)  # outside θ, yet it changes every last-layer gradient
    with pytest.raises(FingerprintMismatchError, match="different weights_fingerprint"):
        run_self_influence(calculator(head).fit(data), tmp_path / "head", chunk_size=100)


def test_fault1_a_damaged_or_truncated_chunk_is_recomputed_with_a_warning(tmp_path: Path) -> None:
    model = digits_model("torch", batch_size=50)
    train, _ = digits()
    calc = calculator(model).fit(train)
    expected = model.to_numpy(calc.self_influence())
    run_self_influence(calc, tmp_path, chunk_size=100)
    chunks = sorted((tmp_path / "chunks").glob("chunk_*.npz"))
    flipped = bytearray(chunks[0].read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # one flipped bit… byte
    chunks[0].write_bytes(bytes(flipped))
    np.savez(chunks[1], values=np.zeros(7), start=np.array(100))  # 7 values instead of 100
    with pytest.warns(ChunkRecomputedWarning) as record:
        again = model.to_numpy(run_self_influence(calc, tmp_path, chunk_size=100))
    assert {w.message.args[0].split(" of ")[0] for w in record} == {"chunk 0", "chunk 1"}
    np.testing.assert_array_equal(again, expected)
    assert load_result(tmp_path).metadata["parameters"]["chunks_computed_by_the_last_call"] == 2


def test_fault1_a_second_writer_is_locked_out_and_a_stale_lock_taken_over(tmp_path: Path) -> None:
    model = digits_model("torch", batch_size=50)
    train, _ = digits()
    calc = calculator(model).fit(train)
    tmp_path.mkdir(exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": holder.pid, "host": os.uname().nodename}
        (tmp_path / "run.lock").write_text(json.dumps(lock))
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            run_self_influence(calc, tmp_path, chunk_size=100)
    finally:
        holder.kill()
        holder.wait()
    values = run_self_influence(calc, tmp_path, chunk_size=100)  # the holder is gone: stale
    assert values.shape == (300,) and not (tmp_path / "run.lock").exists()


# -- fault 2: the fingerprint covers every weight -----------------------------------------
def test_fault2_results_and_fitted_solvers_refuse_changed_weights_outside_theta(
    tmp_path: Path,
) -> None:
    net, head = two_layer_model()
    train = (digits()[0][0], digits()[0][1])
    calc = calculator(head).fit(train)
    save_result(tmp_path, {"v": calc.self_influence()}, method="m", model=head)
    with torch.no_grad():
        net[0].bias.add_(0.1)
    with pytest.raises(FingerprintMismatchError, match="other weights outside θ"):
        load_result(tmp_path, model=head)
    with pytest.raises(FingerprintMismatchError, match="other weights outside θ"):
        FirstOrderInfluenceCalculator(head, calc.ihvp).fit(train)


# -- fault 3: data fingerprints depend on the samples only ---------------------------------
def test_fault3_the_same_data_batched_otherwise_or_as_a_dataloader_is_accepted(
    tmp_path: Path,
) -> None:
    model = digits_model("torch", batch_size=50)
    train, _ = digits()
    save_result(tmp_path, {"v": np.zeros(3)}, method="m", model=model, data={"train": train})
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.tensor(train[0]), torch.tensor(train[1])),
        batch_size=64,
    )
    load_result(tmp_path, model=model, data={"train": train}, batch_size=7)
    load_result(tmp_path, model=model, data={"train": loader})
    calc = calculator(model).fit(train)
    first = run_self_influence(calc, tmp_path / "run", chunk_size=100)
    # The same run: accepted. Its chunks close on other batch boundaries (64, not 50), so
    # each is found not to fit and computed again, never mixed with the old ones.
    with pytest.warns(ChunkRecomputedWarning, match="was written for samples"):
        again = run_self_influence(calculator(model).fit(loader), tmp_path / "run", chunk_size=100)
    np.testing.assert_allclose(model.to_numpy(again), model.to_numpy(first), rtol=1e-12)


# -- fault 4: malformed metadata is a ResultFileError, and shapes are checked ---------------
@pytest.mark.parametrize(
    "edit",
    ["[]", "drop parameter_names", "drop data", "bad data record", "edit shapes"],
)
def test_fault4_malformed_metadata_is_a_result_file_error(tmp_path: Path, edit: str) -> None:
    model = digits_model("torch", batch_size=50)
    save_result(tmp_path, {"v": np.zeros(3)}, method="m", model=model, data={"train": digits()[0]})
    path = tmp_path / "metadata.json"
    meta = json.loads(path.read_text())
    if edit == "[]":
        path.write_text("[]")
    else:
        if edit.startswith("drop"):
            del meta[edit.split()[1]]
        elif edit == "bad data record":
            meta["data"]["train"] = "oops"
        else:
            meta["arrays"]["v"][0] = [4]
        path.write_text(json.dumps(meta))
    with pytest.raises(ResultFileError):
        load_result(tmp_path, model=model)
