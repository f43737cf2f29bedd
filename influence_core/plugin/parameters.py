"""Selecting the parameters θ that influence is computed over.

Backends name their trainable parameters with a framework's own paths
(``"fc2.weight"`` in PyTorch, ``"sequential/dense_1/kernel"`` in Keras 3) and a
separator (``"."`` or ``"/"``). A *selector* is either an exact parameter name or
a layer name: a run of whole path components, matching every parameter below
it. Matching is framework-free and lives here, once.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import FrozenParameterError, UnknownParameterError

__all__ = ["layer_names", "select_parameters"]


def layer_names(parameter_names: Sequence[str], separator: str) -> list[str]:
    """The layer (module) paths owning ``parameter_names``, in order of first appearance."""
    seen: dict[str, None] = {}
    for name in parameter_names:
        head, _, _ = name.rpartition(separator)
        if head:
            seen.setdefault(head, None)
    return list(seen)


def _matches(name: str, selector: str, separator: str) -> bool:
    if name == selector:
        return True
    components = name.split(separator)
    wanted = selector.split(separator)
    n = len(wanted)
    # The selector must be a run of whole components that ends before the
    # parameter's own leaf name (``dense_1`` matches ``sequential/dense_1/kernel``).
    return any(components[i : i + n] == wanted for i in range(len(components) - n))


def select_parameters(
    parameter_names: Sequence[str],
    selectors: str | Sequence[str] | None,
    separator: str,
    frozen: Sequence[str] = (),
) -> list[int]:
    """Indices (in model order) of the parameters picked by ``selectors``.

    ``None`` selects every trainable parameter. Raises
    :class:`~influence_core.errors.FrozenParameterError` when a selector
    matches only ``frozen`` (non-trainable) parameters, and
    :class:`~influence_core.errors.UnknownParameterError`, listing the real
    layer and parameter names, when it matches nothing at all.
    """
    if selectors is None:
        return list(range(len(parameter_names)))
    if isinstance(selectors, str):
        selectors = [selectors]
    selectors = list(selectors)
    if not selectors:
        raise ValueError("parameters=[] selects nothing; pass None for all trainable parameters")
    chosen: set[int] = set()
    unknown = []
    for selector in selectors:
        hits = [i for i, n in enumerate(parameter_names) if _matches(n, selector, separator)]
        if not hits:
            unknown.append(selector)
        chosen.update(hits)
    frozen_hits = [s for s in unknown if any(_matches(n, s, separator) for n in frozen)]
    if frozen_hits:
        raise FrozenParameterError(
            frozen_hits, layer_names(parameter_names, separator), list(parameter_names)
        )
    if unknown:
        raise UnknownParameterError(
            unknown, layer_names(parameter_names, separator), list(parameter_names)
        )
    return sorted(chosen)
