"""PyTorch specifics: frozen parameters, dtypes, pytree inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influence_conformance.cases import assert_close, to_numpy
from influence_core import InfluenceModel


def test_frozen_parameters_are_not_part_of_theta() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    im = InfluenceModel(model, torch.nn.CrossEntropyLoss(reduction="none"))
    assert im.parameter_names == ("0.bias", "2.weight", "2.bias")
    assert im.num_parameters == 4 + 8 + 2


def test_mixed_dtypes_are_refused_with_advice() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2).double())
    with pytest.raises(TypeError, match=r"model\.double\(\)"):
        InfluenceModel(model, torch.nn.CrossEntropyLoss(reduction="none"))


class TwoInputs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 2)
        self.b = torch.nn.Linear(5, 2)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.a(inputs[0]) + self.b(inputs[1])


def test_pytree_inputs_are_vmapped_per_sample() -> None:
    torch.manual_seed(0)
    model = TwoInputs().double()
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    im = InfluenceModel(model, loss, batch_size=3)
    x1, x2, y = torch.randn(7, 3).double(), torch.randn(7, 5).double(), torch.randint(0, 2, (7,))
    grads = to_numpy(im.per_sample_grads(((x1, x2), y)))
    for i in (0, 6):  # against plain autograd on one sample
        model.zero_grad()
        loss(model((x1[i : i + 1], x2[i : i + 1])), y[i : i + 1]).sum().backward()
        expected = np.concatenate([p.grad.reshape(-1).numpy() for p in model.parameters()])
        assert_close(grads[i], expected, 1e-12, f"sample {i}")
    assert_close(im.loss_grad(((x1, x2), y)), grads.mean(axis=0), 1e-12, "mean over 3 batches")


def test_results_carry_no_autograd_graph_when_a_subset_is_selected() -> None:
    """Unselected parameters keep requires_grad; no graph may hang on our results."""
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()
    im = InfluenceModel(model, torch.nn.CrossEntropyLoss(reduction="none"), parameters=["2"])
    X, y = torch.randn(5, 3).double(), torch.randint(0, 2, (5,))
    outputs = [
        im.per_sample_grads((X, y)),
        im.loss_grad((X, y)),
        im.hvp((X, y), torch.ones(im.num_parameters, 2)),
        im.hessian((X, y)),
        im.per_sample_loss((X, y)),
    ]
    for out in outputs:
        assert not out.requires_grad and out.grad_fn is None


def test_check_finite_false_passes_nan_through_without_raising() -> None:
    model = torch.nn.Linear(3, 2).double()
    X, y = torch.randn(4, 3).double(), torch.randint(0, 2, (4,))
    X[1] = float("nan")
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    unchecked = InfluenceModel(model, loss, check_finite=False)
    grads = unchecked.per_sample_grads((X, y))
    assert torch.isnan(grads[1]).all() and torch.isfinite(grads[[0, 2, 3]]).all()
    assert torch.isnan(unchecked.loss_grad((X, y))).any()
