"""Verified chunk files, run manifests and the one-writer lock, shared by resumable work.

A chunk is ``chunk_N.npz`` (atomic) beside ``chunk_N.json``, which records its
start, its length and the SHA-256 of the ``.npz``; a chunk is reused only if
all three check out. ``run.json`` records what a directory holds, and a
directory holding something else is refused. ``run.lock`` holds the writing
process's id; a lock whose process is gone is taken over. Used by
:mod:`influence_core.runs` and by TRAK's saved features.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FingerprintMismatchError, RunLockedError
from .io import atomic_savez, atomic_write_text, read_npz, sha256_file

__all__ = ["check_manifest", "locked", "verified_chunk", "write_chunk"]


def write_chunk(path: Path, arrays: dict[str, np.ndarray], start: int, length: int) -> None:
    """Write one chunk's arrays (with its start) and then its record, each atomically."""
    arrays["start"] = np.array(start)
    atomic_savez(path, arrays)
    record = {"start": start, "length": length, "sha256": sha256_file(path)}
    atomic_write_text(path.with_suffix(".json"), json.dumps(record))


def check_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write ``directory/run.json`` the first time; refuse a directory that holds another run."""
    manifest_path = directory / "run.json"
    if not manifest_path.exists():
        atomic_write_text(manifest_path, json.dumps(manifest, indent=2))
        return
    try:
        previous = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        previous = {}
    if not isinstance(previous, dict):
        previous = {}
    if previous != manifest:
        different = sorted(key for key in manifest if previous.get(key) != manifest[key])
        detail = ""
        if "settings" in different:
            old, new = _flat(previous.get("settings") or {}), _flat(manifest["settings"])
            detail = "; settings " + ", ".join(
                f"{key}: {old.get(key)!r} → {new.get(key)!r}"
                for key in sorted(set(old) | set(new))
                if old.get(key) != new.get(key)
            )
        raise FingerprintMismatchError(
            f"{directory} holds another run (different {', '.join(different)}{detail}); "
            "use a new directory, or delete this one to start over"
        )


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``{"ihvp.damping": 0.01, …}``."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def verified_chunk(
    path: Path, start: int, length: int, valid: Callable[[dict[str, np.ndarray], int, int], bool]
) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """(the chunk's arrays, None) if it checks out; (None, what is wrong) if not; (None, None) if absent."""
    record_path = path.with_suffix(".json")
    if not path.exists():
        return None, None
    if not record_path.exists():  # killed between the two writes: nothing damaged, just redo
        return None, None
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return None, "has an unreadable record"
    if not isinstance(record, dict) or record.get("sha256") != sha256_file(path):
        return None, "does not match its checksum (damaged or edited)"
    if record.get("start") != start or record.get("length") != length:
        return None, (
            f"was written for samples {record.get('start')} + {record.get('length')}, "
            f"not {start} + {length}"
        )
    stored = read_npz(path)
    if stored is None:
        return None, "cannot be read"
    try:
        ok = int(stored["start"]) == start and valid(stored, start, length)
    except (KeyError, ValueError, IndexError):
        ok = False
    if not ok:
        return None, "holds arrays of the wrong length"
    return stored, None


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold ``directory/run.lock`` for the run; refuse if a live process holds it."""
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / "run.lock"
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None:
                raise RunLockedError(
                    f"{directory} is being written by another process (pid {holder['pid']} on "
                    f"{holder['host']}); wait for it to finish, or use another directory"
                ) from None
            lock.unlink(missing_ok=True)  # a stale lock: its process is gone
            continue
        with os.fdopen(handle, "w") as out:
            json.dump(me, out)
        break
    else:  # pragma: no cover - another process won the race twice
        raise RunLockedError(f"{directory} is being written by another process")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _lock_holder(lock: Path) -> dict[str, Any] | None:
    """The live holder of a lock file, or ``None`` if the lock is stale."""
    try:
        holder = json.loads(lock.read_text())
        pid, host = int(holder["pid"]), str(holder["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname():
        return {"pid": pid, "host": host}  # cannot tell from here: assume it is alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return {"pid": pid, "host": host}
