"""The layer-wise solvers write a test set's solved block in place (torch), so it exists once.

Without it the calculator held every batch's block, each layer's pieces and
their concatenations at once: twice the (d, n_test) block, 2.1 GB on the
5.2M transformer with 50 test sequences. The block written in place must
equal the concatenated one exactly, for whole and low-rank query sides, for
arrays (n known) and a DataLoader (n bounded above, the block trimmed), and a
namespace whose arrays are not writeable (TensorFlow) keeps the concatenation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influence_conformance.cases import build_case
from influence_core import EKFACIHVP, KFACIHVP, FirstOrderInfluenceCalculator
from influence_core.ihvp.kfac import KFACIHVP as Base


def concatenated(calc, test):
    """The same block through the batch-by-batch concatenation (nothing preallocated)."""
    original = type(calc.ihvp).allocated_test_side
    type(calc.ihvp).allocated_test_side = lambda self, n: None
    try:
        return calc.model.to_numpy(calc.solve_test_gradients(test))
    finally:
        type(calc.ihvp).allocated_test_side = original


@pytest.mark.parametrize("solver", [EKFACIHVP, KFACIHVP])
@pytest.mark.parametrize("rank", [None, 1])
def test_the_block_written_in_place_equals_the_concatenated_one(solver, rank) -> None:
    case = build_case("torch", "convnet", "float64")
    model = case.model
    # the 7 test points arrive in three batches, one short (the cached case's model is not changed)
    calc = FirstOrderInfluenceCalculator(model, solver(seed=1, query_rank=rank), batch_size=3)
    calc.fit(case.data)
    test = (case.X[:7], case.y[:7])
    assert calc.ihvp.allocated_test_side(7) is not None  # torch's arrays are writeable
    expected = concatenated(calc, test)
    np.testing.assert_array_equal(model.to_numpy(calc.solve_test_gradients(test)), expected)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*(torch.as_tensor(a) for a in test)), batch_size=3
    )
    got = model.to_numpy(calc.solve_test_gradients(loader))
    assert got.shape == expected.shape  # bounded above by 3 batches × 3, trimmed to 7
    np.testing.assert_array_equal(got, expected)


def test_a_namespace_without_writeable_arrays_keeps_the_concatenation() -> None:
    case = build_case("tensorflow", "convnet", "float64")
    calc = FirstOrderInfluenceCalculator(case.model, EKFACIHVP()).fit(case.data)
    assert calc.ihvp.allocated_test_side(4) is None
    assert calc.solve_test_gradients((case.X[:4], case.y[:4])).shape[1] == 4


def test_a_layer_written_in_the_wrong_columns_is_seen(monkeypatch) -> None:
    """A mutant writing each batch one column late: the equality above turns red."""
    case = build_case("torch", "convnet", "float64")
    calc = FirstOrderInfluenceCalculator(case.model, EKFACIHVP(seed=1), batch_size=3)
    calc.fit(case.data)
    test = (case.X[:7], case.y[:7])
    expected = concatenated(calc, test)
    original = Base.solved_test_side_into

    def late(self, model, batch, measurement, out, column):
        original(self, model, batch, measurement, out, min(column + 1, int(out.shape[1]) - 1))

    monkeypatch.setattr(Base, "solved_test_side_into", late)
    got = case.model.to_numpy(calc.solve_test_gradients(test))
    assert not np.allclose(got, expected)
