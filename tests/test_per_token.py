"""Per-token scores (influence_core.tokens) on a Hugging Face GPT-2 language model, all parameters.

A sequence's loss is the sum of its tokens', so its score is the sum of its
per-token scores, for every first-order estimator; and each per-token score
is the score of the sequence with only that token's label kept.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_model_outputs import gpt2, sequence_loss  # noqa: E402

from influence_core import (  # noqa: E402
    EKFACIHVP,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
    TracIn,
    UnsupportedByBackendError,
)
from influence_core.tokens import per_token  # noqa: E402


def data(n: int, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    ids = torch.as_tensor(rng.integers(0, 30, (n, 8)))
    labels = ids.clone()
    labels[::2, -3:] = -100  # padding positions carry no loss
    return {"input_ids": ids, "labels": labels}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("estimator", ["ekfac", "tracin"])
def test_per_token_scores_sum_to_the_sequence_s_and_each_is_its_token_s(estimator: str) -> None:
    model = InfluenceModel(gpt2(tied=False), sequence_loss)
    train, test = data(10, 0), data(3, 1)
    if estimator == "ekfac":
        calculator = FirstOrderInfluenceCalculator(
            model, EKFACIHVP(damping=1e-3, fisher="empirical")
        ).fit(train)
    else:
        calculator = TracIn(model, [model.save_state()], 0.1).fit(train)
    queries = per_token(model, test)
    assert len(queries.sequence) == int((test["labels"] != -100).sum())
    scores = calculator.influence(queries.data)
    by_token = queries.by_token(model, scores)
    assert by_token.shape == (3, 8, 10)
    whole = calculator.influence(test)
    assert relative(by_token.sum(dim=1), whole) < 1e-10
    only = torch.full_like(test["labels"][1:2], -100)  # sequence 1, token 4, by hand
    only[0, 4] = test["labels"][1, 4]
    by_hand = calculator.influence({"input_ids": test["input_ids"][1:2], "labels": only})
    assert relative(by_token[1, 4], by_hand[0]) < 1e-10
    assert torch.all(by_token[0, -3:] == 0) and torch.all(by_token[:, 0] == 0)  # padding; no t−1
    assert torch.any(by_token[1, -3:] != 0)


def test_per_token_refuses_labels_without_positions_and_all_ignored() -> None:
    model = InfluenceModel(gpt2(tied=False), sequence_loss)
    test = data(2, 1)
    with pytest.raises(ValueError, match=r"labels of shape \(n, T\)"):
        per_token(model, (test["input_ids"], test["labels"][:, 0]))
    with pytest.raises(ValueError, match="no token to score"):
        per_token(model, (test["input_ids"], torch.full_like(test["labels"], -100)))
    queries = per_token(model, test)
    with pytest.raises(ValueError, match="one row each"):
        queries.by_token(model, torch.zeros((2, 5), dtype=torch.float64))


def test_gauss_newton_products_of_a_language_model_need_no_output_hessian(monkeypatch) -> None:
    # The outputs are (b, T, vocabulary); the Gauss-Newton product takes H_out (J v) as a
    # product, never the (b, c, c) Hessian with c = T × vocabulary. With only the untied
    # head selected the logits are linear in θ, so the Gauss-Newton matrix is the Hessian.
    train = data(6, 2)
    sdpa = InfluenceModel(gpt2(tied=False), sequence_loss)  # J v needs forward-mode derivatives
    ones = torch.ones((sdpa.num_parameters, 1), dtype=torch.float64)
    with pytest.raises(UnsupportedByBackendError, match='set_attn_implementation\\("eager"\\)'):
        sdpa.ggn_vp(train, ones)
    net = gpt2(tied=False)
    net.set_attn_implementation("eager")
    model = InfluenceModel(net, sequence_loss).with_parameters("lm_head.weight")
    V = torch.as_tensor(np.random.default_rng(3).normal(size=(model.num_parameters, 2)))

    def formed(*args):
        raise AssertionError("the (b, c, c) output Hessians were formed")

    monkeypatch.setattr(type(model.kernels), "output_loss_hessians", formed)
    assert relative(model.ggn_vp(train, V), model.hvp(train, V)) < 1e-10
    everything = InfluenceModel(net, sequence_loss)  # and on every parameter, PSD
    W = torch.as_tensor(np.random.default_rng(4).normal(size=(everything.num_parameters, 3)))
    assert torch.all(torch.linalg.eigvalsh(W.T @ everything.ggn_vp(train, W)) > -1e-10)
