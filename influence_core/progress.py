"""Progress bars for long loops: tqdm, silent unless a terminal is attached or asked for.

One switch turns them on or off everywhere: :func:`set_progress` (``True``,
``False``, or ``None`` for automatic), or the environment variable
``INFLUENCE_CORE_PROGRESS`` (``1``/``0``). Automatic means: shown when stderr
is a terminal, silent in pipes, logs and CI.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["progress", "progress_counter", "progress_enabled", "set_progress"]

T = TypeVar("T")
_setting: bool | None = None


def set_progress(enabled: bool | None) -> None:
    """Show (``True``), hide (``False``) or auto-detect (``None``) every progress bar."""
    global _setting
    _setting = enabled


def progress_enabled() -> bool:
    if _setting is not None:
        return _setting
    environment = os.environ.get("INFLUENCE_CORE_PROGRESS")
    if environment is not None:
        return environment.strip().lower() not in {"0", "false", "no", "off", ""}
    return sys.stderr.isatty()


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None) -> Iterator[T]:
    """``iterable`` with a tqdm bar when progress is enabled, as is otherwise."""
    if not progress_enabled():
        yield from iterable
        return
    from tqdm.auto import tqdm

    with tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True) as bar:
        yield from bar


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def progress_counter(*, desc: str, total: int | None = None) -> Any:
    """A bar for callback-driven loops (``with progress_counter(...) as bar: bar.update()``)."""
    if not progress_enabled():
        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(desc=desc, total=total, leave=False, dynamic_ncols=True)
