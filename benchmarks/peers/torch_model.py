"""The benchmark MLP (64-32-10, tanh) as a torch module, from canonical (Keras-layout) weights."""

from __future__ import annotations

import numpy as np
import torch


def build(weights: list[np.ndarray]) -> torch.nn.Module:
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
    ).double()
    load(net, weights)
    return net.eval()


def state_dict(weights: list[np.ndarray]) -> dict[str, torch.Tensor]:
    w1, b1, w2, b2 = weights
    return {
        "0.weight": torch.tensor(w1.T.copy()),
        "0.bias": torch.tensor(b1),
        "2.weight": torch.tensor(w2.T.copy()),
        "2.bias": torch.tensor(b2),
    }


def load(net: torch.nn.Module, weights: list[np.ndarray]) -> None:
    net.load_state_dict(state_dict(weights))


def last_layer_names() -> list[str]:
    return ["2.weight", "2.bias"]
