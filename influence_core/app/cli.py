"""The ``influence-core`` command: ``demo`` (the main job) and ``compare`` (torch vs TensorFlow)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "demo": "find flipped labels in digits with every estimator",
        "compare": "run every estimator on the same weights in every backend and report the disagreement",
    }
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in commands:
        print("usage: influence-core {demo,compare} [options]   (influence-core COMMAND --help)\n")
        for name, what in commands.items():
            print(f"  {name:8s} {what}")
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    if argv[0] == "demo":
        from .demo import main as run
    else:
        from .compare import main as run
    return run(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
