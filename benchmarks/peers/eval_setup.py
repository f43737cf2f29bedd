"""The digits evaluation's setup, as the peers' runners read it (torch and numpy only)."""

from __future__ import annotations

import numpy as np
import torch


def network(hidden: int) -> torch.nn.Module:
    """The evaluation's network: softmax regression (hidden = 0) or a 64-hidden-10 tanh MLP."""
    if hidden == 0:
        return torch.nn.Sequential(torch.nn.Linear(64, 10)).double()
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10)
    ).double()


def states(setup: np.lib.npyio.NpzFile, prefix: str) -> list[dict[str, torch.Tensor]]:
    """The state dicts stored as ``{prefix}{s}:{key}`` for s < ``{prefix}_count``."""
    out = []
    for s in range(int(setup[f"{prefix}_count"])):
        head = f"{prefix}{s}:"
        out.append(
            {k[len(head) :]: torch.from_numpy(setup[k]) for k in setup.files if k.startswith(head)}
        )
    return out
