"""The benchmark models as torch modules, from canonical (Keras-layout) weights.

The MLP 64-32-10 (tanh), or, when the first kernel is 4-D, the conv net on NHWC
images 8×8×1: Conv2D(8, 3×3, relu) → Flatten (in NHWC order, as Keras) → Dense(10).
"""

from __future__ import annotations

import numpy as np
import torch


class _ChannelsFirst(torch.nn.Module):
    """NHWC → NCHW, with or without the batch dimension (dattri calls the model per sample)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.movedim(-1, -3)


class _FlattenChannelsLast(torch.nn.Module):
    """NCHW → flat in NHWC order (Keras'), with or without the batch dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.movedim(-3, -1).flatten(-3)


def build(weights: list[np.ndarray]) -> torch.nn.Module:
    if weights[0].ndim == 4:
        net = torch.nn.Sequential(
            _ChannelsFirst(),
            torch.nn.Conv2d(1, 8, 3),
            torch.nn.ReLU(),
            _FlattenChannelsLast(),
            torch.nn.Linear(288, 10),
        )
    else:
        net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    net = net.double()
    net.load_state_dict(state_dict(weights))
    return net.eval()


def state_dict(weights: list[np.ndarray]) -> dict[str, torch.Tensor]:
    k1, b1, k2, b2 = weights
    if k1.ndim == 4:  # (kh, kw, in, out) → (out, in, kh, kw)
        return {
            "1.weight": torch.tensor(k1.transpose(3, 2, 0, 1).copy()),
            "1.bias": torch.tensor(b1),
            "4.weight": torch.tensor(k2.T.copy()),
            "4.bias": torch.tensor(b2),
        }
    return {
        "0.weight": torch.tensor(k1.T.copy()),
        "0.bias": torch.tensor(b1),
        "2.weight": torch.tensor(k2.T.copy()),
        "2.bias": torch.tensor(b2),
    }


def last_layer_names() -> list[str]:
    """The MLP's last layer (the last-layer workloads all use the MLP)."""
    return ["2.weight", "2.bias"]
