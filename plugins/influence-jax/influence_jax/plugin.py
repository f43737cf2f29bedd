"""Registers the JAX backend. Imports nothing from JAX: models are matched by class name."""

from __future__ import annotations

from influence_core.plugin import BackendSpec, hookimpl


@hookimpl
def influence_core_backends() -> list[BackendSpec]:
    return [
        BackendSpec(
            name="jax",
            model_types=("flax.nnx.module.Module", "influence_jax.model.Functional"),
            array_types=("jaxlib._jax.ArrayImpl",),
            kernels="influence_jax.model:JaxKernels",
            namespace="jax:numpy",  # jax.numpy implements the Array API itself
            install_hint="pip install influence-core-jax  (plugins/influence-jax; jax, flax)",
            reference_models="influence_jax.reference_models:build",
            requires=("jax", "flax"),
        )
    ]
