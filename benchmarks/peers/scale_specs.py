"""The three model sizes of the EK-FAC scaling benchmark, as conformance-suite specs.

Both sides build the same network from these specs and the same canonical
weights: ours through each backend's reference-model builder, kronfluence
through the torch one (``run_kronfluence_spec.py``).
"""

from __future__ import annotations

from influence_conformance.specs import Conv2D, Dense, GlobalAveragePool, ModelSpec

SPECS = {
    "mlp-0.1M": ModelSpec("mlp", (784,), (Dense(128, "tanh"), Dense(10)), "cross_entropy", "-"),
    "cnn-1M": ModelSpec(
        "cnn",
        (16, 16, 3),
        (  # four 3×3 convolutions, then the mean over positions, as a ResNet's head
            Conv2D(64, 3, "relu"),
            Conv2D(128, 3, "relu"),
            Conv2D(256, 3, "relu"),
            Conv2D(256, 3, "relu"),
            GlobalAveragePool(),
            Dense(10),
        ),
        "cross_entropy",
        "-",
    ),
    "mlp-5.2M": ModelSpec(  # the TracIn-projection issue's 5.2M-parameter model
        "mlp5",
        (1024,),
        (Dense(2048, "tanh"), Dense(1512, "tanh"), Dense(10)),
        "cross_entropy",
        "-",
    ),
    "wide-10M": ModelSpec(
        "wide",
        (1024,),
        (Dense(2048, "tanh"), Dense(2048, "tanh"), Dense(2048, "tanh"), Dense(10)),
        "cross_entropy",
        "-",
    ),
}


def worker_threads(backend: str, threads: int = 2) -> None:
    """Pin one of our benchmark worker processes to ``threads`` compute threads, per framework.

    Called first thing in each worker, before its framework does any work,
    so every run of the scale benchmarks uses the machine the same way.
    """
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    elif backend == "torch":
        import torch

        torch.set_num_threads(threads)
    elif backend == "jax":
        import os

        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=true")
