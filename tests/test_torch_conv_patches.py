"""torch convolutions of every supported geometry: their statistics rebuild the per-sample gradients.

The patches are read from a zero-bordered channels-last copy of the input
(``influence_torch.layers.conv2d_patches``); padding, stride, dilation and kernel
sizes that differ per axis each move which input entry a tap reads, so each
is varied on its own and all together, in float64, against ``vmap(grad)``.
"""

from __future__ import annotations

import pytest
import torch

from influence_core import InfluenceModel
from influence_core.layerwise import per_sample_grads_from_layers

GEOMETRIES = {
    "plain": {"kernel_size": 3},
    "padded": {"kernel_size": 3, "padding": 1},
    "padded per axis": {"kernel_size": (3, 2), "padding": (2, 1)},
    "strided per axis": {"kernel_size": 3, "padding": 1, "stride": (2, 1)},
    "dilated per axis": {"kernel_size": (3, 2), "dilation": (2, 3), "padding": (1, 2)},
    "all at once": {"kernel_size": (2, 3), "padding": (1, 3), "stride": (3, 2), "dilation": (2, 1)},
    "1x1 no bias": {"kernel_size": 1, "bias": False, "stride": 2},
}


def geometry_model(geometry: str) -> tuple[InfluenceModel, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, **GEOMETRIES[geometry])
    with torch.no_grad():
        width = conv(torch.zeros(1, 3, 9, 8)).numel()
    net = torch.nn.Sequential(
        conv, torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(width, 3)
    ).double()
    model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=5)
    return model, (torch.randn(5, 3, 9, 8, dtype=torch.float64), torch.randint(0, 3, (5,)))


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_conv_statistics_rebuild_the_per_sample_gradients(geometry: str) -> None:
    model, data = geometry_model(geometry)
    from_layers = per_sample_grads_from_layers(model, data)
    exact = model.per_sample_grads(data)
    assert torch.allclose(from_layers, exact, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_the_deferred_input_gives_the_patches_and_their_map(geometry: str) -> None:
    """conv2d_patches(x) equals the statistics' patches; conv2d_map(x, K) equals patches @ K."""
    model, (X, y) = geometry_model(geometry)
    kernels = model.kernels
    layer = next(layer for layer in kernels.layers() if layer.kind == "conv2d")
    a, g = kernels.layer_statistics(X, y)[layer.name]
    x, g_deferred = kernels.layer_statistics_deferred(X, y)[layer.name]
    assert torch.equal(g_deferred, g)
    assert torch.equal(kernels.conv2d_patches(layer, x), a)
    K = torch.randn(layer.inputs, 7, dtype=torch.float64)
    assert torch.allclose(kernels.conv2d_map(layer, x, K), a @ K, rtol=1e-12, atol=1e-13)


def few_test_point_scores(model, data, n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """EK-FAC scores of every training point against n test points: layer-wise and through (b, d)."""
    from influence_core import EKFACIHVP, FirstOrderInfluenceCalculator
    from influence_core.ihvp.base import InverseHessianVectorProduct

    class ThroughGradients(EKFACIHVP):
        training_side = InverseHessianVectorProduct.training_side

    test = (data[0][:n], data[1][:n])
    layerwise = FirstOrderInfluenceCalculator(model, EKFACIHVP()).fit(data)
    flat = FirstOrderInfluenceCalculator(model, ThroughGradients()).fit(data)
    return layerwise.influence(test, data), flat.influence(test, data)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_few_test_points_are_scored_through_the_convolution_without_patches(
    geometry: str, n: int, monkeypatch
) -> None:
    """One test point through conv2d_map (no patches formed), more through G: all exact."""
    model, data = geometry_model(geometry)
    formed = []
    original = type(model.kernels).conv2d_patches

    def counted(self, layer, x):
        formed.append(layer.name)
        return original(self, layer, x)

    monkeypatch.setattr(type(model.kernels), "conv2d_patches", counted)
    layerwise, flat = few_test_point_scores(model, data, n)
    assert torch.allclose(layerwise, flat, rtol=1e-10, atol=1e-12)
    assert (formed == []) == (n == 1)  # the fit forms its patches in the statistics


def test_a_mapped_score_without_the_bias_fails_the_test_above(monkeypatch) -> None:
    from influence_core.ihvp import kfac

    def without_bias(self, block, P):
        layer = block.layer
        size = layer.inputs * layer.outputs
        g = self.stats.gradients(layer.name)
        kernel = P[:size, :].reshape(layer.inputs, layer.outputs)
        mapped = self.model.kernels.conv2d_map(layer, self.stats.deferred_input(layer.name), kernel)
        return (mapped * g).reshape(g.shape[0], -1).sum(1)[:, None]

    monkeypatch.setattr(kfac._LayerwiseTrainingSide, "_mapped_scores", without_bias)
    layerwise, flat = few_test_point_scores(*geometry_model("padded"))
    assert not torch.allclose(layerwise, flat, rtol=1e-10, atol=1e-12)


def test_a_backend_without_deferred_convolutions_scores_through_the_patches(monkeypatch) -> None:
    """A backend with only layer_statistics (the protocol's defaults for the rest): same scores."""
    from influence_core.plugin import ModelKernels

    model, data = geometry_model("padded")
    for name in ("layer_statistics_deferred", "conv2d_patches", "conv2d_map"):
        monkeypatch.setattr(type(model.kernels), name, getattr(ModelKernels, name))
    layerwise, flat = few_test_point_scores(model, data)
    assert torch.allclose(layerwise, flat, rtol=1e-10, atol=1e-12)


def test_a_backend_with_only_part_of_deferred_convolutions_scores_through_the_patches(
    monkeypatch,
) -> None:
    """Deferred statistics without conv2d_map would leave the scores nothing to read them with."""
    from influence_core.plugin import ModelKernels

    model, data = geometry_model("padded")
    monkeypatch.setattr(type(model.kernels), "conv2d_map", ModelKernels.conv2d_map)
    layerwise, flat = few_test_point_scores(model, data)
    assert torch.allclose(layerwise, flat, rtol=1e-10, atol=1e-12)


def test_a_backend_refusing_deferred_statistics_for_a_model_scores_through_the_patches(
    monkeypatch,
) -> None:
    """Implemented but refused for this model (UnsupportedByBackendError): the patches instead."""
    from influence_core.plugin import UnsupportedByBackendError

    def refused(self, inputs, targets, measurement=None):
        raise UnsupportedByBackendError("not for this model")

    model, data = geometry_model("padded")
    monkeypatch.setattr(type(model.kernels), "layer_statistics_deferred", refused)
    layerwise, flat = few_test_point_scores(model, data)
    assert torch.allclose(layerwise, flat, rtol=1e-10, atol=1e-12)


def test_deferred_statistics_with_a_wrong_gradient_shape_are_refused_naming_the_layer(
    monkeypatch,
) -> None:
    original = type(geometry_model("plain")[0].kernels).layer_statistics_deferred

    def transposed(self, inputs, targets, measurement=None):
        stats = original(self, inputs, targets, measurement)
        x, g = stats["0"]
        stats["0"] = (x, g.transpose(1, 2))  # (b, o, T): what a channel-major backend might give
        return stats

    model, data = geometry_model("plain")
    monkeypatch.setattr(type(model.kernels), "layer_statistics_deferred", transposed)
    with pytest.raises(ValueError, match=r"deferred layer statistics of layer '0' \(conv2d"):
        few_test_point_scores(model, data)


def test_one_test_point_over_a_shuffled_loader_scores_each_sample_in_dataset_order() -> None:
    """The map route reads whatever batch the loader gives; scores still land at dataset indices."""
    from torch.utils.data import DataLoader, TensorDataset

    from influence_core import EKFACIHVP, FirstOrderInfluenceCalculator

    model, (X, y) = geometry_model("strided per axis")
    calculator = FirstOrderInfluenceCalculator(model, EKFACIHVP(fisher="empirical")).fit((X, y))
    expected = calculator.influence((X[:1], y[:1]), (X, y))
    torch.manual_seed(3)
    shuffled = DataLoader(TensorDataset(X, y), batch_size=2, shuffle=True)
    got = calculator.influence((X[:1], y[:1]), shuffled)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-14)


def test_nan_in_a_sample_scored_through_the_map_is_named() -> None:
    from influence_core import EKFACIHVP, FirstOrderInfluenceCalculator, NonFiniteGradientError

    model, (X, y) = geometry_model("padded")
    calculator = FirstOrderInfluenceCalculator(model, EKFACIHVP(fisher="empirical")).fit((X, y))
    broken = X.clone()
    broken[3, 1, 4, 4] = float("nan")
    with pytest.raises(NonFiniteGradientError) as error:
        calculator.influence((X[:1], y[:1]), (broken, y))
    assert error.value.sample_indices == (3,)
