"""Every pass over the same data must give the same samples in the same order.

Scores are numbered by a sample's position in the data passed in, and most
estimators read the training data several times (a fit, then scores; CG and
LiSSA once per iteration). A loader that shuffles, or augments at random,
gives each pass another order, and the scores come back misaligned without
any error. Backends read their framework's loaders in order where they can (a
shuffling torch ``DataLoader`` is read sequentially; a shuffled ``tf.data``
pipeline is refused up front); this module catches what is left, for any
iterable, in the core:

* each batch of a pass gets a small fingerprint: its size, a hash of its
  targets, and two sums of its inputs (of the per-sample sums, plain and
  weighted by position, so a reordering inside a batch shows too);
* the first pass that reaches batch j records it; every later pass compares
  its batch j before it is used, and a difference raises
  :class:`~influence_core.errors.DataOrderError` naming the batch.

It keeps 40 bytes per batch (not per sample), costs one reduction over each
batch's inputs and a host copy of its targets, and is skipped for ``(X, y)``
arrays and lists of batches, which cannot change order. Inputs are compared
to 1e-6 of their scale (a GPU reduction need not be bit-reproducible), targets
exactly.
"""

from __future__ import annotations

import hashlib
import itertools
import weakref
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np

from .data import Batch, OffsetData, is_array_pair
from .errors import DataConsumedError, DataOrderError, EndlessDataError
from .tree import tree_leaves

__all__ = ["DEFAULT_MAX_SAMPLES", "PassOrder", "is_one_shot", "refuse_endless"]

#: The most samples one pass over data of unknown length may yield before it is
#: taken to be endless (``InfluenceModel(max_samples=)``): ten times the largest
#: training sets this library is used on.
DEFAULT_MAX_SAMPLES = 100_000_000

#: Relative tolerance on the input sums of a batch seen again.
INPUT_RTOL = 1e-6


class Fingerprint(NamedTuple):
    """What identifies one batch of one pass (40 bytes of state)."""

    size: int
    targets: bytes
    total: float
    weighted: float
    scale: float


def fingerprint(batch: Batch, xp: Any, to_numpy: Any) -> Fingerprint:
    """The fingerprint of ``batch``: its size, its targets' hash, and position-weighted input sums."""
    digest = hashlib.blake2b(digest_size=8)
    for leaf in tree_leaves(batch.targets):
        host = np.ascontiguousarray(to_numpy(leaf))
        digest.update(str((host.dtype.str, host.shape)).encode())
        digest.update(host.tobytes())
    b = batch.size
    rows = np.zeros(b)
    for leaf in tree_leaves(batch.inputs):
        try:
            per_sample = xp.sum(xp.reshape(leaf, (b, -1)), axis=1)
            rows += np.asarray(to_numpy(per_sample), dtype=np.float64).reshape(b)
        except Exception:  # a leaf without a sum or a NumPy dtype (bool, strings, bfloat16):
            continue  # the other leaves and the targets still count
    # NaN/inf inputs are the finiteness check's to name, the same on every pass: not an order
    rows = np.nan_to_num(rows, nan=0.0, posinf=1e300, neginf=-1e300)
    position = np.arange(1, b + 1, dtype=np.float64)
    return Fingerprint(
        b,
        digest.digest(),
        float(rows.sum()),
        float(rows @ position),
        float(np.abs(rows) @ position),
    )


def _same(recorded: Fingerprint, seen: Fingerprint) -> bool:
    if recorded.size != seen.size or recorded.targets != seen.targets:
        return False
    tolerance = INPUT_RTOL * max(recorded.scale, seen.scale) + 1e-300
    return (
        abs(recorded.total - seen.total) <= tolerance
        and abs(recorded.weighted - seen.weighted) <= tolerance
    )


def is_one_shot(data: Any) -> bool:
    """An iterator that is its own iterator (a generator, ``iter(...)``): it can be read once."""
    data = data.data if isinstance(data, OffsetData) else data
    try:
        return hasattr(data, "__next__") and iter(data) is data
    except TypeError:
        return False


_ENDLESS = (itertools.cycle, itertools.count, itertools.repeat)


def refuse_endless(data: Any) -> None:
    """Raise :class:`EndlessDataError` for an iterator known never to end (``itertools.cycle`` …)."""
    inner = data.data if isinstance(data, OffsetData) else data
    if isinstance(inner, _ENDLESS):
        raise EndlessDataError(
            f"the data is an itertools.{type(inner).__name__}, which never ends, so a pass over "
            "it cannot finish. Pass the finite training set itself (the list of batches, the "
            "arrays, or the loader you cycle)."
        )


class PassOrder:
    """The fingerprints of the passes an :class:`~influence_core.InfluenceModel` made over each data object.

    Records are held per data object (by weak reference, so nothing keeps the
    user's data alive) and per batch size (a dataset batched two ways is two
    orders of batches).
    """

    def __init__(self) -> None:
        self._records: dict[tuple[int, int], list[Fingerprint]] = {}
        self._consumed: dict[int, Any] = {}  # one-shot iterators already read from (kept alive)

    def watch(
        self,
        data: Any,
        batch_size: int,
        batches: Iterator[Batch],
        xp: Any,
        to_numpy: Any,
        max_samples: int | None,
    ) -> Iterator[Batch]:
        """``batches`` (a pass over ``data``), each checked against the same position of earlier passes."""
        inner = data.data if isinstance(data, OffsetData) else data
        refuse_endless(inner)
        if is_array_pair(inner):  # arrays cannot change order
            yield from batches
            return
        one_shot = is_one_shot(inner)
        if one_shot and id(inner) in self._consumed and self._consumed[id(inner)] is inner:
            raise DataConsumedError(type(inner).__name__)
        if one_shot:  # from its first batch on, a second pass would start part-way through
            self._consumed[id(inner)] = inner
        fixed = one_shot or isinstance(inner, (list, tuple))
        record = None if fixed else self._record(inner, batch_size)
        n = 0
        for j, batch in enumerate(batches):
            n += batch.size
            if max_samples is not None and n > max_samples:
                raise EndlessDataError(
                    f"one pass over the data has yielded more than max_samples={max_samples:,} "
                    "samples without ending: an endless pipeline (tf.data's .repeat(), an "
                    "infinite generator)? Influence needs a finite training set: pass it without "
                    "the repeat, take the samples you mean (ds.take(n)), or raise "
                    "InfluenceModel(max_samples=) if the data really is that large."
                )
            if record is not None:
                seen = fingerprint(batch, xp, to_numpy)
                if j < len(record):
                    if not _same(record[j], seen):
                        raise DataOrderError(_order_message(j, record[j], seen, batch.start))
                else:
                    record.append(seen)
            yield batch

    def _record(self, data: Any, batch_size: int) -> list[Fingerprint] | None:
        key = (id(data), batch_size)
        record = self._records.get(key)
        if record is not None:
            return record
        try:
            weakref.finalize(data, self._records.pop, key, None)
        except TypeError:  # cannot be weakly referenced: no record, rather than a stale one
            return None
        record = self._records[key] = []
        return record


def _order_message(j: int, recorded: Fingerprint, seen: Fingerprint, start: int) -> str:
    if recorded.size != seen.size:
        what = f"{seen.size} samples where an earlier pass had {recorded.size}"
    elif recorded.targets != seen.targets:
        what = "other targets than an earlier pass at the same position"
    else:
        what = "other inputs than an earlier pass at the same position (targets equal)"
    return (
        f"the data gave batch {j} (from sample {start}) with {what}: two passes over it differ. "
        "Scores are numbered by position and the training data is read several times, so every "
        "pass must yield the same samples in the same order. A shuffling loader or random "
        "augmentation does not: pass the training set unshuffled and unaugmented (a "
        "DataLoader with shuffle=False, a tf.data pipeline without .shuffle(), a sampler "
        "with a fixed order)."
    )
