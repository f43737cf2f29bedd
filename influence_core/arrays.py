"""Array helpers written once over any Array API namespace ``xp``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["join", "top_k"]

Array = Any


def join(xp: Any, parts: Sequence[Array], axis: int = 0) -> Array:
    """``xp.concat(parts, axis=axis)``, or the one part itself (no copy) when there is one.

    Streams of per-batch results end here: a dataset that fits in one batch
    pays no concatenation, and its result is bit-identical to the kernel's.
    """
    if not parts:
        raise ValueError("the data yielded no samples")
    return parts[0] if len(parts) == 1 else xp.concat(list(parts), axis=axis)


def top_k(
    xp: Any, x: Array, k: int, /, *, axis: int = -1, largest: bool = True
) -> tuple[Array, Array]:
    """The ``k`` largest (or smallest) entries of ``x`` along ``axis`` and their indices.

    A prefix of the standard's stable ``argsort``: values come sorted (largest
    first when ``largest``) and ties go to the lower index, in every framework.
    ``k`` larger than the axis returns the whole sorted axis.
    """
    size = int(x.shape[axis])
    order = xp.argsort(x, axis=axis, descending=largest, stable=True)
    if k < size:
        index = [slice(None)] * len(x.shape)
        index[axis] = slice(0, k)
        order = order[tuple(index)]
    return xp.take_along_axis(x, order, axis=axis), order
