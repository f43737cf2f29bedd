"""PyTorch kernels of the autodiff protocol, built on ``torch.func``.

* per-sample gradients: ``vmap(grad(ℓ))`` over the batch, with the model called
  through ``functional_call`` on views of one flat θ, so the result is ``(b, d)``
  with no per-parameter concatenation afterwards;
* HVPs: double backward, ``vjp`` of ``grad`` (one linearisation per batch),
  ``vmap``-ed over the ``k`` columns of the block.

The model is called as ``model(inputs)`` in whatever mode the user left it:
call ``model.eval()`` first if it has dropout or batch norm.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.func import functional_call, grad, vjp, vmap
from torch.utils._pytree import tree_map

from influence_core.parameters import select_parameters
from influence_core.protocol import ModelKernels

from .data import native_batches
from .namespace import namespace


class TorchKernels(ModelKernels):
    """Kernels for a ``torch.nn.Module`` and a per-sample loss ``loss_fn(outputs, targets)``."""

    backend_name = "torch"

    def __init__(self, model: torch.nn.Module, loss_fn: Any, parameters: str | Sequence[str] | None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"the torch backend needs a torch.nn.Module, got {type(model).__name__}")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters (requires_grad=True)")
        self._all_names = tuple(n for n, _ in named)
        chosen = select_parameters(self._all_names, parameters, ".")
        self._names = tuple(self._all_names[i] for i in chosen)
        self._params = [named[i][1] for i in chosen]
        dtypes = {p.dtype for p in self._params}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise TypeError(
                f"the selected parameters must share one floating dtype, got {sorted(map(str, dtypes))}; "
                "cast the model with model.double() or model.float()"
            )
        self._dtype = next(iter(dtypes))
        self._device = self._params[0].device
        self._shapes = tuple(tuple(p.shape) for p in self._params)
        self._sizes = [p.numel() for p in self._params]
        self.module = model
        self.loss_fn = loss_fn
        self._per_sample_grads = vmap(grad(self._sample_loss), in_dims=(None, 0, 0))
        self._mean_grad = grad(self._mean_loss)

    # -- description --------------------------------------------------------------
    @property
    def xp(self) -> Any:
        return namespace

    @property
    def all_parameter_names(self) -> tuple[str, ...]:
        return self._all_names

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return self._names

    @property
    def parameter_shapes(self) -> tuple[tuple[int, ...], ...]:
        return self._shapes

    @property
    def name_separator(self) -> str:
        return "."

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    # -- θ ------------------------------------------------------------------------
    def get_flat_parameters(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params])

    def set_flat_parameters(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            for p, chunk in zip(self._params, torch.split(flat, self._sizes), strict=True):
                p.copy_(chunk.view_as(p))

    def _unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        chunks = torch.split(flat, self._sizes)
        return {n: c.view(s) for n, c, s in zip(self._names, chunks, self._shapes, strict=True)}

    # -- losses -------------------------------------------------------------------
    def _losses(self, flat: torch.Tensor, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        outputs = functional_call(self.module, self._unflatten(flat), (inputs,), strict=False)
        return self.loss_fn(outputs, targets)

    def _sample_loss(self, flat: torch.Tensor, x: Any, y: torch.Tensor) -> torch.Tensor:
        batched = tree_map(lambda t: t.unsqueeze(0), x)
        return self._losses(flat, batched, y.unsqueeze(0)).sum()

    def _mean_loss(self, flat: torch.Tensor, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        return self._losses(flat, inputs, targets).mean()

    # -- kernels ------------------------------------------------------------------
    def per_sample_loss(self, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.loss_fn(self.module(inputs), targets)

    def mean_loss_grad(self, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        return self._mean_grad(self.get_flat_parameters(), inputs, targets)

    def per_sample_grads(self, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        return self._per_sample_grads(self.get_flat_parameters(), inputs, targets)

    def mean_loss_hvp(self, inputs: Any, targets: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        _, vjp_fn = vjp(lambda t: self._mean_grad(t, inputs, targets), self.get_flat_parameters())
        if vectors.shape[1] == 1:
            return vjp_fn(vectors[:, 0])[0].unsqueeze(1)
        return vmap(lambda v: vjp_fn(v)[0], in_dims=1, out_dims=1)(vectors)

    # -- data ---------------------------------------------------------------------
    def as_native(self, array: Any, *, floating: bool | None = None) -> torch.Tensor:
        tensor = torch.as_tensor(array, device=self._device)
        if floating or (floating is None and tensor.is_floating_point()):
            tensor = tensor.to(self._dtype)
        return tensor

    def native_batches(self, data: Any, batch_size: int) -> Iterator[Any] | None:
        return native_batches(data, batch_size)
