"""Hugging Face BERT and GPT-2 (small configs, random weights) on **all** parameters (issue 25).

Every parameter is covered by a layer (embeddings, LayerNorms, dense and
Conv1D projections), the statistics rebuild the per-sample gradients, and
EK-FAC, K-FAC, Kronecker TRAK and layer-wise TracIn fit and score
(pairwise, self-influence, top-k) with the numbers their flat-gradient forms give.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_model_outputs import CE, bert, gpt2, sequence_loss  # noqa: E402

from influence_core import (  # noqa: E402
    EKFACIHVP,
    KFACIHVP,
    TRAK,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
    KroneckerProjection,
    TracIn,
)
from influence_core.layerwise import coverage, per_sample_grads_from_layers  # noqa: E402

rng = np.random.default_rng(0)


def bert_data(n: int = 12) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.as_tensor(rng.integers(1, 40, (n, 6))),
        "labels": torch.as_tensor(rng.integers(0, 3, n)),
    }


def gpt2_data(n: int = 12) -> dict[str, torch.Tensor]:
    ids = torch.as_tensor(rng.integers(0, 30, (n, 8)))
    labels = ids.clone()
    labels[::4, -2:] = -100  # padding positions carry no loss
    return {"input_ids": ids, "labels": labels}


CASES = {
    "bert": (bert, CE, bert_data),
    "gpt2": (lambda: gpt2(tied=False), sequence_loss, gpt2_data),
}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_parameter_is_covered_and_the_statistics_rebuild_its_gradients(name: str) -> None:
    build, loss, data = CASES[name]
    model = InfluenceModel(build(), loss)
    covered = coverage(model)
    assert list(covered) == list(model.parameter_names)  # 100 % of θ
    kinds = {c.kind for c in covered.values()}
    assert kinds == {"embedding", "elementwise", "dense"}
    batch = data(5)
    flat = model.per_sample_grads(batch)
    assert relative(per_sample_grads_from_layers(model, batch), flat) < 1e-12


@pytest.mark.parametrize("name", sorted(CASES))
def test_ekfac_kfac_trak_and_tracin_score_all_parameters(name: str) -> None:
    build, loss, data = CASES[name]
    model = InfluenceModel(build(), loss)
    train, test = data(12), data(3)
    g_train, g_test = model.per_sample_grads(train), model.per_sample_grads(test)
    for solver in (KFACIHVP, EKFACIHVP):
        calculator = FirstOrderInfluenceCalculator(
            model, solver(damping=1e-2, fisher="empirical")
        ).fit(train)
        scores = calculator.influence(test)
        expected = calculator.ihvp.solve(g_test.T).T @ g_train.T
        assert relative(scores, expected) < 1e-9, solver.__name__
        own = torch.einsum("id,di->i", g_train, calculator.ihvp.solve(g_train.T))
        assert relative(calculator.self_influence(), own) < 1e-9
        both = calculator.influence_and_self_influence(test)  # one pass, in the eigenbases
        assert relative(both[0], expected) < 1e-9 and relative(both[1], own) < 1e-9
        top = calculator.top_k(test, k=3)
        np.testing.assert_array_equal(
            np.asarray(top.proponents), np.argsort(-scores.numpy(), axis=1, kind="stable")[:, :3]
        )
    state = model.save_state()
    layerwise = TracIn(model, [state], 0.1, layerwise=True).fit(train).influence(test)
    np.testing.assert_allclose(layerwise, 0.1 * g_test @ g_train.T, rtol=1e-9)
    projector = KroneckerProjection(4, 4, seed=1)
    trak = TRAK(model, projector=projector, measurement=None, weighting=None, damping=1e-3)
    trak_scores = trak.fit(train).influence(test)
    assert trak_scores.shape == (3, 12) and bool(torch.isfinite(trak_scores).all())


def test_a_tied_language_model_head_is_named_with_the_fix() -> None:
    model = InfluenceModel(gpt2(tied=True), sequence_loss)
    with pytest.raises(
        ValueError, match=r"transformer.wte.weight: a weight tied between .*lm_head"
    ):
        EKFACIHVP().fit(model, gpt2_data())


@pytest.mark.parametrize("name", sorted(CASES))
def test_approximate_unrolling_runs_on_all_parameters(name: str) -> None:
    """SOURCE on BERT and GPT-2 (embeddings, LayerNorms, Conv1D): two segments at two weights,
    the scores' diagonal on the training data is the self-influence, one long segment is IF."""
    from influence_core.unrolling import ApproximateUnrolling

    build, loss, data = CASES[name]
    model = InfluenceModel(build(), loss)
    train, test = data(8), data(3)
    later = model.save_state()
    generator = torch.Generator().manual_seed(0)
    earlier = {
        k: v + 0.02 * torch.randn(v.shape, generator=generator, dtype=v.dtype)
        if v.is_floating_point()
        else v
        for k, v in later.items()
    }
    solver = EKFACIHVP(damping=1e-2, fisher="empirical")
    source = ApproximateUnrolling(model, [earlier, later], [0.1, 0.1], [5, 5], solver=solver)
    source.fit(train)
    whole = source.influence(train)
    assert bool(torch.isfinite(whole).all()) and whole.shape == (8, 8)
    assert relative(source.self_influence(), torch.diagonal(whole)) < 1e-9
    long = ApproximateUnrolling(model, [later], [1.0], [10**9], solver=solver).fit(train)
    influence = FirstOrderInfluenceCalculator(model, solver).fit(train).influence(test)
    assert relative(long.influence(test), influence) < 1e-9
