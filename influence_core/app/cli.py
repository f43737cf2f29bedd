"""The ``influence-core`` command: ``demo`` (the main job) and ``compare`` (torch vs TensorFlow).

Conventional argparse behaviour: ``--help`` at every level with the defaults
shown, ``--version``, a message and exit status 2 for an unknown command or a
bad option, and no traceback for an expected error (a backend that is not
installed, say): one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from .. import __version__
from ..errors import BackendNotFoundError, EmptyDataError, FingerprintMismatchError


def positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


@contextmanager
def stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null inside the block (C++ logs that no Python setting reaches)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def quiet_frameworks(backends: list[str] | None = None) -> None:
    """Silence the frameworks' start-up and retracing logs (``--quiet``), naming no framework.

    Some frameworks print C++ start-up lines while they are imported (TensorFlow's
    oneDNN and absl lines, whatever ``TF_CPP_MIN_LOG_LEVEL`` says), so each
    backend's kernels module, and with it its framework, is loaded here with
    stderr silenced; the Python loggers named after the modules a backend
    ``requires`` are then set to errors only (TensorFlow's retracing warnings).
    """
    from ..plugin import get_registry

    registry = get_registry()
    for name in registry.names() if backends is None else backends:
        if name in registry.names():
            spec = registry.by_name(name)
            with stderr_silenced():
                spec.load_kernels()
            for module in spec.requires:
                logging.getLogger(module).setLevel(logging.ERROR)


def parser() -> argparse.ArgumentParser:
    from . import compare, demo

    top = argparse.ArgumentParser(
        prog="influence-core",
        description="Training-data influence for PyTorch and TensorFlow from one implementation.",
    )
    top.add_argument("--version", action="version", version=f"influence-core {__version__}")
    commands = top.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in (("demo", demo), ("compare", compare)):
        sub = commands.add_parser(
            name,
            help=module.SUMMARY,
            description=module.SUMMARY,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return top


def main(argv: list[str] | None = None) -> int:
    # The demo and compare compute in float64; JAX needs x64 for that, set before it loads.
    os.environ.setdefault("JAX_ENABLE_X64", "1")
    top = parser()
    args = top.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        top.print_help()
        return 2
    if getattr(args, "quiet", False):
        backend = getattr(args, "backend", None)
        quiet_frameworks(
            None if backend is None else [backend] if isinstance(backend, str) else backend
        )
    try:
        return int(args.run(args))
    except (BackendNotFoundError, EmptyDataError, FingerprintMismatchError) as error:
        print(f"influence-core {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
