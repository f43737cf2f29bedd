"""Embedding and normalisation layers as K-FAC/EK-FAC blocks, checked against their definitions.

* The statistics of every new kind rebuild the per-sample gradients (torch
  ``nn.Embedding`` with a padding index and a positional table looked up with
  ids of shape (1, T), ``LayerNorm``, ``RMSNorm``, ``GroupNorm``,
  ``BatchNorm2d`` in inference mode).
* An embedding's block is dense K-FAC on one-hot inputs: the same model with
  the table as a bias-free ``nn.Linear`` on one-hot vectors gets the same
  curvature, K-FAC and EK-FAC.
* An elementwise block is the exact diagonal of the Fisher.
* Every scoring path (training side, self-influence, TracIn and Kronecker
  projections from statistics) equals the same quantity from flat gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influence_core import (
    EKFACIHVP,
    KFACIHVP,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
    KroneckerProjection,
    TracIn,
)
from influence_core.layerwise import coverage, covering_layers, per_sample_grads_from_layers
from influence_core.measurements import LOSS
from influence_core.plugin import ModelKernels
from influence_torch.reference_models import layer_kind_case

VOCAB, WIDTH, T = 7, 4, 5


class TokenModel(torch.nn.Module):
    """Token and positional tables, LayerNorm, RMSNorm and a dense head: every kind but conv."""

    def __init__(self, one_hot: bool = False) -> None:
        super().__init__()
        self.one_hot = one_hot
        if one_hot:
            self.tokens = torch.nn.Linear(VOCAB, WIDTH, bias=False)
        else:
            self.tokens = torch.nn.Embedding(VOCAB, WIDTH)
        self.positions = torch.nn.Embedding(T, WIDTH)
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.rms = torch.nn.RMSNorm(WIDTH)
        self.head = torch.nn.Linear(WIDTH, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.one_hot:
            tokens = self.tokens(torch.nn.functional.one_hot(ids, VOCAB).double())
        else:
            tokens = self.tokens(ids)
        h = tokens + self.positions(torch.arange(ids.shape[1])[None])  # (1, T): broadcast
        return self.head(self.rms(torch.tanh(self.norm(h))).mean(dim=1))


def token_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Ids where every used token has a distinct count (so A's eigenbasis is unique)."""
    rng = np.random.default_rng(0)
    counts = [1, 2, 3, 4, 5, 6, 9]  # 30 positions, tokens 0..6
    ids = np.repeat(np.arange(VOCAB), counts)
    rng.shuffle(ids)
    ids = ids.reshape(6, T)
    ids[1] = 3  # a sample that repeats one token at every position
    y = rng.integers(0, 3, size=6)
    return torch.as_tensor(ids), torch.as_tensor(y)


def cross_entropy() -> torch.nn.Module:
    return torch.nn.CrossEntropyLoss(reduction="none")


def token_model(one_hot: bool = False, seed: int = 0) -> InfluenceModel:
    torch.manual_seed(seed)
    net = TokenModel(one_hot).double()
    with torch.no_grad():
        net.norm.weight.uniform_(0.5, 1.5)
        net.norm.bias.uniform_(-0.5, 0.5)
        net.rms.weight.uniform_(0.5, 1.5)
    return InfluenceModel(net, cross_entropy())


def norm_convnet() -> tuple[InfluenceModel, tuple[torch.Tensor, torch.Tensor]]:
    """The torch backend's conformance case: Conv2d, BatchNorm2d (inference), GroupNorm, Linear."""
    net, loss, data = layer_kind_case("elementwise")
    return InfluenceModel(net, loss), data


def theta_indices(model: InfluenceModel, name: str) -> np.ndarray:
    """Where parameter ``name`` sits in θ (the layout's names, in order)."""
    start = 0
    for other, size in zip(model.layout.names, model.layout.sizes, strict=True):
        if other == name:
            return np.arange(start, start + size)
        start += size
    raise KeyError(name)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_statistics_of_every_new_kind_rebuild_the_per_sample_gradients() -> None:
    model = token_model()
    ids, y = token_data()
    ids[0, :2] = 0
    with torch.no_grad():
        model.kernels.module.tokens.padding_idx = 0  # torch gives row 0 no gradient
    kinds = {name: c.kind for name, c in coverage(model).items()}
    assert kinds == {
        "tokens.weight": "embedding",
        "positions.weight": "embedding",
        "norm.weight": "elementwise",
        "norm.bias": "elementwise",
        "rms.weight": "elementwise",
        "head.weight": "dense",
        "head.bias": "dense",
    }
    flat = model.per_sample_grads((ids, y))
    assert relative(per_sample_grads_from_layers(model, (ids, y)), flat) < 1e-13
    conv, data = norm_convnet()
    assert {c.kind for c in coverage(conv).values()} == {"conv2d", "elementwise", "dense"}
    flat = conv.per_sample_grads(data)
    assert relative(per_sample_grads_from_layers(conv, data), flat) < 1e-13


@pytest.mark.parametrize("solver", [KFACIHVP, EKFACIHVP])
def test_an_embedding_block_is_dense_kfac_on_one_hot_inputs(solver) -> None:
    data = token_data()
    embedded, dense = token_model(False), token_model(True)
    state = dict(embedded.kernels.module.state_dict())
    state["tokens.weight"] = state["tokens.weight"].T  # the table is the dense kernel (in, out)
    dense.kernels.module.load_state_dict(state)
    assert torch.allclose(embedded.kernels.outputs(data[0]), dense.kernels.outputs(data[0]))
    assert coverage(dense)["tokens.weight"].kind == "dense"
    eye = torch.eye(embedded.num_parameters, dtype=torch.float64)
    curvature = {}
    for name, model in (("embedding", embedded), ("one-hot dense", dense)):
        fitted = solver(damping=1e-3, fisher="empirical").fit(model, data)
        applied = model.to_canonical(fitted.damped_hvp(eye))  # θ orders differ: compare
        curvature[name] = model.to_canonical(applied.T)  # in the canonical one
    assert relative(curvature["embedding"], curvature["one-hot dense"]) < 1e-10


@pytest.mark.parametrize("solver", [KFACIHVP, EKFACIHVP])
def test_an_elementwise_block_is_the_exact_diagonal_of_the_fisher(solver) -> None:
    for model, data in ((token_model(), token_data()), norm_convnet()):
        grads = model.per_sample_grads(data)
        fisher = grads.T @ grads / len(grads)
        damping = 1e-3
        fitted = solver(damping=damping, fisher="empirical").fit(model, data)
        blocks = fitted.damped_hvp(torch.eye(model.num_parameters, dtype=torch.float64))
        blocks = blocks - damping * torch.eye(model.num_parameters, dtype=torch.float64)
        names = [n for n, c in coverage(model).items() if c.kind == "elementwise"]
        index = np.concatenate([theta_indices(model, n) for n in names])
        got = blocks[np.ix_(index, index)]
        expected = torch.diag(torch.diag(fisher[np.ix_(index, index)]))
        assert relative(got, expected) < 1e-12
        assert set(fitted.coverage_) == set(model.layout.names)
        assert fitted.coverage_[names[0]].block.startswith("diagonal")


@pytest.mark.parametrize("build", ["tokens", "convnet"])
def test_every_scoring_path_from_statistics_equals_flat_gradients(build: str) -> None:
    model, train = (token_model(), token_data()) if build == "tokens" else norm_convnet()
    test = tuple(part[:3] for part in train)
    fitted = FirstOrderInfluenceCalculator(model, EKFACIHVP(damping=1e-2, fisher="empirical"))
    fitted = fitted.fit(train)
    g_train, g_test = model.per_sample_grads(train), model.per_sample_grads(test)
    solved = fitted.ihvp.solve(g_test.T)  # (d, n_test)
    expected = solved.T @ g_train.T  # the sign: checked by magnitude below
    got = fitted.influence(test)
    assert relative(got, expected) < 1e-10  # a positive score is a proponent: gᵀ H⁻¹ g
    batch = model._single_batch(test)  # the test side solved layer by layer, as from (b, d)
    by_layer = fitted.ihvp.solved_test_side(model, batch, LOSS)
    assert relative(by_layer, fitted.ihvp.test_side(g_test)) < 1e-12
    self_expected = torch.einsum("id,di->i", g_train, fitted.ihvp.solve(g_train.T))
    assert relative(fitted.self_influence(), self_expected) < 1e-10
    # One pass: dense and conv layers scored in their eigenbases (joint_test_side).
    both = fitted.influence_and_self_influence(test)
    assert relative(both[0], expected) < 1e-10
    assert relative(both[1], self_expected) < 1e-10
    state = model.kernels.save_state()
    layerwise = TracIn(model, [state], 0.1, layerwise=True).fit(train).influence(test)
    flat = TracIn(model, [state], 0.1, layerwise=False).fit(train).influence(test)
    assert relative(layerwise, flat) < 1e-12
    projector = KroneckerProjection(128, 128)  # every side kept: exact features
    features = projector.features(model, model._single_batch(train), LOSS)
    assert relative(features @ features.T, g_train @ g_train.T) < 1e-12


def test_a_vocabulary_scored_in_chunks_of_gathered_rows_equals_flat_gradients(
    monkeypatch,
) -> None:
    """The vocabulary's pairwise scores gather the solved rows of its tokens in chunks
    (of 8 MiB on real models); here 3 (sample, token) pairs a chunk, so a chunk's edge
    falls inside a sample."""
    from influence_core.ihvp import kfac

    model, train = token_model(), token_data()
    test = tuple(part[:3] for part in train)
    fitted = FirstOrderInfluenceCalculator(model, EKFACIHVP(damping=1e-2)).fit(train)
    solved = fitted.ihvp.solve(model.per_sample_grads(test).T)
    expected = solved.T @ model.per_sample_grads(train).T
    monkeypatch.setattr(kfac, "_GATHER_ENTRIES", WIDTH * 3 * 3)  # width × n_test × 3 pairs
    assert relative(fitted.influence(test), expected) < 1e-10


def test_the_layer_wise_test_side_never_forms_the_batch_gradients(monkeypatch) -> None:
    model, train = token_model(), token_data()
    fitted = FirstOrderInfluenceCalculator(model, EKFACIHVP(damping=1e-2)).fit(train)
    test = tuple(part[:3] for part in train)
    expected = fitted.influence(test)

    def refused(*args, **kwargs):
        raise AssertionError("the (b, d) test gradients were formed")

    monkeypatch.setattr(type(fitted.ihvp), "test_gradients", refused)
    monkeypatch.setattr(type(fitted.ihvp), "test_side", refused)
    assert relative(fitted.influence(test), expected) == 0.0


def test_a_table_called_without_a_batch_axis_is_named() -> None:
    class NoBatchAxis(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.positions = torch.nn.Embedding(T, WIDTH)
            self.head = torch.nn.Linear(WIDTH, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x + self.positions(torch.arange(T))).mean(dim=1)

    model = InfluenceModel(NoBatchAxis().double(), cross_entropy())
    data = (torch.randn(3, T, WIDTH, dtype=torch.float64), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match=r"layer 'positions' .* no batch axis .*positions\[None\]"):
        EKFACIHVP().fit(model, data)


def test_a_tied_table_is_named_not_split() -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens = torch.nn.Embedding(VOCAB, WIDTH)
            self.out = torch.nn.Linear(WIDTH, VOCAB, bias=False)
            self.out.weight = self.tokens.weight  # a language model's tied tables

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.out(self.tokens(ids).mean(dim=1))

    model = InfluenceModel(Tied().double(), cross_entropy())
    with pytest.raises(ValueError, match=r"tokens.weight: a weight tied between tokens and out"):
        covering_layers(model)


def test_segment_sum_of_the_protocol_and_of_torch_agree_with_numpy() -> None:
    rng = np.random.default_rng(3)
    values = rng.standard_normal((50, 3))
    segments = rng.integers(0, 9, size=50)
    expected = np.zeros((11, 3))
    np.add.at(expected, segments, values)
    kernels = token_model().kernels
    for method in (kernels.segment_sum, lambda *a: ModelKernels.segment_sum(kernels, *a)):
        got = method(torch.as_tensor(values), torch.as_tensor(segments), 11)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-14, atol=1e-14)


def test_the_block_checks_catch_wrong_block_formulas(monkeypatch) -> None:
    """Mutants of the core's block math, each caught by the reference test above.

    * an embedding's EK-FAC correction that squares each position's row
      instead of the sum of a sample's rows of one token (sample 1 repeats one);
    * an elementwise block missing the normalised input (Σ g instead of Σ x̂ ⊙ g).
    """
    from influence_core import layerwise
    from influence_core.ihvp import kfac

    def per_position_rows(model, indices, g):
        b, t = int(g.shape[0]), int(g.shape[1])
        samples = torch.arange(b).repeat_interleave(t)
        return samples, indices.reshape(-1), g.reshape(b * t, -1)

    with monkeypatch.context() as patch:
        patch.setattr(kfac, "embedding_rows", per_position_rows)
        with pytest.raises(AssertionError):
            test_an_embedding_block_is_dense_kfac_on_one_hot_inputs(EKFACIHVP)
    test_an_embedding_block_is_dense_kfac_on_one_hot_inputs(EKFACIHVP)

    original = layerwise.layer_gradient_matrices

    def without_inputs(xp, blocks, stats):
        stats = {
            k: (xp.ones_like(a) if a.dtype.is_floating_point else a, g)
            for k, (a, g) in stats.items()
        }
        return original(xp, blocks, stats)

    with monkeypatch.context() as patch:
        patch.setattr(kfac, "layer_gradient_matrices", without_inputs)
        with pytest.raises(AssertionError):
            test_an_elementwise_block_is_the_exact_diagonal_of_the_fisher(KFACIHVP)
