"""PyTorch kernels of the autodiff protocol, built on ``torch.func``.

* gradients: ``vmap(grad(ℓ))`` over the batch with respect to the dict of
  selected parameters (``functional_call``), concatenated to ``(b, d)``: measured
  1.6x faster than differentiating with respect to views of one flat θ;
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

    def __init__(
        self, model: torch.nn.Module, loss_fn: Any, parameters: str | Sequence[str] | None
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"the torch backend needs a torch.nn.Module, got {type(model).__name__}"
            )
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
        self._mean_grad_dict = grad(self._mean_loss)
        self._mean_grad_flat = grad(lambda flat, x, y: self._mean_loss(self._unflatten(flat), x, y))

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
    def _detached(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in zip(self._names, self._params, strict=True)}

    def _concat(
        self, grads: dict[str, torch.Tensor], leading: tuple[int, ...] = ()
    ) -> torch.Tensor:
        return torch.cat([grads[n].reshape(*leading, -1) for n in self._names], dim=len(leading))

    def _losses(
        self, params: dict[str, torch.Tensor], inputs: Any, targets: torch.Tensor
    ) -> torch.Tensor:
        outputs = functional_call(self.module, params, (inputs,), strict=False)
        return self.loss_fn(outputs, targets)

    def _sample_loss(
        self, params: dict[str, torch.Tensor], x: Any, y: torch.Tensor
    ) -> torch.Tensor:
        batched = tree_map(lambda t: t.unsqueeze(0), x)
        return self._losses(params, batched, y.unsqueeze(0)).sum()

    def _mean_loss(
        self, params: dict[str, torch.Tensor], inputs: Any, targets: torch.Tensor
    ) -> torch.Tensor:
        return self._losses(params, inputs, targets).mean()

    # -- kernels ------------------------------------------------------------------
    def per_sample_loss(self, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.loss_fn(self.module(inputs), targets)

    # The kernels run under no_grad: torch.func transforms ignore it, but it stops
    # ordinary autograd from recording (and keeping alive) a graph through the
    # model's *unselected* parameters, which still have requires_grad=True.
    @torch.no_grad()
    def mean_loss_grad(self, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        return self._concat(self._mean_grad_dict(self._detached(), inputs, targets))

    @torch.no_grad()
    def per_sample_grads(self, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        grads = self._per_sample_grads(self._detached(), inputs, targets)
        return self._concat(grads, leading=(next(iter(grads.values())).shape[0],))

    @torch.no_grad()
    def mean_loss_hvp(
        self, inputs: Any, targets: torch.Tensor, vectors: torch.Tensor
    ) -> torch.Tensor:
        # Double backward on one flat θ: the vjp of the gradient, vmapped over the columns.
        _, vjp_fn = vjp(
            lambda t: self._mean_grad_flat(t, inputs, targets), self.get_flat_parameters()
        )
        if vectors.shape[1] == 1:
            return vjp_fn(vectors[:, 0])[0].unsqueeze(1)
        return vmap(lambda v: vjp_fn(v)[0], in_dims=1, out_dims=1)(vectors)

    # -- data ---------------------------------------------------------------------
    def as_native(self, array: Any, *, floating: bool | None = None) -> torch.Tensor:
        tensor = torch.as_tensor(array, device=self._device)
        if floating or (floating is None and tensor.is_floating_point()):
            tensor = tensor.to(self._dtype)
        return tensor

    def to_numpy(self, array: torch.Tensor) -> Any:
        return array.detach().cpu().numpy()

    def native_batches(self, data: Any, batch_size: int) -> Iterator[Any] | None:
        return native_batches(data, batch_size)
