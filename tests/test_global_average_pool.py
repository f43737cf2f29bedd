"""A conv net with global average pooling (the benchmark's 1M conv net, small) on every backend.

The reference-model builders of torch, Keras and JAX agree on its per-sample
gradients (canonical layout, float64), and each backend's layer statistics
rebuild them, so EK-FAC runs on pooled conv nets in all three frameworks.
"""

from __future__ import annotations

import numpy as np
import pytest

from influence_conformance.specs import (
    Conv2D,
    Dense,
    GlobalAveragePool,
    ModelSpec,
    make_weights,
)
from influence_core import InfluenceModel, available_backends, get_registry
from influence_core.layerwise import per_sample_grads_from_layers

SPEC = ModelSpec(
    "pooled",
    (6, 6, 2),
    (Conv2D(3, 3, "relu"), Conv2D(4, 3, "tanh"), GlobalAveragePool(), Dense(3)),
    "cross_entropy",
    "-",
)
BACKENDS = [b for b in ("torch", "tensorflow", "jax") if b in available_backends()]


def canonical_grads(backend: str) -> np.ndarray:
    if backend == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
    reference = (
        get_registry()
        .by_name(backend)
        .load_reference_models()(SPEC, make_weights(SPEC, seed=2), "float64")
    )
    model = InfluenceModel(reference.model, reference.loss_fn)
    rng = np.random.default_rng(0)
    batch = (rng.normal(size=(5, 6, 6, 2)), rng.integers(0, 3, 5))
    flat = model.to_numpy(model.per_sample_grads(batch))
    rebuilt = model.to_numpy(per_sample_grads_from_layers(model, batch))
    assert np.max(np.abs(rebuilt - flat)) < 1e-13 * np.max(np.abs(flat)), backend
    return reference.to_canonical(flat, axis=1)


def test_pooled_conv_nets_agree_across_backends_and_layer_statistics_rebuild_them() -> None:
    if len(BACKENDS) < 2:
        pytest.skip(f"needs two backends, found {BACKENDS}")
    grads = {backend: canonical_grads(backend) for backend in BACKENDS}
    reference = grads[BACKENDS[0]]
    assert SPEC.num_parameters == reference.shape[1] == 2 * 9 * 3 + 3 + 3 * 9 * 4 + 4 + 4 * 3 + 3
    for backend in BACKENDS[1:]:
        gap = np.max(np.abs(grads[backend] - reference)) / np.max(np.abs(reference))
        assert gap < 1e-12, (backend, gap)
