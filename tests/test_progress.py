"""Progress bars: one switch, silent when not a terminal unless asked for."""

from __future__ import annotations

import numpy as np
from digits_problem import MU, digits_model, problem

from influence_core import ExactIHVP, FirstOrderInfluenceCalculator, set_progress
from influence_core.progress import progress_enabled


def test_progress_switch_and_environment(monkeypatch, capsys) -> None:
    monkeypatch.delenv("INFLUENCE_CORE_PROGRESS", raising=False)
    set_progress(None)
    assert progress_enabled() is False  # pytest's stderr is not a terminal
    monkeypatch.setenv("INFLUENCE_CORE_PROGRESS", "1")
    assert progress_enabled() is True
    set_progress(False)
    assert progress_enabled() is False  # the switch wins over the environment
    set_progress(None)

    p = problem()
    model = digits_model("torch", batch_size=100)
    train = (p["X"][:300], p["y"][:300])
    calculator = FirstOrderInfluenceCalculator(model, train, ExactIHVP(model, train, damping=MU))
    set_progress(True)
    try:
        values = model.to_numpy(calculator.self_influence())
    finally:
        set_progress(None)
    assert "self-influence" in capsys.readouterr().err  # the bar was drawn
    assert values.shape == (300,) and np.all(values > 0)
