"""The JAX backend of influence_core: ``jit(vmap(grad))`` kernels for flax.nnx and pure models.

Two model forms are accepted:

* a ``flax.nnx.Module`` (its ``nnx.Param`` variables are the parameters);
* :class:`Functional`, a pure model: ``Functional(apply_fn, params)`` with
  ``apply_fn(params, inputs) -> outputs`` and ``params`` any pytree of arrays
  (the usual JAX/optax style). It is frozen: other weights (``parameters_set_to``,
  checkpoints, TracIn) are held as values by the kernels, never written back.

The backend is functional for both forms: the core never writes into the
model. Backend options (``InfluenceModel(options=...)``): ``call_kwargs``,
keywords for every model call (``{"deterministic": True}``).

The loss is ``loss_fn(outputs, targets) -> (b,)`` (optax's argument order, as
PyTorch's), one value per sample. float64 needs ``jax.config.update(
"jax_enable_x64", True)`` before any array is made; without it a float64
request raises an error saying so.
"""

from .model import Functional

__all__ = ["Functional"]
