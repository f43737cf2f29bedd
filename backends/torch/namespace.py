"""The PyTorch array namespace: ``array_api_compat.torch`` plus ``top_k``."""

from __future__ import annotations

from typing import Any

import array_api_compat.torch as compat_torch
import torch

from influence_core.namespace import NamespaceWithTopK


def top_k(x: torch.Tensor, k: int, /, *, axis: int = -1, largest: bool = True) -> tuple[Any, Any]:
    """The ``k`` largest (or smallest) entries along ``axis``, sorted, ties to the lower index."""
    # torch.topk does not promise an order among ties; a stable sort does.
    idx = torch.argsort(x, dim=axis, descending=largest, stable=True).narrow(axis, 0, k)
    return torch.take_along_dim(x, idx, dim=axis), idx


namespace = NamespaceWithTopK(compat_torch, top_k, "torch")
