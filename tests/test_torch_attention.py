"""torch's nn.MultiheadAttention as two dense layers (influence_torch/attention.py).

Self-attention (nn.TransformerEncoderLayer, a padding mask) and
cross-attention, batch-first or not: the recorded projections rebuild the
per-sample gradients, EK-FAC scores from them equal the flat form, the
module's outputs are unchanged while it records, and its forward is restored
after. A module with bias_k keeps the diagonal "parameter" block.
"""

from __future__ import annotations

import pytest
import torch

from influence_core import EKFACIHVP, FirstOrderInfluenceCalculator, InfluenceModel
from influence_core.layerwise import coverage, per_sample_grads_from_layers


class Attending(torch.nn.Module):
    def __init__(self, batch_first: bool, bias_k: bool = False) -> None:
        super().__init__()
        self.encoder = torch.nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        self.cross = torch.nn.MultiheadAttention(4, 2, batch_first=batch_first, add_bias_kv=bias_k)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x, src_key_padding_mask=x[..., 0] > 1.0)
        memory = torch.tanh(h[:, :3])
        if self.cross.batch_first:
            attended = self.cross(h, memory, memory)[0]
        else:
            seq = [t.transpose(0, 1) for t in (h, memory)]
            attended = self.cross(seq[0], seq[1], seq[1], need_weights=False)[0].transpose(0, 1)
        return self.head(attended.mean(dim=1))


def case(batch_first: bool, bias_k: bool = False) -> tuple[InfluenceModel, tuple]:
    torch.manual_seed(0)
    net = Attending(batch_first, bias_k).double().eval()
    data = (torch.randn(8, 5, 4, dtype=torch.float64), torch.randint(0, 3, (8,)))
    return InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none")), data


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_projections_are_dense_layers_that_rebuild_the_gradients(batch_first) -> None:
    model, data = case(batch_first)
    kinds = {name: c.kind for name, c in coverage(model).items()}
    for owner in ("encoder.self_attn", "cross"):
        assert kinds[f"{owner}.in_proj_weight"] == kinds[f"{owner}.out_proj.weight"] == "dense"
    assert set(kinds.values()) == {"dense", "elementwise"}
    flat = model.per_sample_grads(data)
    assert relative(per_sample_grads_from_layers(model, data), flat) < 1e-13
    net = model.kernels.module
    assert "forward" not in net.cross.__dict__ and "forward" not in net.encoder.self_attn.__dict__
    calculator = FirstOrderInfluenceCalculator(model, EKFACIHVP(damping=1e-2, fisher="empirical"))
    calculator = calculator.fit(data)
    test = (data[0][:3], data[1][:3])
    expected = calculator.ihvp.solve(model.per_sample_grads(test).T).T @ flat.T
    assert relative(calculator.influence(test), expected) < 1e-10


def test_recording_leaves_the_outputs_as_they_are() -> None:
    model, (x, _) = case(True)
    net = model.kernels.module
    from influence_torch.layers import recorded_layers

    with torch.no_grad():
        plain = net(x)
    with recorded_layers(net, model.kernels.layers(), len(x)) as records, torch.no_grad():
        recorded = net(x)
    assert {"cross.in_proj", "cross.out_proj", "encoder.self_attn.in_proj"} <= set(records)
    assert relative(recorded, plain) < 1e-14


def test_attention_with_bias_k_keeps_the_parameter_block() -> None:
    model, data = case(True, bias_k=True)
    kinds = {name: c.kind for name, c in coverage(model).items()}
    assert kinds["cross.in_proj_weight"] == kinds["cross.bias_k"] == "parameter"
    assert kinds["encoder.self_attn.in_proj_weight"] == "dense"
    flat = model.per_sample_grads(data)
    assert relative(per_sample_grads_from_layers(model, data), flat) < 1e-13
