"""torch convolutions of every supported geometry: their statistics rebuild the per-sample gradients.

The patches are read from a zero-bordered channels-last copy of the input
(``influence_torch.layers._patches``); padding, stride, dilation and kernel
sizes that differ per axis each move which input entry a tap reads, so each
is varied on its own and all together, in float64, against ``vmap(grad)``.
"""

from __future__ import annotations

import pytest
import torch

from influence_core import InfluenceModel
from influence_core.layerwise import per_sample_grads_from_layers

GEOMETRIES = {
    "plain": {"kernel_size": 3},
    "padded": {"kernel_size": 3, "padding": 1},
    "padded per axis": {"kernel_size": (3, 2), "padding": (2, 1)},
    "strided per axis": {"kernel_size": 3, "padding": 1, "stride": (2, 1)},
    "dilated per axis": {"kernel_size": (3, 2), "dilation": (2, 3), "padding": (1, 2)},
    "all at once": {"kernel_size": (2, 3), "padding": (1, 3), "stride": (3, 2), "dilation": (2, 1)},
    "1x1 no bias": {"kernel_size": 1, "bias": False, "stride": 2},
}


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_conv_statistics_rebuild_the_per_sample_gradients(geometry: str) -> None:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, **GEOMETRIES[geometry])
    with torch.no_grad():
        width = conv(torch.zeros(1, 3, 9, 8)).numel()
    net = torch.nn.Sequential(
        conv, torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(width, 3)
    ).double()
    model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=5)
    X, y = torch.randn(5, 3, 9, 8, dtype=torch.float64), torch.randint(0, 3, (5,))
    from_layers = per_sample_grads_from_layers(model, (X, y))
    exact = model.per_sample_grads((X, y))
    assert torch.allclose(from_layers, exact, rtol=1e-12, atol=1e-13)
