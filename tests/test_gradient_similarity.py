"""Grad-Dot and Grad-Cos against their definition, TracIn, and across backends."""

from __future__ import annotations

import numpy as np
import pytest

from influence_conformance.cases import build_case
from influence_core import GradientSimilarity, TracIn


def reference(case, test, kind: str) -> tuple[np.ndarray, np.ndarray]:
    host = case.model.to_numpy
    G = host(case.model.per_sample_grads(case.data))
    T = host(case.model.per_sample_grads(test))
    if kind == "cosine":
        G = G / np.linalg.norm(G, axis=1, keepdims=True)
        T = T / np.linalg.norm(T, axis=1, keepdims=True)
        return T @ G.T, np.ones(len(G))
    return T @ G.T, (G * G).sum(axis=1)


@pytest.mark.parametrize("kind", ["dot", "cosine"])
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_scores_and_self_influence_match_the_definition(backend: str, kind: str) -> None:
    case = build_case(backend, "mlp_tanh", "float64")
    test = (case.X[:4], case.y[:4])
    calc = GradientSimilarity(case.model, kind).fit(case.data)
    scores, own = reference(case, test, kind)
    host = case.model.to_numpy
    np.testing.assert_allclose(host(calc.influence(test)), scores, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(host(calc.self_influence()), own, rtol=1e-10)
    top = calc.top_k(test, k=3)
    np.testing.assert_array_equal(
        host(top.proponents), np.argsort(-scores, axis=1, kind="stable")[:, :3]
    )
    if kind == "dot":  # Grad-Dot is TracIn at one checkpoint with η = 1
        tracin = TracIn(case.model, [case.model.kernels.save_state()], 1.0).fit(case.data)
        np.testing.assert_allclose(host(tracin.influence(test)), scores, rtol=1e-10, atol=1e-14)


def test_cosine_is_scale_free_and_a_zero_gradient_scores_zero() -> None:
    case = build_case("torch", "logistic_regression", "float64")
    calc = GradientSimilarity(case.model, "cosine").fit(case.data)
    scores = case.model.to_numpy(calc.influence((case.X[:3], case.y[:3])))
    assert np.all(np.abs(scores) <= 1 + 1e-12)
    np.testing.assert_allclose(np.diag(scores[:, :3]), 1.0, rtol=1e-12)  # a point with itself
    unit = calc._unit(case.model.xp.zeros((2, case.model.num_parameters), dtype=case.model.dtype))
    assert float(abs(unit).max()) == 0.0
    with pytest.raises(ValueError, match="kind"):
        GradientSimilarity(case.model, "euclidean")


def test_gradient_similarity_agrees_across_backends() -> None:
    out = {}
    for backend in ("torch", "tensorflow"):
        case = build_case(backend, "convnet", "float64")
        test = (case.X[:3], case.y[:3])
        out[backend] = [
            case.model.to_numpy(GradientSimilarity(case.model, kind).fit(case.data).influence(test))
            for kind in ("dot", "cosine")
        ]
    for a, b in zip(out["torch"], out["tensorflow"], strict=True):
        assert np.max(np.abs(a - b)) / np.max(np.abs(a)) < 1e-10
