"""Run the conformance suite against registered backends: one command, no test file.

    python -m influence_conformance --backend NAME [--backend OTHER] [pytest options]

With one ``--backend`` it runs :class:`BackendConformance`; with two or more it
also runs :class:`CrossBackendConformance` across them. Exit status is pytest's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest

from influence_core import get_registry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m influence_conformance", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--backend", action="append", required=True, help="registered backend name")
    args, pytest_args = parser.parse_known_args(argv)
    installed = get_registry().names()
    missing = [b for b in args.backend if b not in installed]
    if missing:
        parser.error(f"backend(s) {missing} are not registered; installed: {installed}")
    os.environ["INFLUENCE_CONFORMANCE_BACKENDS"] = ",".join(args.backend)
    target = str(Path(__file__).with_name("run_registered.py"))
    return int(pytest.main([target, "-p", "no:cacheprovider", *pytest_args]))


if __name__ == "__main__":
    sys.exit(main())
