"""Layer-wise statistics for PyTorch: each layer's inputs and output gradients, from module hooks.

One forward pass with forward hooks on the selected ``nn.Linear``, Hugging
Face ``Conv1D`` (a dense layer stored ``(in, out)``) and ``nn.Conv2d`` modules records each layer's input and output; one
``torch.autograd.grad`` of the summed per-sample losses with respect to those
outputs gives every sample's ∂ℓ_i/∂z (samples are independent in inference
mode, so the gradient of the sum is the per-sample gradient, row by row).
Nothing is accumulated into ``.grad``. Convolutions are unfolded
(``torch.nn.functional.unfold``) into patches in the canonical ``(kh, kw, in)``
order. Hooks were chosen over ``torch.func`` because the statistics are
intermediate values of the user's own forward pass, which hooks read as they
are, whatever the module's ``forward`` does around its layers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from influence_core.plugin import Layer

__all__ = ["find_layers", "recorded_layers", "statistics"]


def _conv_supported(module: torch.nn.Conv2d) -> bool:
    return (
        module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


#: Hugging Face's ``Conv1D`` (GPT-2's attention and MLP): a dense layer x W + b whose weight is
#: stored (in, out), the canonical layout. Matched by name: transformers is never imported here.
_HF_CONV1D = "transformers.pytorch_utils.Conv1D"


def _is_hf_conv1d(module: torch.nn.Module) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" == _HF_CONV1D for c in type(module).__mro__)


def find_layers(module: torch.nn.Module, selected: Sequence[str]) -> tuple[Layer, ...]:
    """The dense (Linear, Hugging Face Conv1D) and Conv2d layers whose weight is in θ, in order."""
    chosen = set(selected)
    found = []
    for name, child in module.named_modules():
        prefix = f"{name}." if name else ""
        kernel = f"{prefix}weight"
        if kernel not in chosen:
            continue
        bias = f"{prefix}bias" if f"{prefix}bias" in chosen else None
        if isinstance(child, torch.nn.Linear):
            found.append(Layer(name, "dense", kernel, bias, child.in_features, child.out_features))
        elif _is_hf_conv1d(child) and child.weight.ndim == 2:
            p_in, p_out = (int(s) for s in child.weight.shape)
            found.append(Layer(name, "dense", kernel, bias, p_in, p_out))
        elif isinstance(child, torch.nn.Conv2d) and _conv_supported(child):
            kh, kw = child.kernel_size
            inputs = kh * kw * child.in_channels
            found.append(Layer(name, "conv2d", kernel, bias, inputs, child.out_channels))
    return tuple(found)


@contextmanager
def recorded_layers(
    module: torch.nn.Module, layers: Sequence[Layer]
) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Inside the block, each forward pass records ``{name: (input, output)}`` of ``layers``."""
    modules = dict(module.named_modules())
    records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for layer in layers:

        def hook(_: Any, args: tuple[Any, ...], output: Any, name: str = layer.name) -> None:
            records[name] = (args[0], output)

        handles.append(modules[layer.name].register_forward_hook(hook))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _patches(module: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(b, positions, kh·kw·in): the unfolded input, each patch in canonical (kh, kw, in) order."""
    kh, kw = module.kernel_size
    cols = torch.nn.functional.unfold(
        x, (kh, kw), dilation=module.dilation, padding=module.padding, stride=module.stride
    )  # (b, in·kh·kw, L), channel-major
    b, _, positions = cols.shape
    cols = cols.reshape(b, module.in_channels, kh, kw, positions)
    return cols.permute(0, 4, 2, 3, 1).reshape(b, positions, kh * kw * module.in_channels)


def statistics(
    module: torch.nn.Module,
    layers: Sequence[Layer],
    records: dict[str, tuple[torch.Tensor, torch.Tensor]],
    losses: torch.Tensor,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (a (b, T, p_in), g (b, T, p_out))}`` from one recorded forward pass and its losses."""
    outputs = [records[layer.name][1] for layer in layers]
    grads = torch.autograd.grad(losses.sum(), outputs)
    modules = dict(module.named_modules())
    out = {}
    for layer, g in zip(layers, grads, strict=True):
        x = records[layer.name][0].detach()
        b = x.shape[0]
        if layer.kind == "conv2d":
            a = _patches(modules[layer.name], x)
            g = g.reshape(b, layer.outputs, -1).transpose(1, 2)
        else:
            a = x.reshape(b, -1, layer.inputs)
            g = g.reshape(b, -1, layer.outputs)
        out[layer.name] = (a, g.detach())
    return out
