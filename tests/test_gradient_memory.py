"""Per-sample gradients in bounded memory (issue 25, item 5): a batch whose (b, d) block exceeds
``gradient_memory`` is cut into sub-batches, with the same numbers and no block above the bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influence_core import (
    ConjugateGradientIHVP,
    FirstOrderInfluenceCalculator,
    GradientSimilarity,
    InfluenceModel,
    TracIn,
)

rng = np.random.default_rng(0)
X, Y = rng.normal(size=(60, 4)), rng.integers(0, 3, 60)
TEST = (X[:4], Y[:4])


def keras_net():
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((4,), dtype="float64"),
            keras.layers.Dense(8, "tanh", dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )


def model_of(backend: str, **settings) -> InfluenceModel:
    if backend == "torch":
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        return InfluenceModel(net.double(), torch.nn.CrossEntropyLoss(reduction="none"), **settings)
    import keras

    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None, dtype="float64"
    )
    return InfluenceModel(keras_net(), loss, **settings)


def scores(model: InfluenceModel) -> list[np.ndarray]:
    states = [model.save_state()]
    calculators = [
        TracIn(model, states, 0.1, layerwise=False),
        GradientSimilarity(model),
        FirstOrderInfluenceCalculator(model, ConjugateGradientIHVP(damping=1.0, tol=1e-12)),
    ]
    out = []
    for calc in calculators:
        calc.fit((X, Y))
        out += [model.to_numpy(calc.influence(TEST)), model.to_numpy(calc.self_influence())]
    return out


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_a_gradient_budget_cuts_batches_and_changes_no_score(backend: str) -> None:
    whole = model_of(backend, batch_size=50)
    d = whole.num_parameters
    bounded = model_of(backend, batch_size=50, gradient_memory=7 * d * 8)  # 7 rows of float64
    assert bounded.gradient_rows() == 7 and whole.gradient_rows() > 50
    seen = []
    kernels = bounded.kernels
    plain, checked = kernels.per_sample_grads, kernels.per_sample_grads_and_finite

    def spy(inputs, targets):
        seen.append(int(targets.shape[0]))
        return plain(inputs, targets)

    def spy_checked(inputs, targets):
        seen.append(int(targets.shape[0]))
        return checked(inputs, targets)

    kernels.per_sample_grads, kernels.per_sample_grads_and_finite = spy, spy_checked
    for got, want in zip(scores(bounded), scores(whole), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert seen and max(seen) <= 7  # no (b, d) block above the bound
    # a batch asked for whole is not cut: the (b, d) matrix the user asked for
    assert bounded.per_sample_grads((X[:20], Y[:20])).shape == (20, d)
    starts = [batch.start for batch in bounded.batches((X, Y))]
    assert starts == [0, 7, 14, 21, 28, 35, 42, 49, 50, 57]  # sub-batches keep their place


def test_gradient_memory_must_be_positive() -> None:
    with pytest.raises(ValueError, match="gradient_memory must be a positive"):
        model_of("torch", gradient_memory=0)


def test_passes_that_form_no_gradient_block_keep_their_batches() -> None:
    """Means, HVPs and K-FAC/EK-FAC factor passes are not cut (cutting would only add calls)."""
    from influence_core import EKFACIHVP

    model = model_of("torch", batch_size=50, gradient_memory=7 * 67 * 8)
    assert model.gradient_rows() == 7
    sizes: dict[str, list[int]] = {
        "mean_loss_grad": [],
        "mean_loss_hvp": [],
        "layer_statistics": [],
    }
    for name, seen in sizes.items():
        kernel = getattr(model.kernels, name)

        def spy(inputs, targets, *rest, kernel=kernel, seen=seen, **options):
            seen.append(int(targets.shape[0]))
            return kernel(inputs, targets, *rest, **options)

        setattr(model.kernels, name, spy)
    model.loss_grad((X, Y))
    model.hvp((X, Y), np.ones(model.num_parameters))
    EKFACIHVP(damping=0.1).fit(model, (X, Y))
    assert sizes == {
        "mean_loss_grad": [50, 10],
        "mean_loss_hvp": [50, 10],
        "layer_statistics": [50, 10] * 2,
    }


def test_a_model_factory_keeps_the_memory_and_length_bounds() -> None:
    """A Dask worker's model is built with the driver's gradient_memory and max_samples."""
    from influence_core.distributed import ModelFactory

    model = model_of("torch", gradient_memory=7 * 67 * 8, max_samples=500)

    def build():
        return torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
        ).double()

    rebuilt = ModelFactory.from_model(
        model, build, lambda: torch.nn.CrossEntropyLoss(reduction="none")
    )()
    assert (rebuilt.gradient_memory, rebuilt.max_samples) == (7 * 67 * 8, 500)
    assert rebuilt.gradient_rows() == 7
