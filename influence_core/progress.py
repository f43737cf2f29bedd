"""Progress bars for long loops: tqdm's, with one switch for all of them.

:func:`set_progress` (``True``, ``False``, or ``None`` for automatic), or the
environment variable ``INFLUENCE_CORE_PROGRESS`` (``1``/``0``), sets tqdm's
``disable`` for every bar. Automatic is tqdm's own ``disable=None``: shown
when the output is a terminal, silent in pipes, logs and CI.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["progress", "progress_counter", "progress_disable", "set_progress"]

T = TypeVar("T")
_setting: bool | None = None


def set_progress(enabled: bool | None) -> None:
    """Show (``True``), hide (``False``) or auto-detect (``None``) every progress bar."""
    global _setting
    _setting = enabled


def progress_disable() -> bool | None:
    """tqdm's ``disable`` for our bars: ``False`` shown, ``True`` hidden, ``None`` automatic."""
    if _setting is not None:
        return not _setting
    environment = os.environ.get("INFLUENCE_CORE_PROGRESS")
    if environment is not None:
        return environment.strip().lower() in {"0", "false", "no", "off", ""}
    return None


def progress_counter(*, desc: str, total: int | None = None) -> Any:
    """A tqdm bar for callback-driven loops (``with progress_counter(...) as bar: bar.update()``)."""
    from tqdm.auto import tqdm

    return tqdm(desc=desc, total=total, leave=False, dynamic_ncols=True, disable=progress_disable())


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None) -> Iterator[T]:
    """``iterable`` with a tqdm bar (shown as :func:`set_progress` says)."""
    disable = progress_disable()
    if disable is True:  # no tqdm import at all when hidden
        yield from iterable
        return
    from tqdm.auto import tqdm

    with tqdm(
        iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, disable=disable
    ) as bar:
        yield from bar
