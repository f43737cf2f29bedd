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

Every kernel calls the model as ``model(inputs)`` in inference mode, as
Keras' ``training=False`` does: a model left in ``train()`` mode (dropout,
batch norm) is switched to ``eval()`` for the call and the user's mode is
restored afterwards, so per-sample gradients average to the batch gradient.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch.func import functional_call, grad, hessian, jvp, vjp, vmap

from influence_core.plugin import (
    LastLayer,
    Layer,
    ModelKernels,
    NonFiniteGradientError,
    OutputSelector,
    ParameterLayout,
    UnsupportedByBackendError,
    check_output_selector,
    select_output,
    select_parameters,
    tree_map,
)

from .data import native_batch_count, native_batches
from .layers import conv2d_map, conv2d_patches, find_layers, layer_gaps, recorded_layers, statistics
from .namespace import namespace

F = TypeVar("F", bound=Callable[..., Any])


#: Raw torch errors a user's model can reach in a kernel, and the fix each names.
_SECOND_DERIVATIVE = "derivative for"
_VMAP_CONTROL_FLOW = "vmap: It looks like you're"
_NO_FORWARD_MODE = "Trying to use forward AD with"


def explained_errors(method: F) -> F:
    """Re-raise the raw errors of a model that a kernel cannot go through as errors that name the fix.

    * an operation without a second derivative (the default SDPA/flash attention
      on CPU) in an HVP: eager attention, or a factored solver;
    * data-dependent control flow under ``vmap`` (Hugging Face's attention-mask
      preparation calls ``mask.all()``) in per-sample gradients.
    """

    @functools.wraps(method)
    def run(self: TorchKernels, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except RuntimeError as error:
            text = str(error)
            second = _SECOND_DERIVATIVE in text and "not implemented" in text
            if second or _NO_FORWARD_MODE in text:
                raise UnsupportedByBackendError(
                    f"{method.__name__} needs second derivatives (or forward-mode ones), and an "
                    f"operation of this model has none in torch ({text.splitlines()[0]}). For a "
                    "Hugging Face model, "
                    'switch its attention to eager: model.set_attn_implementation("eager") (or '
                    'attn_implementation="eager" when loading); or use a solver that needs no '
                    "Hessian-vector products: EKFACIHVP or KFACIHVP (layer-wise), or TracIn / "
                    "GradientSimilarity."
                ) from error
            if _VMAP_CONTROL_FLOW in text:
                raise UnsupportedByBackendError(
                    f"{method.__name__} vectorises over samples with torch.func.vmap, and the "
                    "model branches in Python on its inputs' values (vmap: data-dependent control "
                    "flow, or .item()). A Hugging Face model does this while preparing its "
                    "attention mask: leave attention_mask out of the inputs when no sample is "
                    "padded, or use the layer-wise estimators (EKFACIHVP, KFACIHVP, TracIn from "
                    "layer statistics), which take one ordinary forward and backward pass per "
                    "batch and no vmap."
                ) from error
            raise

    return run  # type: ignore[return-value]


def in_inference_mode(method: F) -> F:
    """Run a kernel with the model in ``eval()`` mode, restoring the user's mode afterwards."""

    @functools.wraps(method)
    def wrapper(self: TorchKernels, *args: Any, **kwargs: Any) -> Any:
        with self.inference_mode():
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


#: Native layout → canonical (Keras) layout of the weights of these modules.
_WEIGHT_LAYOUTS: dict[type, tuple[int, ...]] = {
    torch.nn.Linear: (1, 0),  # (out, in) → (in, out)
    torch.nn.Conv1d: (2, 1, 0),  # (out, in, k) → (k, in, out)
    torch.nn.Conv2d: (2, 3, 1, 0),  # (out, in, kh, kw) → (kh, kw, in, out)
    torch.nn.Conv3d: (2, 3, 4, 1, 0),
}


class TorchKernels(ModelKernels):
    """Kernels for a ``torch.nn.Module`` and a per-sample loss ``loss_fn(outputs, targets)``."""

    backend_name = "torch"

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Any,
        parameters: str | Sequence[str] | None,
        *,
        call_kwargs: Mapping[str, Any] | None = None,
        output: OutputSelector = None,
    ):
        """``call_kwargs`` (an ``InfluenceModel(options=)`` entry): keywords for every model call.

        ``output`` (``InfluenceModel(output=)``): which of the model's outputs the
        loss reads (:func:`~influence_core.plugin.select_output`). Inputs that
        are a mapping whose keys ``forward`` takes by name (a Hugging Face
        batch: ``input_ids``, ``attention_mask``) are passed as keywords.
        """
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"the torch backend needs a torch.nn.Module, got {type(model).__name__}"
            )
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters (requires_grad=True)")
        self._all_names = tuple(n for n, _ in named)
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        chosen = select_parameters(self._all_names, parameters, ".", frozen=frozen)
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
        self._sizes = [p.numel() for p in self._params]
        self.module = model
        self.loss_fn = loss_fn
        self._call_kwargs = dict(call_kwargs or {})
        self._output = check_output_selector(output)
        self._keywords = _keyword_parameters(model)
        self._layout = ParameterLayout(
            self._names,
            tuple(tuple(p.shape) for p in self._params),
            self._dtype,
            canonical_permutations=self._canonical_permutations(),
        )
        self._per_sample_grads = vmap(grad(self._sample_loss), in_dims=(None, 0, 0))
        self._mean_grad_dict = grad(self._mean_loss)
        self._mean_grad_flat = grad(lambda flat, x, y: self._mean_loss(self._unflatten(flat), x, y))
        self._last: tuple[str, torch.nn.Linear] | None = None
        self._layers: tuple[Layer, ...] | None = None

    @contextmanager
    def inference_mode(self) -> Iterator[None]:
        """Every module in ``eval()`` mode inside the block; the user's modes restored after it."""
        if not self.module.training:
            yield
            return
        training = [m for m in self.module.modules() if m.training]
        for m in training:
            m.training = False
        try:
            yield
        finally:
            for m in training:
                m.training = True

    # -- description --------------------------------------------------------------
    @property
    def xp(self) -> Any:
        return namespace

    @property
    def layout(self) -> ParameterLayout:
        return self._layout

    # -- θ ------------------------------------------------------------------------
    def get_flat_parameters(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params])

    def set_flat_parameters(self, flat: torch.Tensor) -> None:
        with torch.no_grad():
            for p, chunk in zip(self._params, torch.split(flat, self._sizes), strict=True):
                p.copy_(chunk.view_as(p))

    def _unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        chunks = torch.split(flat, self._sizes)
        shapes = self._layout.shapes
        return {n: c.view(s) for n, c, s in zip(self._names, chunks, shapes, strict=True)}

    # -- the model call -----------------------------------------------------------
    def _arguments(self, inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` of one model call: a mapping of ``forward``'s own names as keywords."""
        if (
            isinstance(inputs, Mapping)
            and inputs
            and (self._keywords is True or set(inputs) <= self._keywords)
        ):
            return (), {**self._call_kwargs, **inputs}
        return (inputs,), self._call_kwargs

    def _forward(self, inputs: Any) -> torch.Tensor:
        """Φ(x): the model called on ``inputs``, and the output the loss reads."""
        args, kwargs = self._arguments(inputs)
        return select_output(self.module(*args, **kwargs), self._output)

    def _call(self, params: dict[str, torch.Tensor], inputs: Any) -> torch.Tensor:
        """:meth:`_forward` with θ = ``params`` (``functional_call``, for torch.func transforms)."""
        args, kwargs = self._arguments(inputs)
        return select_output(
            functional_call(self.module, params, args, kwargs, strict=False), self._output
        )

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
        return self.loss_fn(self._call(params, inputs), targets)

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
    @in_inference_mode
    def per_sample_loss(self, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.loss_fn(self._forward(inputs), targets)

    # The kernels run under no_grad: torch.func transforms ignore it, but it stops
    # ordinary autograd from recording (and keeping alive) a graph through the
    # model's *unselected* parameters, which still have requires_grad=True.
    @explained_errors
    @in_inference_mode
    @torch.no_grad()
    def mean_loss_grad(self, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        return self._concat(self._mean_grad_dict(self._detached(), inputs, targets))

    @explained_errors
    @in_inference_mode
    @torch.no_grad()
    def per_sample_grads(self, inputs: Any, targets: torch.Tensor) -> torch.Tensor:
        grads = self._per_sample_grads(self._detached(), inputs, targets)
        return self._concat(grads, leading=(next(iter(grads.values())).shape[0],))

    @explained_errors
    @in_inference_mode
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

    @explained_errors
    @in_inference_mode
    @torch.no_grad()
    def per_sample_loss_jvp(
        self, inputs: Any, targets: torch.Tensor, vectors: torch.Tensor
    ) -> torch.Tensor:
        # Forward mode through the per-sample losses, one jvp per column: (b, q), no (b, d).
        def losses_of(flat: torch.Tensor) -> torch.Tensor:
            return self._losses(self._unflatten(flat), inputs, targets)

        flat = self.get_flat_parameters()
        if vectors.shape[1] == 1:
            return jvp(losses_of, (flat,), (vectors[:, 0],))[1].unsqueeze(1)
        return vmap(lambda v: jvp(losses_of, (flat,), (v,))[1], in_dims=1, out_dims=1)(vectors)

    @explained_errors
    @in_inference_mode
    @torch.no_grad()
    def mean_loss_ggn_vp(
        self, inputs: Any, targets: torch.Tensor, vectors: torch.Tensor
    ) -> torch.Tensor:
        # Jᵀ (H_out J V) / b: a jvp of the outputs per column, then H_out (J v) as a jvp of
        # ∂ℓ/∂Φ (forward over reverse), then one vjp. The loss sums over samples, so its
        # Hessian in Φ is block-diagonal and one product gives every sample's H_i (J v)_i; no
        # (b, c, c) Hessian is formed (c = T × vocabulary for a language model).
        def outputs_of(flat: torch.Tensor) -> torch.Tensor:
            return self._call(self._unflatten(flat), inputs)

        flat = self.get_flat_parameters()
        outputs, vjp_fn = vjp(outputs_of, flat)
        b = outputs.shape[0]
        output_grad = grad(lambda o: self.loss_fn(o, targets).sum())
        detached = outputs.detach()

        def column(v: torch.Tensor) -> torch.Tensor:
            jv = jvp(outputs_of, (flat,), (v,))[1]
            return vjp_fn(jvp(output_grad, (detached,), (jv,))[1] / b)[0]

        return vmap(column, in_dims=1, out_dims=1)(vectors)

    # -- data ---------------------------------------------------------------------
    def as_native(self, array: Any, *, floating: bool | None = None) -> torch.Tensor:
        tensor = torch.as_tensor(array, device=self._device)
        if floating or (floating is None and tensor.is_floating_point()):
            tensor = tensor.to(self._dtype)
        return tensor

    def to_numpy(self, array: torch.Tensor) -> Any:
        array = array.detach().cpu()
        if array.dtype == torch.bfloat16:  # NumPy has no bfloat16: widen, losslessly
            array = array.float()
        return array.numpy()

    def native_batches(self, data: Any, batch_size: int) -> Iterator[Any] | None:
        return native_batches(data, batch_size)

    def native_batch_count(self, data: Any, batch_size: int) -> int | None:
        return native_batch_count(data, batch_size)

    def _canonical_permutations(self) -> tuple[tuple[int, ...] | None, ...]:
        owners = {}
        for module in self.module.modules():
            # isinstance, not type(): a subclass (MultiheadAttention's out_proj, a user's
            # Linear) stores its weight as its base class does.
            layouts = [v for k, v in _WEIGHT_LAYOUTS.items() if isinstance(module, k)]
            weight = getattr(module, "weight", None)
            if layouts and isinstance(weight, torch.nn.Parameter):
                owners[id(weight)] = layouts[0]
            packed = getattr(module, "in_proj_weight", None)  # MultiheadAttention's (3E, E)
            if isinstance(module, torch.nn.MultiheadAttention) and packed is not None:
                owners[id(packed)] = (1, 0)
        return tuple(owners.get(id(p)) for p in self._params)

    # -- checkpoints --------------------------------------------------------------
    def save_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    checkpoint_suffix = ".pt"

    def save_checkpoint(self, path: str) -> None:
        torch.save(self.module.state_dict(), path)

    def load_checkpoint(self, checkpoint: Any) -> None:
        """A state dict, or a path to one saved with ``torch.save`` (loaded ``weights_only``).

        A dict holding the state dict under ``"state_dict"`` or
        ``"model_state_dict"`` (a common training-loop layout) works too, and
        so does a state dict of NumPy arrays (``InfluenceModel.weights_as_numpy``).
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
        self.module.load_state_dict({k: _tensor(v) for k, v in checkpoint.items()})

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

    @in_inference_mode
    @torch.no_grad()
    def penultimate_features(self, inputs: Any) -> torch.Tensor:
        name, linear = self._last_linear()
        captured: dict[str, torch.Tensor] = {}

        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            captured["features"], captured["outputs"] = args[0], output

        handle = linear.register_forward_hook(hook)
        try:
            outputs = self._forward(inputs)
        finally:
            handle.remove()
        finite = torch.isfinite(outputs.reshape(outputs.shape[0], -1)).all(dim=1)
        if not bool(finite.all()):
            raise NonFiniteGradientError(
                "model outputs", torch.nonzero(~finite).reshape(-1).tolist(), outputs=True
            )
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

    @in_inference_mode
    @torch.no_grad()
    def outputs(self, inputs: Any) -> torch.Tensor:
        return self._forward(inputs)

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

    # -- layer-wise statistics ----------------------------------------------------
    def layers(self) -> tuple[Layer, ...]:
        if self._layers is None:
            self._layers = find_layers(self.module, self._names)
        return self._layers

    def matmul_into(self, x1: torch.Tensor, x2: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x1, x2, out=out)

    def segment_sum(self, values: torch.Tensor, segments: Any, count: int) -> torch.Tensor:
        segments = torch.as_tensor(segments, device=values.device)
        out = torch.zeros((count, values.shape[1]), dtype=values.dtype, device=values.device)
        return out.index_add_(0, segments, values)

    def host_threads(self) -> int:
        return torch.get_num_threads()

    def layer_gaps(self) -> dict[str, str]:
        return layer_gaps(self.module, self._names)

    def layer_statistics(
        self, inputs: Any, targets: torch.Tensor, measurement: Any = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return self._layer_statistics(inputs, targets, measurement, defer=False)

    def layer_statistics_deferred(
        self, inputs: Any, targets: torch.Tensor, measurement: Any = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return self._layer_statistics(inputs, targets, measurement, defer=True)

    def conv2d_patches(self, layer: Layer, x: torch.Tensor) -> torch.Tensor:
        module = self._conv(layer)
        with torch.no_grad():
            return conv2d_patches(module, x)

    def conv2d_map(self, layer: Layer, x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return conv2d_map(self._conv(layer), x, kernels)

    def _conv(self, layer: Layer) -> torch.nn.Conv2d:
        module = dict(self.module.named_modules()).get(layer.name)
        if layer.kind != "conv2d" or not isinstance(module, torch.nn.Conv2d):
            raise ValueError(f"layer {layer.name!r} is a {layer.kind} layer, not a conv2d one")
        return module

    @in_inference_mode
    def _layer_statistics(
        self, inputs: Any, targets: torch.Tensor, measurement: Any, *, defer: bool
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        function = self.loss_fn if measurement is None else measurement
        hooked = [layer for layer in self.layers() if layer.kind != "parameter"]
        generic = [layer.kernel for layer in self.layers() if layer.kind == "parameter"]
        out = {}
        if hooked:
            batch = int(targets.shape[0])
            with recorded_layers(self.module, hooked, batch) as records, torch.enable_grad():
                losses = function(self._forward(inputs), targets)
                out = statistics(self.module, hooked, records, losses, defer=defer)
        if generic:
            out.update(self._parameter_statistics(generic, inputs, targets, function))
        return out

    @explained_errors
    @torch.no_grad()
    def _parameter_statistics(
        self, names: list[str], inputs: Any, targets: torch.Tensor, function: Any
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``"parameter"`` layers: (ones, g) with g the per-sample gradient (b, 1, p), canonical.

        ``vmap(grad)`` restricted to these parameters; the others enter as the
        module holds them (``functional_call`` with ``strict=False``).
        """

        def sample_value(params: dict[str, torch.Tensor], x: Any, y: torch.Tensor) -> Any:
            batched = tree_map(lambda t: t.unsqueeze(0), x)
            return function(self._call(params, batched), y.unsqueeze(0)).sum()

        own = self._detached()
        grads = vmap(grad(sample_value), in_dims=(None, 0, 0))(
            {name: own[name] for name in names}, inputs, targets
        )
        index = {name: i for i, name in enumerate(self._names)}
        out = {}
        for name in names:
            g = grads[name]
            perm = self._layout.canonical_permutations[index[name]]
            if perm is not None:
                g = g.permute(0, *(1 + axis for axis in perm))
            g = g.reshape(g.shape[0], 1, -1)
            out[name] = (torch.ones((), dtype=g.dtype, device=g.device).expand_as(g), g)
        return out

    @explained_errors
    @in_inference_mode
    @torch.no_grad()
    def per_sample_measurement_grads(
        self, inputs: Any, targets: torch.Tensor, measurement: Any
    ) -> torch.Tensor:
        def sample_measurement(
            params: dict[str, torch.Tensor], x: Any, y: torch.Tensor
        ) -> torch.Tensor:
            batched = tree_map(lambda t: t.unsqueeze(0), x)
            return measurement(self._call(params, batched), y.unsqueeze(0)).sum()

        grads = vmap(grad(sample_measurement), in_dims=(None, 0, 0))(
            self._detached(), inputs, targets
        )
        return self._concat(grads, leading=(next(iter(grads.values())).shape[0],))


def _keyword_parameters(model: torch.nn.Module) -> set[str] | bool:
    """The names ``model.forward`` takes as keywords (``True``: any, it has ``**kwargs``)."""
    import inspect

    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return set()
    parameters = list(signature.parameters.values())
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if len(named) < 2:  # forward(self, batch): a mapping is its one argument, as it is
        return set()
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return True
    return {p.name for p in named}


def _tensor(value: Any) -> Any:
    """A checkpoint entry as a tensor: NumPy arrays (read-only ones copied) converted, others as they are."""
    if type(value).__module__ != "numpy":
        return value
    return torch.from_numpy(value if value.flags.writeable else value.copy())
