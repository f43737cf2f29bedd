"""Run every library on every workload it implements, one process each, then write the report.

    .venv/bin/python benchmarks/peers/run_all.py [--repeats N] [--timeout S] [--only WORKLOAD ...]
                                                 [--no-scaling] [--no-profiles]

The peers run from their own environments (``setup_envs.sh`` creates them);
influence_core and the limit rows run from the project's ``.venv``. A run that
fails or passes the time limit is recorded as such, and the report says so.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, SETUP, WORKLOADS

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ENVS = ROOT / "benchmarks" / ".envs"
PROJECT = ROOT / ".venv" / "bin" / "python"

ALL = tuple(WORKLOADS)
IF_WORKLOADS = ("exact_last", "exact_all", "cg_last", "lissa_last", "arnoldi_last")

#: (library, backend, python, script + leading arguments, workloads it implements)
RUNNERS: list[tuple[str, str, Path, list[str], tuple[str, ...]]] = [
    ("influence_core", "torch", PROJECT, ["run_ours.py", "{w}", "torch"], ALL),
    ("influence_core", "tensorflow", PROJECT, ["run_ours.py", "{w}", "tensorflow"], ALL),
    ("limit", "torch", PROJECT, ["run_limit_torch.py", "{w}"], ALL),
    ("limit", "tensorflow", PROJECT, ["run_limit_tf.py", "{w}"], ALL),
    (
        "dattri 0.3.0",
        "torch",
        ENVS / "torch-peers/bin/python",
        ["run_dattri.py", "{w}"],
        (*IF_WORKLOADS, "tracin_all", "tracin_conv"),
    ),
    (
        "captum 0.9.0",
        "torch",
        ENVS / "torch-peers/bin/python",
        ["run_captum.py", "{w}"],
        ("exact_last", "exact_all", "arnoldi_last", "tracin_all", "topk_last", "tracin_conv"),
    ),
    ("pyDVL 0.10.0", "torch", ENVS / "pydvl/bin/python", ["run_pydvl.py", "{w}"], IF_WORKLOADS),
    (
        "pyDVL 0.10.0 (per vector)",
        "torch",
        ENVS / "pydvl/bin/python",
        ["run_pydvl.py", "{w}", "--per-vector"],
        ("cg_last",),
    ),
    (
        "Influenciae 0.3.0",
        "tensorflow",
        ENVS / "influenciae/bin/python",
        ["run_influenciae.py", "{w}"],
        (*IF_WORKLOADS, "tracin_all", "topk_last", "tracin_conv"),
    ),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--only", nargs="*", default=list(ALL), choices=ALL, metavar="WORKLOAD")
    parser.add_argument("--library", help="run only the libraries whose name starts with this")
    parser.add_argument("--no-scaling", action="store_true", help="skip scaling.py")
    parser.add_argument("--no-profiles", action="store_true", help="skip profile_close_calls.py")
    args = parser.parse_args()
    if not SETUP.exists():
        subprocess.run([str(PROJECT), "prepare.py"], cwd=HERE, check=True)
    for workload in args.only:
        for library, backend, python, command, workloads in RUNNERS:
            if workload in workloads and library.startswith(args.library or ""):
                run_one(library, backend, python, command, workload, args)
    if not args.no_scaling:
        subprocess.run([str(PROJECT), "scaling.py"], cwd=HERE, check=True)
    if not args.no_profiles:
        subprocess.run([str(PROJECT), "profile_close_calls.py"], cwd=HERE, check=True)
    subprocess.run([str(PROJECT), "report.py"], cwd=HERE, check=True)


def run_one(library, backend, python, command, workload, args) -> None:
    argv = [str(python), *[part.format(w=workload) for part in command], str(args.repeats)]
    started = time.perf_counter()
    try:
        done = subprocess.run(argv, cwd=HERE, capture_output=True, text=True, timeout=args.timeout)
        if done.returncode == 0:
            failure = None
        elif done.returncode == -9:  # the kernel's OOM killer sends SIGKILL
            failure = "killed by SIGKILL (out of memory)"
        else:
            failure = _last_line(done.stderr)
    except subprocess.TimeoutExpired:
        failure = f"did not finish in {args.timeout:.0f} s"
    if failure is None:
        print(done.stdout.strip().splitlines()[-1], flush=True)
        return
    stem = f"{workload}__{library}__{backend}".replace(" ", "_")
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "library": library,
        "backend": backend,
        "workload": workload,
        "failed": failure,
        "seconds": time.perf_counter() - started,
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(record, indent=2))
    print(
        f"{workload:14s} {library:15s} {backend:10s} FAILED: {failure}", file=sys.stderr, flush=True
    )


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


if __name__ == "__main__":
    main()
