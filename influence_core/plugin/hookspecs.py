"""The hooks a backend plugin implements (pluggy).

A plugin is a module with a function marked ``@hookimpl`` and registered
under the ``influence_core.backends`` entry-point group::

    # my_backend/plugin.py   (must import quickly: no framework import here, and
    # none in my_backend/__init__.py, which runs when this entry point loads)
    from influence_core.plugin import BackendSpec, hookimpl

    @hookimpl
    def influence_core_backends():
        return [BackendSpec(
            name="jax",
            # names as they stand in type(x).__mro__ (f"{c.__module__}.{c.__qualname__}")
            model_types=("flax.nnx.module.Module",),
            array_types=("jaxlib._jax.ArrayImpl",),
            kernels="my_backend.model:JaxKernels",  # (model, loss_fn, parameters, **options)
            namespace="jax:numpy",
            install_hint="pip install my-backend",
        )]

    # pyproject.toml
    [project.entry-points."influence_core.backends"]
    jax = "my_backend.plugin"
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .registry import BackendSpec

__all__ = ["ENTRY_POINT_GROUP", "PROJECT_NAME", "BackendHookSpecs", "hookimpl", "hookspec"]

PROJECT_NAME = "influence_core"
ENTRY_POINT_GROUP = "influence_core.backends"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class BackendHookSpecs:
    """Hook specifications for backend plugins."""

    @hookspec
    def influence_core_backends(self) -> Sequence[BackendSpec]:
        """Return the backends this plugin provides, as :class:`BackendSpec` records.

        Called once, the first time influence_core needs its registry. Must not
        import the framework: the records name types and factories as strings.
        """
