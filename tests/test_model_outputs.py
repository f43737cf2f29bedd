"""Models as users have them (issue 25, item 3): several outputs, dict batches, Hugging Face models.

A Hugging Face model returns a ``ModelOutput`` and takes a dict of
``input_ids`` / ``attention_mask``; a two-head model returns a tuple; a Keras
functional model a list. The loss reads one output (``InfluenceModel(output=)``,
``logits`` by convention), dict batches carry their targets under ``labels``,
and the raw torch errors such models reach name their fix.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch

from influence_core import (
    EKFACIHVP,
    TRAK,
    ConjugateGradientIHVP,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
    TracIn,
)
from influence_core.errors import ModelOutputError
from influence_core.plugin import UnsupportedByBackendError, select_output

rng = np.random.default_rng(0)
CE = torch.nn.CrossEntropyLoss(reduction="none")


# -- select_output, the one rule every backend applies ----------------------------------------
def test_select_output_reads_arrays_logits_keys_positions_and_callables() -> None:
    a, b = np.zeros((2, 3)), np.ones((2, 4))
    assert select_output(a) is a
    assert select_output({"loss": 1.0, "logits": b}) is b
    assert select_output((a, b), 1) is b
    assert select_output({"x": a, "y": b}, "y") is b
    assert select_output({"x": a, "y": b}, 0) is a
    assert select_output((a, b), lambda outputs: outputs[0]) is a
    with pytest.raises(
        ModelOutputError, match=r"a tuple of 2 \(0: \(2, 3\), 1: \(2, 4\)\).*output=0"
    ):
        select_output((a, b))
    with pytest.raises(ModelOutputError, match=r"keys \['x', 'y'\]"):
        select_output({"x": a, "y": b})
    with pytest.raises(ModelOutputError, match="output=2"):
        select_output((a, b), 2)
    with pytest.raises(ModelOutputError, match="must pick one array"):
        select_output({"x": (a, b)}, "x")
    with pytest.raises(TypeError, match="output= takes"):
        InfluenceModel(torch.nn.Linear(2, 2), CE, output=1.5)


# -- a two-head torch model --------------------------------------------------------------------
class TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh())
        self.head = torch.nn.Linear(8, 3)
        self.aux = torch.nn.Linear(8, 2)

    def forward(self, x):
        h = self.body(x)
        return self.head(h), self.aux(h)


def test_a_tuple_output_is_refused_by_name_then_every_estimator_reads_the_chosen_head() -> None:
    net = TwoHeads().double()
    X, y = rng.normal(size=(30, 4)), rng.integers(0, 3, 30)
    with pytest.raises(ModelOutputError, match="output=0"):
        InfluenceModel(net, CE).per_sample_loss((X, y))
    heads = InfluenceModel(net, CE, output=0, parameters=["body", "head"])
    single = torch.nn.Sequential(net.body, net.head)  # the same weights, one output
    alone = InfluenceModel(single, CE)
    np.testing.assert_allclose(heads.per_sample_loss((X, y)), alone.per_sample_loss((X, y)))
    for fisher in ("empirical", "true"):
        got = FirstOrderInfluenceCalculator(heads, EKFACIHVP(damping=0.1, fisher=fisher))
        want = FirstOrderInfluenceCalculator(alone, EKFACIHVP(damping=0.1, fisher=fisher))
        got, want = got.fit((X, y)).self_influence(), want.fit((X, y)).self_influence()
        np.testing.assert_allclose(got, want, rtol=1e-10)  # was: 'tuple' has no attribute 'detach'
    trak = TRAK(heads, projection_dim=8).fit((X, y)).influence((X[:3], y[:3]))
    np.testing.assert_allclose(
        trak, TRAK(alone, projection_dim=8).fit((X, y)).influence((X[:3], y[:3])), rtol=1e-8
    )


# -- Keras: a functional model with two outputs --------------------------------------------------
def test_a_keras_model_with_two_outputs_reads_the_chosen_one_in_kernels_and_layer_statistics() -> (
    None
):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,), dtype="float64")
    hidden = keras.layers.Dense(8, "tanh", dtype="float64", name="body")(inputs)
    aux = keras.layers.Dense(2, dtype="float64", name="aux")(hidden)
    head = keras.layers.Dense(3, dtype="float64", name="head")(hidden)
    net = keras.Model(inputs, [aux, head])
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None, dtype="float64"
    )
    X, y = rng.normal(size=(20, 4)), rng.integers(0, 3, 20)
    model = InfluenceModel(net, loss, output=1, parameters=["body", "head"])
    expected = loss(y, net(X)[1]).numpy()
    np.testing.assert_allclose(model.to_numpy(model.per_sample_loss((X, y))), expected)
    states = [model.save_state()]
    layerwise = TracIn(model, states, 0.1, layerwise=True).fit((X, y)).influence((X[:3], y[:3]))
    flat = TracIn(model, states, 0.1, layerwise=False).fit((X, y)).influence((X[:3], y[:3]))
    np.testing.assert_allclose(layerwise, flat, rtol=1e-10)  # the statistics read head, not aux


# -- a Hugging Face BERT from a config (random weights, nothing downloaded) ------------------------
transformers = pytest.importorskip("transformers")


def bert(attention: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    net = transformers.BertForSequenceClassification(config).double().eval()
    net.set_attn_implementation(attention)
    return net


def token_batches(n: int = 16, t: int = 6, padded: bool = False) -> tuple[dict, list[dict]]:
    ids = rng.integers(1, 40, (n, t))
    mask = np.ones((n, t), dtype=np.int64)
    if padded:
        mask[::3, -2:] = 0
    arrays = {
        "input_ids": torch.as_tensor(ids),
        "attention_mask": torch.as_tensor(mask),
        "labels": torch.as_tensor(rng.integers(0, 3, n)),
    }
    rows = [{k: v[i] for k, v in arrays.items()} for i in range(n)]
    return arrays, rows


def dense_layers(model: InfluenceModel) -> list[str]:
    return sorted(
        {
            n.rsplit(".", 1)[0]
            for n in model.parameter_names
            if "LayerNorm" not in n and "embeddings" not in n
        }
    )


def test_a_hugging_face_model_takes_dict_batches_and_its_model_output() -> None:
    net = bert()
    arrays, rows = token_batches()
    loader = torch.utils.data.DataLoader(rows, batch_size=5)  # dicts collated with their labels
    model = InfluenceModel(net, CE)  # reads .logits by convention; calls net(**batch)
    with torch.no_grad():
        logits = net(input_ids=arrays["input_ids"], attention_mask=arrays["attention_mask"]).logits
    expected = CE(logits, arrays["labels"]).numpy()
    np.testing.assert_allclose(model.to_numpy(model.per_sample_loss(loader)), expected, rtol=1e-12)
    np.testing.assert_allclose(model.to_numpy(model.per_sample_loss(arrays)), expected, rtol=1e-12)


def test_bert_layer_statistics_rebuild_per_sample_gradients_on_its_dense_layers() -> None:
    net = bert()
    arrays, _ = token_batches()
    unpadded = {k: v for k, v in arrays.items() if k != "attention_mask"}
    model = InfluenceModel(net, CE)
    model = model.with_parameters(dense_layers(model))
    states = [model.save_state()]
    test = {k: v[:3] for k, v in unpadded.items()}
    layerwise = TracIn(model, states, 0.1, layerwise=True).fit(unpadded).influence(test)
    flat = TracIn(model, states, 0.1, layerwise=False).fit(unpadded).influence(test)
    np.testing.assert_allclose(layerwise, flat, rtol=1e-9)
    # with padding, the layer-wise path (no vmap) still runs
    _, padded_rows = token_batches(padded=True)
    loader = torch.utils.data.DataLoader(padded_rows, batch_size=8)
    scores = (
        FirstOrderInfluenceCalculator(model, EKFACIHVP(damping=0.1)).fit(loader).self_influence()
    )
    assert np.all(np.isfinite(model.to_numpy(scores)))


def test_bert_s_raw_torch_errors_name_their_fix() -> None:
    arrays, _ = token_batches(padded=True)
    model = InfluenceModel(bert(), CE)
    with pytest.raises(UnsupportedByBackendError, match="leave attention_mask out"):
        model.per_sample_grads({k: v[:4] for k, v in arrays.items()})
    unpadded = {k: v for k, v in arrays.items() if k != "attention_mask"}
    solver = ConjugateGradientIHVP(damping=1.0, maxiter=2).fit(model, unpadded)
    with pytest.raises(UnsupportedByBackendError, match=r'set_attn_implementation\("eager"\)'):
        solver.solve(np.ones(model.num_parameters))
    eager = InfluenceModel(bert("eager"), CE)
    solver = ConjugateGradientIHVP(damping=1.0, maxiter=2).fit(eager, unpadded)
    with pytest.warns(UserWarning, match="stopped after 2 iterations"):
        assert np.all(np.isfinite(eager.to_numpy(solver.solve(np.ones(eager.num_parameters)))))


# -- GPT-2: Hugging Face Conv1D layers and a per-sequence loss (issue 25, items 1 and 4) -----------
def sequence_loss(logits, labels):
    """A sequence's loss: the sum of its next-token cross-entropies (labels -100 are padding)."""
    tokens = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=-100
    )
    return tokens.sum(1)


def gpt2(tied: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=30,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=tied,
    )
    return transformers.GPT2LMHeadModel(config).double().eval()


def test_gpt2_s_conv1d_layers_give_statistics_that_rebuild_its_gradients() -> None:
    ids = torch.as_tensor(rng.integers(0, 30, (12, 8)))
    labels = ids.clone()
    labels[::4, -2:] = -100  # padding positions carry no loss
    data = {"input_ids": ids, "labels": labels}
    model = InfluenceModel(gpt2(), sequence_loss)
    layers = model.kernels.layers()
    layers = [layer for layer in layers if layer.kind == "dense"]  # all but embeddings and norms
    assert {layer.name.rsplit(".", 1)[-1] for layer in layers} == {"c_attn", "c_proj", "c_fc"}
    dense = model.with_parameters([layer.name for layer in layers])
    states, test = [dense.save_state()], {k: v[:3] for k, v in data.items()}
    layerwise = TracIn(dense, states, 0.1, layerwise=True).fit(data).influence(test)
    flat = TracIn(dense, states, 0.1, layerwise=False).fit(data).influence(test)
    np.testing.assert_allclose(layerwise, flat, rtol=1e-9)
    with pytest.raises(ValueError, match=r"shape \(12, 8, 30\).*fisher='empirical'"):
        FirstOrderInfluenceCalculator(dense, EKFACIHVP(damping=0.1)).fit(data)
    ekfac = EKFACIHVP(damping=0.1, fisher="empirical")
    scores = FirstOrderInfluenceCalculator(dense, ekfac).fit(data).self_influence()
    assert np.all(np.isfinite(dense.to_numpy(scores)))


def test_a_conv1d_layer_is_a_dense_layer_stored_in_out() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = torch.nn.Sequential(Conv1D(8, 4), torch.nn.Tanh(), Conv1D(3, 8)).double()
    linear = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    linear = linear.double()
    with torch.no_grad():
        for c, lin in ((conv[0], linear[0]), (conv[2], linear[2])):
            lin.weight.copy_(c.weight.T)
            lin.bias.copy_(c.bias)
    X, y = rng.normal(size=(30, 4)), rng.integers(0, 3, 30)
    scores = [
        FirstOrderInfluenceCalculator(InfluenceModel(net, CE), EKFACIHVP(damping=0.1))
        .fit((X, y))
        .self_influence()
        for net in (conv, linear)
    ]
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-10)
    np.testing.assert_allclose(
        InfluenceModel(conv, CE).to_canonical(InfluenceModel(conv, CE).get_parameters()),
        InfluenceModel(linear, CE).to_canonical(InfluenceModel(linear, CE).get_parameters()),
    )
