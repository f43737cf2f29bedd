"""Registers the TensorFlow backend. Imports nothing from TensorFlow: models are matched by class name."""

from __future__ import annotations

from influence_core.plugin import BackendSpec, hookimpl


@hookimpl
def influence_core_backends() -> list[BackendSpec]:
    return [
        BackendSpec(
            name="tensorflow",
            # Keras 3 layers/models are not tf.Modules; Keras 2 (tf_keras) models and
            # plain tf.Modules are.
            model_types=(
                "keras.src.layers.layer.Layer",
                "tensorflow.python.module.module.Module",
            ),
            array_types=(
                "tensorflow.python.framework.ops.EagerTensor",
                "tensorflow.python.framework.tensor.Tensor",
                "tensorflow.python.ops.resource_variable_ops.ResourceVariable",
            ),
            kernels="influence_tensorflow.model:TensorFlowKernels",
            namespace="influence_tensorflow.namespace:namespace",
            install_hint="pip install influence-core-tensorflow  (backends/tensorflow; installs tensorflow-cpu)",
            reference_models="influence_tensorflow.reference_models:build",
            requires=("tensorflow",),
        )
    ]
