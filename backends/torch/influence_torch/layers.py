"""Layer-wise statistics for PyTorch: each layer's inputs and output gradients, from module hooks.

One forward pass with forward hooks on the selected ``nn.Linear``, Hugging
Face ``Conv1D`` (a dense layer stored ``(in, out)``), ``nn.Conv2d``,
``nn.Embedding`` (kind ``"embedding"``: its indices) and normalisation modules
(``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, ``nn.BatchNorm1d/2d/3d``
with running statistics; kind ``"elementwise"``: the normalised input x̂,
recomputed from the recorded input without the affine parameters) records each layer's input and output; one
``torch.autograd.grad`` of the summed per-sample losses with respect to those
outputs gives every sample's ∂ℓ_i/∂z (samples are independent in inference
mode, so the gradient of the sum is the per-sample gradient, row by row).
Nothing is accumulated into ``.grad``. Convolutions are unfolded
(``Tensor.unfold`` views, one copy) into patches in the canonical ``(kh, kw, in)``
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

from .attention import attention_layers, recorded_attention, supported

__all__ = [
    "conv2d_map",
    "conv2d_patches",
    "find_layers",
    "layer_gaps",
    "recorded_layers",
    "statistics",
    "tied_weights",
]


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


_NORMS = (
    torch.nn.LayerNorm,
    torch.nn.RMSNorm,
    torch.nn.GroupNorm,
    torch.nn.modules.batchnorm._BatchNorm,
)


def _own_forward(module: torch.nn.Module, base: type) -> bool:
    """Whether ``module`` runs ``base``'s forward: a subclass that overrides it (its output is
    not z = a W + b, say) is no layer of ``base``'s kind, and its hooks would mislead."""
    return type(module).forward is base.forward


def _embedding_supported(module: torch.nn.Embedding) -> bool:
    """Plain lookups: ``max_norm`` rewrites rows in the forward pass, ``scale_grad_by_freq`` rescales."""
    return module.max_norm is None and not module.scale_grad_by_freq


def _norm_width(module: torch.nn.Module) -> int | None:
    """p of a normalisation layer with affine parameters whose x̂ we can recompute, else None."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.nn.Parameter):
        return None
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is None:
        return None  # normalises by the batch's statistics even in inference mode
    return int(weight.numel())


def tied_weights(module: torch.nn.Module) -> dict[str, list[str]]:
    """Weights used by more than one module (a language model's tied input and output tables)."""
    users: dict[int, list[str]] = {}
    for name, child in module.named_modules(remove_duplicate=False):
        weight = child.__dict__.get("_parameters", {}).get("weight")
        if isinstance(weight, torch.nn.Parameter):
            users.setdefault(id(weight), []).append(name)
    return {names[0]: names for names in users.values() if len(set(names)) > 1}


def _functional_children(module: torch.nn.Module) -> set[str]:
    """Modules whose parent applies their weights functionally, so their hooks never fire.

    ``nn.MultiheadAttention`` calls ``F.multi_head_attention_forward`` with its
    ``out_proj`` weights; that Linear's own forward never runs.
    """
    return {
        f"{name}.{child}" if name else child
        for name, parent in module.named_modules()
        if isinstance(parent, torch.nn.MultiheadAttention)
        for child, _ in parent.named_children()
    }


def find_layers(
    module: torch.nn.Module,
    selected: Sequence[str],
    sizes: dict[str, int] | None = None,
    *,
    generic: bool = True,
) -> tuple[Layer, ...]:
    """The layers whose weight is in θ, in order (see the module docstring for the kinds).

    A weight tied between modules (GPT-2's token table and output layer) gets
    no layer: its gradient sums two layers' statistics, which no block here
    describes, so the solvers name it. With ``generic``, every other selected
    parameter without a layer (one used
    directly: a positional table, a class token, attention's packed input
    projection; or one of a module of no kind above) gets a ``"parameter"``
    layer of its own, whose statistics are its vmapped per-sample gradients.
    """
    chosen = set(selected)
    if sizes is None:
        sizes = {name: p.numel() for name, p in module.named_parameters()}
    tied = {user for users in tied_weights(module).values() for user in users}
    functional = _functional_children(module)
    found = []
    for name, child in module.named_modules():
        if supported(child):  # packed projections: two dense layers (attention.py)
            found += attention_layers(name, child, chosen)
            continue
        prefix = f"{name}." if name else ""
        kernel = f"{prefix}weight"
        if kernel not in chosen or name in tied or name in functional:
            continue
        bias = f"{prefix}bias" if f"{prefix}bias" in chosen else None
        norm = next((base for base in _NORMS if isinstance(child, base)), None)
        if isinstance(child, torch.nn.Embedding) and _embedding_supported(child):
            if not _own_forward(child, torch.nn.Embedding):
                continue
            rows, width = (int(s) for s in child.weight.shape)
            found.append(Layer(name, "embedding", kernel, None, rows, width))
        elif norm is not None and _norm_width(child) is not None:
            if _own_forward(child, norm):
                found.append(Layer(name, "elementwise", kernel, bias, 1, _norm_width(child)))
        elif isinstance(child, torch.nn.Linear):
            if _own_forward(child, torch.nn.Linear):
                inputs, outputs = child.in_features, child.out_features
                found.append(Layer(name, "dense", kernel, bias, inputs, outputs))
        elif _is_hf_conv1d(child) and child.weight.ndim == 2:
            p_in, p_out = (int(s) for s in child.weight.shape)
            found.append(Layer(name, "dense", kernel, bias, p_in, p_out))
        elif (
            isinstance(child, torch.nn.Conv2d)
            and _conv_supported(child)
            and _own_forward(child, torch.nn.Conv2d)
        ):
            kh, kw = child.kernel_size
            inputs = kh * kw * child.in_channels
            found.append(Layer(name, "conv2d", kernel, bias, inputs, child.out_channels))
    if generic:
        covered = {layer.kernel for layer in found} | {layer.bias for layer in found}
        refused = _refused(module, tied)
        for parameter in selected:
            if parameter not in covered and parameter not in refused:
                found.append(Layer(parameter, "parameter", parameter, None, 1, sizes[parameter]))
    return tuple(found)


def _refused(module: torch.nn.Module, tied: set[str]) -> set[str]:
    """Parameters no per-sample gradient describes well enough for a ``"parameter"`` layer.

    A tied table (its per-sample gradients would be a (b, vocabulary × width)
    block: untie it), an Embedding that rewrites its rows (``max_norm``) or
    rescales its gradient, and a BatchNorm that normalises by the batch (its
    samples are not independent).
    """
    out = set()
    for name, child in module.named_modules():
        bad = (
            name in tied
            or (isinstance(child, torch.nn.Embedding) and not _embedding_supported(child))
            or (
                isinstance(child, torch.nn.modules.batchnorm._BatchNorm)
                and child.running_mean is None
            )
        )
        if bad:
            out |= {f"{name}.{own}" if name else own for own in child._parameters}
    return out


def layer_gaps(module: torch.nn.Module, selected: Sequence[str]) -> dict[str, str]:
    """Why each selected parameter that :func:`find_layers` leaves out has no layer."""
    covered = set()
    for layer in find_layers(module, selected):
        covered |= {layer.kernel, layer.bias}  # "parameter" layers included: no gap
    owners = {}
    for name, child in module.named_modules():
        for own in child._parameters:
            owners[f"{name}.{own}" if name else own] = (name, child)
    tied = {user: users for users in tied_weights(module).values() for user in users}
    gaps = {}
    for parameter in selected:
        if parameter in covered or parameter not in owners:
            continue
        name, child = owners[parameter]
        kind = type(child).__name__
        if name in tied:
            why = f"a weight tied between {' and '.join(tied[name])} (untie it, e.g. "
            why += "tie_word_embeddings=False in a Hugging Face config, or leave it out)"
        elif isinstance(child, torch.nn.Embedding):
            why = "an Embedding with max_norm or scale_grad_by_freq"
        else:  # the last of _refused's cases
            why = f"a {kind} without running statistics (track_running_stats=False): it "
            why += "normalises by the batch, so its samples' gradients are not their own"
        gaps[parameter] = why
    return gaps


@contextmanager
def recorded_layers(
    module: torch.nn.Module, layers: Sequence[Layer], batch_size: int
) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Inside the block, each forward pass records ``{name: (input, output)}`` of ``layers``.

    A layer called once for the whole batch (a positional table looked up
    with ids of shape (1, T), broadcast over the samples) has its output
    expanded to the batch (b, T, …) on its way out: the values downstream are
    the same, and the gradient reaching it is then each sample's own. A layer
    whose leading axis is neither 1 nor b is refused by name.
    """
    modules = dict(module.named_modules())
    records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    attention = {}
    for layer in layers:
        owner, _, projection = layer.name.rpartition(".")
        if projection in ("in_proj", "out_proj") and supported(modules.get(owner)):
            attention[owner] = modules[owner]  # recorded by its own forward, not a hook
            continue

        def hook(_: Any, args: tuple[Any, ...], output: Any, name: str = layer.name) -> Any:
            x = args[0]
            if output.ndim == 0 or int(output.shape[0]) not in (1, batch_size):
                raise ValueError(
                    f"layer {name!r} is called on inputs of shape {tuple(x.shape)} that have no "
                    f"batch axis (the batch has {batch_size} samples): per-sample statistics need "
                    "one; give its inputs a leading batch axis of b or 1 (e.g. positions[None]), "
                    "or leave the layer out of parameters="
                )
            if int(output.shape[0]) != batch_size:
                output = output.expand(batch_size, *output.shape[1:])
                x = x.expand(batch_size, *x.shape[1:])
            records[name] = (x, output)
            return output

        handles.append(modules[layer.name].register_forward_hook(hook))
    try:
        with recorded_attention(attention, records):
            yield records
    finally:
        for handle in handles:
            handle.remove()


def conv2d_patches(module: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """(b, positions, kh·kw·in): the input's patches, each in canonical (kh, kw, in) order.

    The input is first copied once into a zero-bordered channels-last buffer
    (b, H + 2ph, W + 2pw, in): padding and the change of layout in one copy,
    where ``F.pad`` and then ``permute().contiguous()`` made two. ``Tensor.unfold``
    over its two spatial axes is then a view (b, H', W', in, span_h, span_w)
    whose channels are contiguous; the taps of a dilated kernel are every d-th
    entry of its span. The patches are one more copy, in canonical order,
    that reads runs of channels (reading them across a channel-major input
    was 1.3-2.5x slower; ``F.unfold`` gives them channel-major, and reordering
    them would copy them a second time).
    """
    kh, kw = module.kernel_size
    (ph, pw), (sh, sw), (dh, dw) = module.padding, module.stride, module.dilation
    b, channels, height, width = x.shape
    padded = x.new_empty((b, height + 2 * ph, width + 2 * pw, channels))
    if ph:
        padded[:, :ph].zero_()
        padded[:, height + ph :].zero_()
    if pw:
        padded[:, :, :pw].zero_()
        padded[:, :, width + pw :].zero_()
    padded[:, ph : height + ph, pw : width + pw].copy_(x.permute(0, 2, 3, 1))
    windows = padded.unfold(1, (kh - 1) * dh + 1, sh).unfold(2, (kw - 1) * dw + 1, sw)
    windows = windows[..., ::dh, ::dw]  # (b, H', W', in, kh, kw)
    rows, cols = windows.shape[1:3]
    return windows.permute(0, 1, 2, 4, 5, 3).reshape(b, rows * cols, kh * kw * channels)


def conv2d_map(module: torch.nn.Conv2d, x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """(b, T, m): patches(x) @ kernels for canonical kernels (kh·kw·in, m), as one convolution.

    The kernels become a weight (m, in, kh, kw) of the layer's geometry; the
    convolution's output (b, m, H', W') is returned as a view (b, T, m).
    """
    kh, kw = module.kernel_size
    m = int(kernels.shape[1])
    weight = kernels.reshape(kh, kw, module.in_channels, m).permute(3, 2, 0, 1)
    z = torch.nn.functional.conv2d(x, weight, None, module.stride, module.padding, module.dilation)
    return z.reshape(z.shape[0], m, -1).transpose(1, 2)


def _normalised(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x̂, the normalisation layer's output before its affine scale and shift."""
    F = torch.nn.functional
    if isinstance(module, torch.nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    if isinstance(module, torch.nn.RMSNorm):
        return F.rms_norm(x, module.normalized_shape, None, module.eps)
    if isinstance(module, torch.nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    shape = (1, -1) + (1,) * (x.ndim - 2)  # BatchNorm in inference mode: running statistics
    mean, var = module.running_mean.reshape(shape), module.running_var.reshape(shape)
    return (x - mean) / torch.sqrt(var + module.eps)


def _features_last(module: torch.nn.Module, x: torch.Tensor, width: int) -> torch.Tensor:
    """(b, T, p): channels last for GroupNorm/BatchNorm (channel axis 1), as they are otherwise."""
    b = x.shape[0]
    if isinstance(module, (torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm)):
        return x.reshape(b, width, -1).transpose(1, 2)
    return x.reshape(b, -1, width)


def statistics(
    module: torch.nn.Module,
    layers: Sequence[Layer],
    records: dict[str, tuple[torch.Tensor, torch.Tensor]],
    losses: torch.Tensor,
    *,
    defer: bool = False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (a (b, T, p_in), g (b, T, p_out))}`` from one recorded forward pass and its losses.

    With ``defer``, a convolution's a is its input x instead of its patches
    (:func:`conv2d_patches`, :func:`conv2d_map`).
    """
    outputs = [records[layer.name][1] for layer in layers]
    grads = torch.autograd.grad(losses.sum(), outputs)
    modules = dict(module.named_modules())
    out = {}
    for layer, g in zip(layers, grads, strict=True):
        x = records[layer.name][0].detach()
        b = x.shape[0]
        child = modules.get(layer.name)  # None for an attention projection (dense)
        if layer.kind == "conv2d":
            a = x if defer else conv2d_patches(child, x)
            g = g.reshape(b, layer.outputs, -1).transpose(1, 2)
        elif layer.kind == "embedding":
            a = x.reshape(b, -1)
            g = g.reshape(b, -1, layer.outputs)
            if child.padding_idx is not None:  # torch gives the padding row no gradient
                g = g * (a != child.padding_idx)[:, :, None]
        elif layer.kind == "elementwise":
            with torch.no_grad():
                a = _features_last(child, _normalised(child, x), layer.outputs)
            g = _features_last(child, g, layer.outputs)
        else:
            a = x.reshape(b, -1, layer.inputs)
            g = g.reshape(b, -1, layer.outputs)
        out[layer.name] = (a, g.detach())
    return out
