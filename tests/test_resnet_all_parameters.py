"""ResNet-18 (the torchvision architecture, written here: torchvision does not install beside the
CPU torch) on all parameters: convolutions, BatchNorm in inference mode, the downsampling
shortcuts and the head, with EK-FAC, K-FAC, Kronecker TRAK and layer-wise TracIn (issue 25).

The test runs the architecture at an eighth of its width (8 to 64 channels, 0.18M parameters; at full width
it has 11,689,512 with 1,000 classes, as torchvision's)
on 16 × 16 images, so that it takes seconds; ``benchmarks/bench_resnet18.py`` runs it at full
width (11.2M).
"""

from __future__ import annotations

import numpy as np
import torch

from influence_core import (
    EKFACIHVP,
    KFACIHVP,
    TRAK,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
    KroneckerProjection,
    TracIn,
)
from influence_core.layerwise import coverage, per_sample_grads_from_layers


class BasicBlock(torch.nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(outputs)
        self.conv2 = torch.nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(outputs)
        self.downsample = None
        if stride != 1 or inputs != outputs:
            self.downsample = torch.nn.Sequential(
                torch.nn.Conv2d(inputs, outputs, 1, stride, bias=False),
                torch.nn.BatchNorm2d(outputs),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + shortcut)


class ResNet18(torch.nn.Module):
    """torchvision's resnet18: a 7×7 stem, max-pooling, four stages of two BasicBlocks, a head."""

    def __init__(self, width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(width)
        self.maxpool = torch.nn.MaxPool2d(3, 2, 1)
        stages, inputs = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            outputs = width * 2**i
            stages.append(
                torch.nn.Sequential(
                    BasicBlock(inputs, outputs, stride), BasicBlock(outputs, outputs, 1)
                )
            )
            inputs = outputs
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = torch.nn.Linear(inputs, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def resnet(width: int = 8, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """A ResNet-18 in inference mode with running statistics away from the identity."""
    torch.manual_seed(0)
    net = ResNet18(width).to(dtype)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return net.eval()


def test_resnet18_is_covered_whole_and_scored_by_every_layer_wise_estimator() -> None:
    net = resnet()
    assert sum(p.numel() for p in net.parameters()) == 177_362
    model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=8)
    covered = coverage(model)
    assert list(covered) == list(model.parameter_names)  # 100 % of θ: 20 convs, 20 BNs, fc
    kinds = [c.kind for c in covered.values()]
    assert kinds.count("conv2d") == 20 and kinds.count("elementwise") == 40
    rng = np.random.default_rng(0)
    X = torch.as_tensor(rng.standard_normal((16, 3, 16, 16)))
    y = torch.as_tensor(rng.integers(0, 10, 16))
    train, test = (X, y), (X[:3], y[:3])
    g_train = model.per_sample_grads(train)
    rebuilt = per_sample_grads_from_layers(model, (X[:4], y[:4]))
    assert float((rebuilt - g_train[:4]).abs().max() / g_train[:4].abs().max()) < 1e-12
    for solver in (KFACIHVP, EKFACIHVP):
        calculator = FirstOrderInfluenceCalculator(
            model, solver(damping=1e-3, fisher="empirical")
        ).fit(train)
        scores = calculator.influence(test)
        expected = calculator.ihvp.solve(g_train[:3].T).T @ g_train.T
        assert float((scores - expected).abs().max() / expected.abs().max()) < 1e-9
        own = calculator.self_influence()
        assert bool(torch.isfinite(own).all())
        both = calculator.influence_and_self_influence(test)  # one pass, in the eigenbases
        assert float((both[0] - expected).abs().max() / expected.abs().max()) < 1e-9
        assert float((both[1] - own).abs().max() / own.abs().max()) < 1e-9
        assert calculator.top_k(test, k=3).proponents.shape == (3, 3)
        one = calculator.influence((X[:1], y[:1]))  # through conv2d_map: no patches, no G
        assert float((one - expected[:1]).abs().max() / expected[:1].abs().max()) < 1e-9
    tracin = TracIn(model, [model.save_state()], 0.1, layerwise=True).fit(train)
    np.testing.assert_allclose(tracin.influence(test), 0.1 * g_train[:3] @ g_train.T, rtol=1e-9)
    trak = TRAK(model, projector=KroneckerProjection(8, 8), damping=1e-3).fit(train)
    assert bool(torch.isfinite(trak.influence(test)).all())


def test_batch_norm_in_training_mode_is_read_in_inference_mode() -> None:
    """A model left in training mode is scored as in inference: running statistics, per sample."""
    net = resnet()
    net.train()
    model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"))
    rng = np.random.default_rng(1)
    batch = (torch.as_tensor(rng.standard_normal((4, 3, 16, 16))), torch.as_tensor([1, 2, 3, 4]))
    flat = model.per_sample_grads(batch)
    rebuilt = per_sample_grads_from_layers(model, batch)
    assert float((rebuilt - flat).abs().max() / flat.abs().max()) < 1e-12
    assert net.training  # the user's model is left as it was
