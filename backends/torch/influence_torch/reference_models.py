"""Builds the conformance suite's reference models as ``torch.nn.Module`` s.

The specs' canonical layout is Keras' (NHWC images, ``(in, out)`` kernels); the
module takes NHWC inputs, runs convolutions in NCHW and returns to NHWC before
flattening, so the same inputs and weights give the same function.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from influence_conformance.specs import (
    Conv2D,
    Dense,
    Flatten,
    GlobalAveragePool,
    ModelSpec,
    ReferenceModel,
    canonical_offsets,
)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class _ToChannelsFirst(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class _MeanOverPositions(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))  # NCHW


class _FlattenChannelsLast(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)


def _activation(name: str | None) -> list[torch.nn.Module]:
    return {"tanh": [torch.nn.Tanh()], "relu": [torch.nn.ReLU()], None: []}[name]


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return ((outputs - targets) ** 2).mean(dim=-1)


def build(spec: ModelSpec, weights: list[np.ndarray], dtype: str) -> ReferenceModel:
    torch_dtype = _DTYPES[dtype]
    modules: dict[str, torch.nn.Module] = {}
    positions: list[np.ndarray] = []
    layer_names: list[str] = []
    offsets = iter(canonical_offsets(spec))
    w = iter(weights)
    channels_first = False
    for i, layer in enumerate(spec.layers):
        name = f"layer{i}"
        if isinstance(layer, Flatten):
            modules[name] = _FlattenChannelsLast() if channels_first else torch.nn.Flatten()
            channels_first = False
            continue
        if isinstance(layer, GlobalAveragePool):
            assert channels_first, "global average pooling follows a convolution"
            modules[name] = _MeanOverPositions()
            channels_first = False
            continue
        kernel, bias = next(w), next(w)
        k_off, b_off = next(offsets), next(offsets)
        if isinstance(layer, Dense):
            module = torch.nn.Linear(kernel.shape[0], kernel.shape[1])
            torch_kernel, kernel_perm = kernel.T, (1, 0)
        else:
            assert isinstance(layer, Conv2D)
            if not channels_first:
                modules[f"{name}_to_nchw"] = _ToChannelsFirst()
                channels_first = True
            module = torch.nn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[0])
            torch_kernel, kernel_perm = kernel.transpose(3, 2, 0, 1), (3, 2, 0, 1)
        module = module.to(
            torch_dtype
        )  # before loading: float64 weights must not pass through float32
        with torch.no_grad():
            module.weight.copy_(torch.as_tensor(np.ascontiguousarray(torch_kernel)))
            module.bias.copy_(torch.as_tensor(bias))
        modules[name] = module
        layer_names.append(name)
        positions.append(
            k_off + np.arange(kernel.size).reshape(kernel.shape).transpose(kernel_perm).ravel()
        )
        positions.append(b_off + np.arange(bias.size))
        for j, act in enumerate(_activation(layer.activation)):
            modules[f"{name}_act{j}"] = act
    model = _sequential(modules)
    model = model.to(torch_dtype).eval()

    if spec.loss == "mse":
        loss_fn, scalar_loss = _mse, torch.nn.MSELoss()
    else:
        loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
        scalar_loss = torch.nn.CrossEntropyLoss()

    def native_dataset(X: np.ndarray, y: np.ndarray, batch_size: int | None) -> Any:
        data = TensorDataset(torch.as_tensor(X, dtype=torch_dtype), torch.as_tensor(y))
        return (
            data if batch_size is None else DataLoader(data, batch_size=batch_size, shuffle=False)
        )

    return ReferenceModel(
        model=model,
        loss_fn=loss_fn,
        canonical_positions=np.concatenate(positions),
        layer_names=layer_names,
        native_dataset=native_dataset,
        scalar_loss_fn=scalar_loss,
    )


def _sequential(modules: dict[str, torch.nn.Module]) -> torch.nn.Sequential:
    from collections import OrderedDict

    return torch.nn.Sequential(OrderedDict(modules))


class _Tokens(torch.nn.Module):
    """Token table (padding index 0) and positional table looked up once, LayerNorm, RMSNorm, head."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(9, 4, padding_idx=0)
        self.positions = torch.nn.Embedding(5, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.rms = torch.nn.RMSNorm(4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tokens(ids) + self.positions(torch.arange(ids.shape[1])[None])
        return self.head(self.rms(torch.tanh(self.norm(h))).mean(dim=1))


class _NamedLinear(torch.nn.Linear):
    """A user's subclass of Linear that keeps Linear's forward: a dense layer, weight (out, in)."""


class _ScaledLinear(torch.nn.Linear):
    """A subclass whose forward is not Linear's (its output is not a W + b): no dense layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * super().forward(x)


class _Direct(torch.nn.Module):
    """Parameters used directly: a class token, a positional table added to activations,
    a grouped Conv1d, a Linear subclass with its own forward; beside ``nn.MultiheadAttention``
    (two dense layers, attention.py) and a plain Linear subclass (dense)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = _ScaledLinear(3, 4)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, 4))
        self.pos = torch.nn.Parameter(torch.randn(6, 4))
        self.attention = torch.nn.MultiheadAttention(4, 2, batch_first=True)
        self.mix = torch.nn.Conv1d(4, 4, 1, groups=2)
        self.head = _NamedLinear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), h], dim=1) + self.pos
        h = h + self.attention(h, h, h, need_weights=False)[0]
        h = self.mix(torch.tanh(h).transpose(1, 2)).transpose(1, 2)
        return self.head(h[:, 0] + h.mean(dim=1))


def layer_kind_case(kind: str) -> tuple[torch.nn.Module, Any, tuple[Any, Any]] | None:
    """A float64 model with a layer of ``kind`` and a batch (the conformance suite's LayerKindChecks)."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    loss = torch.nn.CrossEntropyLoss(reduction="none")
    if kind == "embedding":
        net = _Tokens().double()
        ids = rng.integers(0, 9, (7, 5))
        ids[0, :2], ids[1] = 0, 3  # padding, and one token at every position
        return net, loss, (torch.as_tensor(ids), torch.as_tensor(rng.integers(0, 3, 7)))
    if kind == "elementwise":
        net = torch.nn.Sequential(
            torch.nn.Conv2d(2, 4, 3, padding=1),
            torch.nn.BatchNorm2d(4),
            torch.nn.ReLU(),
            torch.nn.GroupNorm(2, 4),
            torch.nn.Flatten(),
            torch.nn.Linear(4 * 16, 3),
        ).double()
        with torch.no_grad():  # running statistics and an affine map away from the identity
            net[1].running_mean.uniform_(-1, 1)
            net[1].running_var.uniform_(0.5, 2)
            net[1].weight.uniform_(0.5, 1.5)
            net[3].bias.uniform_(-0.5, 0.5)
        x = torch.as_tensor(rng.standard_normal((7, 2, 4, 4)))
        return net.eval(), loss, (x, torch.as_tensor(rng.integers(0, 3, 7)))
    if kind == "parameter":
        net = _Direct().double().eval()
        x = torch.as_tensor(rng.standard_normal((7, 5, 3)))
        return net, loss, (x, torch.as_tensor(rng.integers(0, 3, 7)))
    return None
