"""Registers the PyTorch backend. Imports nothing from torch: models are matched by class name."""

from __future__ import annotations

from influence_core.plugin import BackendSpec, hookimpl


@hookimpl
def influence_core_backends() -> list[BackendSpec]:
    return [
        BackendSpec(
            name="torch",
            model_types=("torch.nn.modules.module.Module",),
            array_types=("torch.Tensor",),
            kernels="influence_torch.model:TorchKernels",
            namespace="influence_torch.namespace:namespace",
            install_hint="pip install influence-core-torch  (backends/torch; pins torch==2.13.0)",
            reference_models="influence_torch.reference_models:build",
            requires=("torch",),
        )
    ]
