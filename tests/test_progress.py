"""Progress bars: one switch, silent when not a terminal unless asked for."""

from __future__ import annotations

import numpy as np
from digits_problem import MU, digits_model, problem

from influence_core import ExactIHVP, FirstOrderInfluenceCalculator, set_progress
from influence_core.progress import progress_disable


def test_progress_switch_and_environment(monkeypatch, capsys) -> None:
    monkeypatch.delenv("INFLUENCE_CORE_PROGRESS", raising=False)
    set_progress(None)
    assert progress_disable() is None  # tqdm's own automatic mode
    monkeypatch.setenv("INFLUENCE_CORE_PROGRESS", "1")
    assert progress_disable() is False
    set_progress(False)
    assert progress_disable() is True  # the switch wins over the environment
    set_progress(None)
    monkeypatch.delenv("INFLUENCE_CORE_PROGRESS")

    p = problem()
    model = digits_model("torch", batch_size=100)
    train = (p["X"][:300], p["y"][:300])
    calculator = FirstOrderInfluenceCalculator(model, ExactIHVP(damping=MU)).fit(train)
    calculator.self_influence()
    assert "self-influence" not in capsys.readouterr().err  # automatic: stderr is no terminal
    set_progress(True)
    try:
        values = model.to_numpy(calculator.self_influence())
    finally:
        set_progress(None)
    assert "self-influence" in capsys.readouterr().err  # the bar was drawn
    assert values.shape == (300,) and np.all(values > 0)


def test_fault12_bars_carry_a_total_and_an_eta_over_data_of_known_size(capsys) -> None:
    import torch

    p = problem()
    model = digits_model("torch", batch_size=100)
    train = (p["X"][:300], p["y"][:300])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.tensor(train[0]), torch.tensor(train[1])),
        batch_size=75,
    )
    assert model.num_batches(train) == 3 and model.num_batches(loader) == 4
    set_progress(True)
    try:
        model.hessian(train)
        calc = FirstOrderInfluenceCalculator(model, ExactIHVP(damping=MU)).fit(train)
        calc.self_influence(loader)
    finally:
        set_progress(None)
    err = capsys.readouterr().err
    assert "Hessian:   0%" in err and "| 0/3 [" in err  # a total: a percentage and an ETA
    assert "self-influence:   0%" in err and "| 0/4 [" in err
