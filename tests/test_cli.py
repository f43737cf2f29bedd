"""The influence-core command: the demo end to end (short), compare, and the usage text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from influence_core import load_result
from influence_core.app.cli import main
from influence_core.app.compare import compare_models


@pytest.mark.filterwarnings("ignore::influence_core.ConvergenceWarning")  # a short training run
def test_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--quiet", "--max-iter", "40", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for method in (
        "influence, exact",
        "influence, CG",
        "TracIn (5 checkpoints)",
        "representer points, L2",
        "representer points, LJE",
        "training loss (baseline)",
        "random (baseline)",
    ):
        assert f"| {method}" in out, method
    root = tmp_path / "torch"
    assert (root / "detection_curves.png").stat().st_size > 10_000
    assert (root / "test_digit_influence.png").stat().st_size > 10_000
    assert len(list((root / "checkpoints").glob("*.pt"))) == 5
    saved = load_result(root / "results" / "influence_exact_last_layer")
    assert saved.arrays["self_influence"].shape == (1200,)
    assert saved.metadata["data"]["train"]["n"] == 1200
    # The exact self-influence finds flipped labels far above chance (AUC printed per method).
    exact_row = next(line for line in out.splitlines() if line.startswith("| influence, exact"))
    assert float(exact_row.split("|")[5]) > 0.9
    # The counterfactual: four retrainings, one row each, saved.
    rows = {
        line.split("|")[1].strip(): float(line.split("|")[2])
        for line in out.splitlines()
        if line.startswith("| ") and line.count("|") == 5 and "removed" not in line
    }
    control = next(v for k, v in rows.items() if k.startswith("none (control"))
    influence = next(v for k, v in rows.items() if "opponents (influence)" in k)
    assert influence < control  # removing the opponents lowers the test loss, even at 40 steps
    saved = load_result(root / "results" / "counterfactual")
    assert saved.arrays["removed"].shape == (3, 20)


def test_compare_reports_agreement(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "compare",
                "--quiet",
                "--max-iter",
                "20",
                "--backend",
                "torch",
                "--backend",
                "tensorflow",
            ]
        )
        == 0
    )
    rows = [
        line
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| ") and "quantity" not in line
    ]
    assert len(rows) >= 12
    for row in rows:
        value = float(row.split("|")[2])
        assert value < 1e-8, row


def test_compare_without_a_mapping_skips_layout_dependent_rows() -> None:
    import torch

    from influence_core import InfluenceModel

    torch.manual_seed(0)
    X, y = np.random.default_rng(0).normal(size=(40, 5)), np.arange(40) % 3
    net = torch.nn.Sequential(
        torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)
    ).double()
    model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"))
    rows = compare_models(model, model, (X[:30], y[:30]), (X[30:], y[30:]))
    assert rows[0].max_relative is None and "no to_b" in rows[0].note
    assert all(row.max_relative == 0.0 for row in rows[1:])


def test_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_fault11_conventional_cli_behaviour(capsys: pytest.CaptureFixture[str]) -> None:
    from influence_core import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["bogus"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and __version__ in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--max-iter", "-5"])
    assert exit_info.value.code == 2
    assert "expected a positive integer, got -5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "(default: 300)" in capsys.readouterr().out
    # An expected error is one line, no traceback, exit status 1.
    assert main(["demo", "--backend", "mxnet", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "no backend named 'mxnet'" in err and "Traceback" not in err


def test_fault11_quiet_silences_tensorflow_start_up_logs() -> None:
    import subprocess
    import sys

    code = (
        "from influence_core.app.cli import quiet_frameworks\n"
        "quiet_frameworks(['tensorflow'])\n"
        "import tensorflow as tf\n"
        "tf.constant(1.0) + 1\n"
        "assert tf.get_logger().level == 40, tf.get_logger().level  # retracing warnings off\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("TF_CPP")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "oneDNN" not in result.stderr and "I0000" not in result.stderr, result.stderr


def test_fault14_the_hard_setting_flips_to_similar_classes() -> None:
    from influence_core.app.demo import SIMILAR, load_digits_with_flips

    data = load_digits_with_flips(similar=True)
    flipped = data["flipped"]
    clean, noisy = data["y_train_clean"][flipped], data["y_train"][flipped]
    assert flipped.sum() == 120
    assert all(SIMILAR[int(a)] == int(b) for a, b in zip(clean, noisy, strict=True))
    assert np.all(data["y_train"][~flipped] == data["y_train_clean"][~flipped])
