"""Every distribution ships all of its packages, and the core distribution ships only the core."""

from __future__ import annotations

from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
#: Each backend and the conformance suite are distributions of their own beside the core.
DISTRIBUTIONS = [
    "backends/torch",
    "backends/tensorflow",
    "conformance_tests",
    "plugins/influence-jax",
]


def python_package_dirs(root: Path, top: str) -> set[str]:
    """Dotted names of every directory under ``root/top`` that holds Python modules."""
    found = set()
    for module in (root / top).rglob("*.py"):
        found.add(".".join(module.parent.relative_to(root).parts))
    return found


def test_the_core_distribution_finds_every_core_package_and_nothing_else() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["packages"]["find"]["include"] == ["influence_core*"]
    for package in python_package_dirs(ROOT, "influence_core"):
        # setuptools' find only sees regular packages: each directory needs an __init__.py.
        assert (ROOT / package.replace(".", "/") / "__init__.py").exists(), package


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_each_plugin_distribution_lists_its_packages(distribution: str) -> None:
    root = ROOT / distribution
    config = tomllib.loads((root / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    (top,) = {name.split(".")[0] for name in listed}
    assert (root / top / "__init__.py").exists(), f"the folder name is the import name: {top}"
    assert python_package_dirs(root, top) <= listed
    assert "influence-core" in config["project"]["dependencies"]


def test_the_installed_suite_s_asserts_are_rewritten_in_a_users_pytest_run(tmp_path: Path) -> None:
    """Issue 26, fault 15: a failing check showed a bare AssertionError (no values compared)."""
    import subprocess
    import sys

    (tmp_path / "test_users_backend.py").write_text(
        "import sys\n"
        "from influence_conformance import BackendConformance  # noqa: F401\n"
        "import influence_conformance.selection_checks  # noqa: F401\n\n"
        "def test_rewritten():\n"
        "    names = [n for n in sys.modules if n.startswith('influence_conformance.')]\n"
        "    bare = [n for n in names if '@pytest_ar' not in vars(sys.modules[n])]\n"
        "    assert names and not bare, bare\n\n"
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "error::pytest.PytestAssertRewriteWarning",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert "1 passed" in run.stdout, run.stdout + run.stderr
