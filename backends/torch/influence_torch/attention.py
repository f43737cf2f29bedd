"""``nn.MultiheadAttention`` as two dense layers: its packed input projection and its output projection.

``nn.MultiheadAttention`` applies its weights inside
``F.multi_head_attention_forward``: the packed ``in_proj_weight`` (3E, E)
and ``out_proj`` (whose own forward, and so its hooks, never run). For the
layer statistics, the module's forward is replaced for one pass by the same
computation with the two projections taken out and recorded:

* ``<name>.in_proj``, dense E → 3E. Self-attention (query, key and value the
  same tensor, as in ``nn.TransformerEncoderLayer``) projects each position
  once: a = x, g = ∂ℓ/∂[q k v]. Otherwise (cross-attention) the positions of
  query, key and value are stacked, each projected by the whole weight, and
  only its own third is used downstream, so g is zero outside it and
  Σ_t a_tᵀ g_t is still the weight's gradient.
* ``<name>.out_proj``, dense E → E on the attended values.

Between them ``F.multi_head_attention_forward`` runs with identity
projections (exact: products with 1 and sums with 0), so masks, causal
attention and the returned weights are torch's own. A module with
``bias_k``/``bias_v``, ``add_zero_attn`` or separate key/value widths keeps
the ``"parameter"`` block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from influence_core.plugin import Layer

__all__ = ["attention_layers", "recorded_attention", "supported"]

F = torch.nn.functional


def supported(module: torch.nn.Module) -> bool:
    """A MultiheadAttention whose projections are two dense layers (see the module docstring)."""
    return (
        isinstance(module, torch.nn.MultiheadAttention)
        and module._qkv_same_embed_dim
        and module.in_proj_weight is not None
        and module.bias_k is None
        and not module.add_zero_attn
    )


def attention_layers(
    name: str, module: torch.nn.MultiheadAttention, chosen: set[str]
) -> list[Layer]:
    """The selected projections of ``module`` (named ``name``) as dense layers."""
    prefix = f"{name}." if name else ""
    width = module.embed_dim
    found = []
    if f"{prefix}in_proj_weight" in chosen:
        bias = f"{prefix}in_proj_bias" if f"{prefix}in_proj_bias" in chosen else None
        found.append(
            Layer(f"{prefix}in_proj", "dense", f"{prefix}in_proj_weight", bias, width, 3 * width)
        )
    if f"{prefix}out_proj.weight" in chosen:
        bias = f"{prefix}out_proj.bias" if f"{prefix}out_proj.bias" in chosen else None
        found.append(
            Layer(f"{prefix}out_proj", "dense", f"{prefix}out_proj.weight", bias, width, width)
        )
    return found


@contextmanager
def recorded_attention(
    modules: dict[str, torch.nn.MultiheadAttention],
    records: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> Iterator[None]:
    """Inside the block, each of ``modules`` (by name) records its two projections into ``records``."""
    try:
        for name, module in modules.items():
            module.forward = _recording_forward(name, module, records)  # type: ignore[method-assign]
        yield
    finally:
        for module in modules.values():
            module.__dict__.pop("forward", None)


def _recording_forward(
    name: str,
    module: torch.nn.MultiheadAttention,
    records: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> Any:
    prefix = f"{name}." if name else ""

    def forward(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if query.dim() != 3:
            raise ValueError(
                f"attention {name or 'the model'!r} is called on unbatched inputs of shape "
                f"{tuple(query.shape)}: per-sample statistics need a batch axis"
            )
        width = module.embed_dim
        batch_first = [t if module.batch_first else t.transpose(0, 1) for t in (query, key, value)]
        if query is key and key is value:  # self-attention: each position projected once
            x = batch_first[0]
            z = F.linear(x, module.in_proj_weight, module.in_proj_bias)  # (b, T, 3E)
            q, k, v = z.chunk(3, dim=-1)
        else:  # positions stacked; each uses its own third of the projection
            lengths = [int(t.shape[1]) for t in batch_first]
            x = torch.cat(batch_first, dim=1)
            z = F.linear(x, module.in_proj_weight, module.in_proj_bias)
            q, k, v = (
                part[:, :, i * width : (i + 1) * width]
                for i, part in enumerate(torch.split(z, lengths, dim=1))
            )
        records[f"{prefix}in_proj"] = (x, z)
        eye = torch.eye(width, dtype=z.dtype, device=z.device)
        attended, weights = F.multi_head_attention_forward(
            q.transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            width,
            module.num_heads,
            torch.cat([eye, eye, eye]),
            None,
            None,
            None,
            False,
            module.dropout,
            eye,
            None,
            training=module.training,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        attended = attended.transpose(0, 1)  # (b, T, E)
        out = F.linear(attended, module.out_proj.weight, module.out_proj.bias)
        records[f"{prefix}out_proj"] = (attended, out)
        return (out if module.batch_first else out.transpose(0, 1)), weights

    return forward
