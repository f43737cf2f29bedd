"""The one pytree walker of the core: tuples, lists and dicts of arrays.

Model inputs may be one array or a nested structure of arrays that share a
leading batch dimension (a dict of token ids and masks, a tuple of images and
metadata). Everything the core does to such inputs (convert, slice, gather,
hash) is a map over the leaves, written here once. Dict leaves are visited in
sorted key order so the order never depends on insertion.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["tree_leaves", "tree_map"]


def tree_map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """``tree`` with every leaf replaced by ``fn(leaf, *matching leaves of rest)``.

    Containers keep their type; the trees in ``rest`` must share ``tree``'s structure.
    """
    if isinstance(tree, (tuple, list)):
        return type(tree)(
            tree_map(fn, item, *others) for item, *others in zip(tree, *rest, strict=True)
        )
    if isinstance(tree, dict):
        return {key: tree_map(fn, tree[key], *(r[key] for r in rest)) for key in tree}
    return fn(tree, *rest)


def tree_leaves(tree: Any) -> Iterator[Any]:
    """The leaves of ``tree`` in a fixed order (dict keys sorted)."""
    if isinstance(tree, (tuple, list)):
        for item in tree:
            yield from tree_leaves(item)
    elif isinstance(tree, dict):
        for key in sorted(tree, key=str):
            yield from tree_leaves(tree[key])
    else:
        yield tree
