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


def test_the_hookspec_example_names_types_a_real_model_and_array_have() -> None:
    """Issue 26, fault 17: the example named flax.nnx.Module and jaxlib.xla_extension.ArrayImpl,
    which no installed model or array has in its MRO (so a copied plugin matched nothing)."""
    import re

    import jax.numpy as jnp
    from flax import nnx

    import influence_core.plugin.hookspecs as hookspecs

    def names(obj) -> set[str]:
        return {f"{c.__module__}.{c.__qualname__}" for c in type(obj).__mro__}

    example = hookspecs.__doc__
    model_types = re.search(r"model_types=\(\"([^\"]+)\",\)", example).group(1)
    array_types = re.search(r"array_types=\(\"([^\"]+)\",\)", example).group(1)
    assert model_types in names(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
    assert array_types in names(jnp.ones(2))
