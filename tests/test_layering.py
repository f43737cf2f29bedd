"""The core never imports a framework, in any module (the app included); backends hold no estimators."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = {"torch", "tensorflow", "keras", "tf_keras", "jax", "jaxlib", "flax"}


def imported_modules(package: Path) -> dict[str, set[str]]:
    """Top-level module names each file of ``package`` imports (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
        found[str(path.relative_to(ROOT))] = names
    return found


def test_influence_core_imports_no_framework() -> None:
    offenders = {
        path: sorted(names & FRAMEWORKS)
        for path, names in imported_modules(ROOT / "influence_core").items()
        if names & FRAMEWORKS
    }
    assert not offenders, offenders


def test_backends_use_only_the_plugin_api() -> None:
    """A backend package imports influence_core.plugin (and the conformance specs), nothing else of ours."""
    allowed = {"influence_core.plugin", "influence_conformance.specs"}
    for package in (
        "backends/torch/influence_torch",
        "backends/tensorflow/influence_tensorflow",
        "plugins/influence-jax/influence_jax",
    ):
        for path in (ROOT / package).rglob("*.py"):
            ours = {
                node.module
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.ImportFrom)
                and node.module
                and node.level == 0
                and node.module.startswith("influence_")
            }
            assert ours <= allowed, (str(path.relative_to(ROOT)), sorted(ours - allowed))
