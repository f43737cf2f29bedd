"""PyTorch kernels of the autodiff protocol, built on ``torch.func``.

* gradients: ``vmap(grad(ℓ))`` over the batch with respect to the dict of
  selected parameters (``functional_call``), concatenated to ``(b, d)``: faster
  than differentiating with respect to views of one flat θ (``docs/benchmarks.md``,
  "What the numbers led to");
* HVPs: double backward, ``vjp`` of ``grad`` (one linearisation per batch),
  ``vmap``-ed over the ``k`` columns of the block;
* checkpoints (TracIn): state dicts or files written by ``torch.save``, loaded
  with ``weights_only=True``;
* the last linear layer (representer points): the last ``nn.Linear`` among the
  modules, its input captured by a forward hook.

The model is called as ``model(inputs)`` in whatever mode the user left it:
call ``model.eval()`` first if it has dropout or batch norm.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.func import functional_call, grad, hessian, vjp, vmap

from influence_core.plugin import LastLayer, ModelKernels, select_parameters, tree_map

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
        self._last: tuple[str, torch.nn.Linear] | None = None

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

    # -- checkpoints --------------------------------------------------------------
    def save_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    checkpoint_suffix = ".pt"

    def save_checkpoint(self, path: str) -> None:
        torch.save(self.module.state_dict(), path)

    def load_checkpoint(self, checkpoint: Any) -> None:
        """A state dict, or a path to one saved with ``torch.save`` (loaded ``weights_only``).

        A dict holding the state dict under ``"state_dict"`` or
        ``"model_state_dict"`` (a common training-loop layout) works too.
        """
        if isinstance(checkpoint, str | os.PathLike):
            checkpoint = torch.load(checkpoint, map_location=self._device, weights_only=True)
        if not isinstance(checkpoint, dict):
            raise TypeError(
                "a torch checkpoint is a state dict or a path to one saved with torch.save, "
                f"got {type(checkpoint).__name__}"
            )
        for key in ("state_dict", "model_state_dict"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
        self.module.load_state_dict(checkpoint)

    # -- the last linear layer ----------------------------------------------------
    def _last_linear(self) -> tuple[str, torch.nn.Linear]:
        if self._last is None:
            linears = [
                (n, m) for n, m in self.module.named_modules() if isinstance(m, torch.nn.Linear)
            ]
            if not linears:
                raise ValueError(
                    "representer points need a model ending in a torch.nn.Linear layer; "
                    f"{type(self.module).__name__} has none"
                )
            self._last = linears[-1]
        return self._last

    def last_layer(self) -> LastLayer:
        name, linear = self._last_linear()
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return LastLayer(name or "", linear.weight.detach().T.clone(), bias)

    @torch.no_grad()
    def penultimate_features(self, inputs: Any) -> torch.Tensor:
        name, linear = self._last_linear()
        captured: dict[str, torch.Tensor] = {}

        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            captured["features"], captured["outputs"] = args[0], output

        handle = linear.register_forward_hook(hook)
        try:
            outputs = self.module(inputs)
        finally:
            handle.remove()
        if (
            "features" not in captured
            or captured["outputs"].shape != outputs.shape
            or not (torch.equal(captured["outputs"], outputs))
        ):
            raise ValueError(
                f"the model's outputs are not those of its last linear layer '{name}': "
                "representer points need Φ(x) = f(x) W + b as the model's output (no activation "
                "after it; put softmax/sigmoid in the loss)"
            )
        features = captured["features"]
        if features.ndim != 2:
            raise ValueError(
                f"the last linear layer '{name}' sees inputs of shape {tuple(features.shape)}; "
                "representer points need one feature vector per sample, shape (b, p)"
            )
        return features

    @torch.no_grad()
    def outputs(self, inputs: Any) -> torch.Tensor:
        return self.module(inputs)

    def output_loss_grads(
        self, outputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Per-sample losses are separable, so one gradient of their sum gives every row.
        losses: dict[str, torch.Tensor] = {}

        def total(o: torch.Tensor) -> torch.Tensor:
            losses["value"] = self.loss_fn(o, targets)
            return losses["value"].sum()

        grads = grad(total)(outputs.detach())
        return losses["value"].detach(), grads

    @torch.no_grad()
    def output_loss_hessians(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        def sample_loss(o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.loss_fn(o.unsqueeze(0), y.unsqueeze(0)).sum()

        return vmap(hessian(sample_loss))(outputs.detach(), targets)

    @torch.no_grad()
    def per_sample_measurement_grads(
        self, inputs: Any, targets: torch.Tensor, measurement: Any
    ) -> torch.Tensor:
        def sample_measurement(
            params: dict[str, torch.Tensor], x: Any, y: torch.Tensor
        ) -> torch.Tensor:
            batched = tree_map(lambda t: t.unsqueeze(0), x)
            outputs = functional_call(self.module, params, (batched,), strict=False)
            return measurement(outputs, y.unsqueeze(0)).sum()

        grads = vmap(grad(sample_measurement), in_dims=(None, 0, 0))(
            self._detached(), inputs, targets
        )
        return self._concat(grads, leading=(next(iter(grads.values())).shape[0],))
