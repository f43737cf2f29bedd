"""The PyTorch array namespace: ``array_api_compat.torch``, as it is."""

from __future__ import annotations

import array_api_compat.torch as namespace

__all__ = ["namespace"]
