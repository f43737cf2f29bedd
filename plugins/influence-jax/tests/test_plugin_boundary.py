"""The JAX plugin uses only the public plugin API: influence_core.plugin (and the conformance specs)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "influence_jax"
ALLOWED = {"influence_core.plugin", "influence_conformance.specs"}


def test_the_plugin_imports_only_the_plugin_api() -> None:
    imported = set()
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
    ours = {name for name in imported if name.split(".")[0].startswith("influence")}
    assert ours <= ALLOWED, ours - ALLOWED
    assert not any(name.split(".")[0] in {"torch", "tensorflow", "keras"} for name in imported)
