"""Framework-free iteration over the user's data.

Accepted data, in the order they are recognised:

1. ``(X, y)``: a tuple of two arrays (NumPy or native) with the same leading
   dimension, cut into batches of ``batch_size`` (the last one partial);
2. a framework-native dataset the backend recognises (a PyTorch ``DataLoader``
   or ``Dataset``; a batched or unbatched ``tf.data.Dataset``);
3. any other iterable of ``(inputs, targets)`` batches (a list, a generator).

Each element is checked to be an ``(inputs, targets)`` pair with matching
leading dimensions, and converted to native arrays in the model's dtype.

Hugging Face's convention is read too: a mapping that holds ``"labels"``
(a batch from a ``DataLoader`` over a tokenized dataset, or the whole data as
a dict of arrays) is the pair ``({the other keys}, labels)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

from .errors import DatasetFormatError
from .tree import tree_leaves, tree_map

__all__ = [
    "Batch",
    "OffsetData",
    "chunks",
    "is_array_pair",
    "iter_batches",
    "leading_dim",
    "take_samples",
]


class Batch(NamedTuple):
    """One batch of native arrays, and where it starts in the data passed in."""

    inputs: Any
    targets: Any
    start: int

    @property
    def size(self) -> int:
        return leading_dim(self.targets)


class OffsetData(NamedTuple):
    """``data`` whose samples are numbered from ``start``: one shard of a larger training set.

    Every :class:`Batch` of it starts at ``start`` plus its place in ``data``,
    so what is keyed by sample index (top-k indices, the samples an error
    names, the seeded labels of a true Fisher) is the same as for the whole
    set. ``size``, when known, saves a pass to count the samples.
    """

    data: Any
    start: int
    size: int | None = None


def leading_dim(tree: Any) -> int:
    """Size of the leading (batch) dimension of an array or of the first array of a pytree."""
    first = next(tree_leaves(tree), None)
    shape = getattr(first, "shape", None)
    if shape is None or len(shape) == 0:
        raise DatasetFormatError(
            f"expected arrays with a leading batch dimension, got {type(first).__name__} "
            f"with shape {shape}; a scalar target needs shape (batch,), not ()"
        )
    return int(shape[0])


def is_array_pair(data: Any) -> bool:
    """Whether ``data`` is an ``(X, y)`` pair of arrays (not a dataset of batches)."""
    return (
        isinstance(data, tuple)
        and len(data) == 2
        and all(hasattr(leaf, "shape") or isinstance(leaf, (tuple, dict)) for leaf in data)
        and not isinstance(data, Batch)
    )


def take_samples(tree: Any, index: Any) -> Any:
    """The samples at integer positions ``index`` (a NumPy array) of an array or pytree.

    NumPy arrays are indexed directly; native arrays through their own
    namespace's ``take``, so no framework is named here.
    """
    import numpy as np

    from . import array_namespace  # the registry: resolves the array's backend

    def take(leaf: Any) -> Any:
        if isinstance(leaf, np.ndarray):
            return leaf[index]
        xp = array_namespace(leaf)
        return xp.take(leaf, xp.asarray(index), axis=0)

    return tree_map(take, tree)


def _describe(element: Any) -> str:
    if isinstance(element, dict):
        return f"a dict with keys {sorted(map(str, element))}"
    if isinstance(element, (tuple, list)):
        return f"a {type(element).__name__} of {len(element)} elements"
    shape = getattr(element, "shape", None)
    return f"a {type(element).__name__}" + (
        f" of shape {tuple(shape)}" if shape is not None else ""
    )


#: The key of the targets in a mapping batch (Hugging Face's convention).
LABELS = "labels"


def split_labels(element: Any) -> Any:
    """``({other keys}, element["labels"])`` for a mapping that holds labels; anything else as it is."""
    if isinstance(element, Mapping) and LABELS in element:
        inputs = {key: value for key, value in element.items() if key != LABELS}
        return inputs, element[LABELS]
    return element


def _as_pair(element: Any) -> tuple[Any, Any]:
    element = split_labels(element)
    if isinstance(element, (tuple, list)) and len(element) == 2:
        return element[0], element[1]
    raise DatasetFormatError(
        f"each batch must be an (inputs, targets) pair, but the data yielded {_describe(element)}. "
        "Map your dataset to pairs first, e.g. ds.map(lambda d: (d['image'], d['label'])) "
        "for tf.data, or return (x, y) from your torch Dataset's __getitem__; a dict batch "
        "is read as (inputs, targets) when its targets are under 'labels'."
    )


def iter_batches(
    data: Any,
    batch_size: int,
    native_batches: Callable[[Any, int], Iterator[Any] | None],
    as_native: Callable[[Any], Any],
) -> Iterator[Batch]:
    """Yield :class:`Batch` es of native arrays from any accepted kind of ``data``.

    ``native_batches`` and ``as_native`` come from the model's kernels, so this
    function stays framework-free. ``start`` counts samples from the beginning
    of ``data``, so errors can name the offending samples.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if isinstance(data, OffsetData):
        for batch in iter_batches(data.data, batch_size, native_batches, as_native):
            yield batch._replace(start=batch.start + data.start)
        return
    if isinstance(data, Mapping) and LABELS in data:  # a dict of arrays, labels among them
        data = split_labels(data)
    if is_array_pair(data):
        inputs, targets = data
        n = leading_dim(targets)
        if leading_dim(inputs) != n:
            raise DatasetFormatError(
                f"inputs have {leading_dim(inputs)} samples but targets have {n}; "
                "pass (X, y) with the same leading dimension"
            )
        if n <= batch_size:  # one batch: no slicing (an eager slice op per array in TF)
            yield Batch(tree_map(as_native, inputs), tree_map(as_native, targets), 0)
            return
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            yield Batch(
                tree_map(as_native, slice_samples(inputs, start, stop)),
                tree_map(as_native, slice_samples(targets, start, stop)),
                start,
            )
        return
    elements: Iterable[Any] | None = native_batches(data, batch_size)
    if elements is None:
        if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
            raise DatasetFormatError(
                f"cannot iterate over data of type {type(data).__name__}. Pass (X, y) arrays, "
                "a torch DataLoader or Dataset, a tf.data.Dataset, or an iterable of "
                "(inputs, targets) batches."
            )
        elements = data
    start = 0
    for element in elements:
        inputs, targets = _as_pair(element)
        n = leading_dim(targets)
        if leading_dim(inputs) != n:
            raise DatasetFormatError(
                f"a batch has {leading_dim(inputs)} inputs but {n} targets (batch starting at "
                f"sample {start}); inputs and targets must share the leading dimension"
            )
        yield Batch(tree_map(as_native, inputs), tree_map(as_native, targets), start)
        start += n


def chunks(batches: Iterable[Batch], chunk_size: int) -> Iterator[list[Batch]]:
    """Group consecutive batches into chunks of at least ``chunk_size`` samples (the last may be smaller).

    Chunks are whole batches, so a chunk boundary never splits a batch.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    chunk: list[Batch] = []
    size = 0
    for batch in batches:
        chunk.append(batch)
        size += batch.size
        if size >= chunk_size:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def rebatched(batches: Iterable[Batch], batch_size: int, xp: Any) -> Iterator[tuple[Any, Any]]:
    """``(inputs, targets)`` of exactly ``batch_size`` samples from a stream of batches of any size.

    Samples are taken in order; a batch is cut where needed and its remainder
    starts the next one, so over an endless (cycled) stream every batch is
    full and every sample is used equally often.
    """
    pending: list[Batch] = []
    held = 0
    for batch in batches:
        pending.append(batch)
        held += batch.size
        while held >= batch_size:
            inputs = _concat_trees(xp, [b.inputs for b in pending])
            targets = _concat_trees(xp, [b.targets for b in pending])
            yield slice_samples(inputs, 0, batch_size), slice_samples(targets, 0, batch_size)
            held -= batch_size
            rest = slice_samples(targets, batch_size, batch_size + held)
            pending = (
                [Batch(slice_samples(inputs, batch_size, batch_size + held), rest, 0)]
                if held
                else []
            )


def slice_samples(tree: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of every leaf of an array or pytree (native slicing)."""
    return tree_map(lambda leaf: leaf[start:stop], tree)


def _concat_trees(xp: Any, trees: list[Any]) -> Any:
    """The pytrees in ``trees`` (same structure) joined leaf by leaf along the batch axis."""
    if len(trees) == 1:
        return trees[0]
    return tree_map(lambda *leaves: xp.concat(list(leaves), axis=0), *trees)
