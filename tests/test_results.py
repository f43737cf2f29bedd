"""Saved results: round trips, refusals, chunked runs, and resuming a killed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from digits_problem import MU, digits_model, problem

from influence_core import (
    ExactIHVP,
    FingerprintMismatchError,
    FirstOrderInfluenceCalculator,
    ResultFileError,
    TracIn,
    load_result,
    run_influence,
    run_self_influence,
    run_top_k,
    save_result,
)

HERE = Path(__file__).parent


def setup(backend: str = "torch"):
    p = problem()
    model = digits_model(backend, batch_size=50)
    train, test = (p["X"][:300], p["y"][:300]), (p["X_test"], p["y_test"])
    calculator = FirstOrderInfluenceCalculator(model, ExactIHVP(damping=MU), batch_size=50).fit(
        train
    )
    return model, calculator, train, test


def test_save_and_load_round_trip_with_checks(tmp_path: Path) -> None:
    model, calculator, train, test = setup()
    scores = calculator.influence(test)
    save_result(
        tmp_path / "r",
        {"scores": scores},
        method="first_order",
        model=model,
        parameters={"damping": MU},
        data={"train": train, "test": test},
    )
    loaded = load_result(tmp_path / "r", model=model, data={"train": train, "test": test})
    np.testing.assert_array_equal(loaded.arrays["scores"], model.to_numpy(scores))
    meta = loaded.metadata
    assert meta["method"] == "first_order" and meta["parameters"] == {"damping": MU}
    assert meta["data"]["train"]["n"] == 300 and meta["environment"]["backend"] == "torch"
    assert meta["environment"]["framework"] == "torch"

    # Other data, other parameters, a corrupted file: each refused with a clear error.
    with pytest.raises(FingerprintMismatchError, match="'test' data differs"):
        load_result(tmp_path / "r", model=model, data={"test": (test[0] + 1e-9, test[1])})
    # data= alone is checked too (it was skipped without model=): NumPy reads arrays and
    # lists of batches, a framework's dataset asks for the model
    load_result(tmp_path / "r", data={"train": train, "test": test})
    load_result(
        tmp_path / "r", data={"test": [(test[0][:3], test[1][:3]), (test[0][3:], test[1][3:])]}
    )
    with pytest.raises(FingerprintMismatchError, match="'test' data differs"):
        load_result(tmp_path / "r", data={"test": (test[0] + 1e-9, test[1])})
    with pytest.raises(FingerprintMismatchError, match="'train' data differs"):
        load_result(tmp_path / "r", data={"train": (train[0], train[1][::-1].copy())})
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*map(torch.as_tensor, test))
    )
    with pytest.raises(TypeError, match="needs model="):
        load_result(tmp_path / "r", data={"test": loader})
    with model.parameters_set_to(model.get_parameters() * 1.0001):
        with pytest.raises(FingerprintMismatchError, match="other parameter values"):
            load_result(tmp_path / "r", model=model)
    arrays = tmp_path / "r" / "arrays.npz"
    arrays.write_bytes(arrays.read_bytes()[:-10])
    with pytest.raises(ResultFileError, match="corrupted"):
        load_result(tmp_path / "r")
    with pytest.raises(ResultFileError, match="no saved result"):
        load_result(tmp_path / "nothing")


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_chunked_runs_equal_direct_computation(backend: str, tmp_path: Path) -> None:
    model, calculator, _, test = setup(backend)
    host = model.to_numpy
    scores = run_influence(calculator, tmp_path / "a", test, chunk_size=120)
    np.testing.assert_allclose(host(scores), host(calculator.influence(test)), rtol=1e-12)
    values = run_self_influence(calculator, tmp_path / "b", chunk_size=120)
    np.testing.assert_allclose(host(values), host(calculator.self_influence()), rtol=1e-12)
    top = run_top_k(calculator, tmp_path / "c", test, k=7, chunk_size=120)
    direct = calculator.top_k(test, k=7)
    for got, expected in zip(top, direct, strict=True):
        np.testing.assert_allclose(host(got), host(expected), rtol=1e-12)
    # Chunks are whole batches: 3 batches of 50 reach 120 samples, so 2 chunks of 150.
    assert len(list((tmp_path / "c" / "chunks").glob("chunk_*.npz"))) == 2
    # The assembled result is saved and loads with its fingerprints checked.
    saved = load_result(tmp_path / "c", model=model, data={"test": test})
    np.testing.assert_array_equal(saved.arrays["proponents"], host(direct.proponents))
    # Another run in the same directory is refused.
    with pytest.raises(FingerprintMismatchError, match="another run"):
        run_top_k(calculator, tmp_path / "c", test, k=3, chunk_size=120)


def test_chunked_tracin_top_k(tmp_path: Path) -> None:
    model, _, train, test = setup()
    tracin = TracIn(model, [model.kernels.save_state()], 0.1, batch_size=50).fit(train)
    top = run_top_k(tracin, tmp_path, test, k=4, chunk_size=100)
    direct = tracin.top_k(test, k=4)
    np.testing.assert_array_equal(model.to_numpy(top.proponents), model.to_numpy(direct.proponents))


def test_a_killed_run_resumes_without_recomputing(tmp_path: Path) -> None:
    """Kill a 10-chunk run after ≥ 3 chunks; the rerun computes only the rest, same numbers."""
    out = tmp_path / "run"
    env = {**os.environ, "INFLUENCE_CORE_PROGRESS": "0"}
    script = [sys.executable, str(HERE / "resumable_run.py"), str(out)]
    process = subprocess.Popen([*script, "torch", "0.4"], env=env)
    deadline = time.monotonic() + 120
    # A chunk is finished once its record (chunk_N.json) is written after its arrays: a kill
    # between the two leaves an .npz the rerun must recompute, so only recorded ones count.
    while len(list((out / "chunks").glob("chunk_*.json"))) < 3:
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "no chunks written in time"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = {
        p.with_suffix(".npz").name: p.with_suffix(".npz").stat().st_mtime_ns
        for p in (out / "chunks").glob("chunk_*.json")
    }
    assert 3 <= len(done) < 10
    assert not (out / "metadata.json").exists()

    subprocess.run([*script, "torch", "0"], env=env, check=True)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["parameters"]["chunks"] == 10
    assert meta["parameters"]["chunks_computed_by_the_last_call"] == 10 - len(done)
    for name, mtime in done.items():  # the finished chunks were not rewritten
        assert (out / "chunks" / name).stat().st_mtime_ns == mtime

    subprocess.run(
        [sys.executable, str(HERE / "resumable_run.py"), str(tmp_path / "whole"), "torch", "0"],
        env=env,
        check=True,
    )
    resumed = load_result(out).arrays["self_influence"]
    whole = load_result(tmp_path / "whole").arrays["self_influence"]
    np.testing.assert_array_equal(resumed, whole)
    assert resumed.shape == (1000,)
