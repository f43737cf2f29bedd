"""Approximate unrolling (SOURCE) against its definition in NumPy and its influence-function limit.

Reference: each segment's curvature as a dense d × d matrix (the fitted
solver's own (F̂ + λI), read through ``damped_hvp``), its matrix functions by
``eigh``, per-sample gradients at each checkpoint, and the sum
Σ_l g_l(z)ᵀ φ_l(H_l) S_{l+1} ⋯ S_L ∇f(θ_T) written out. A wrong order of the
propagation is shown to give other numbers, so the comparison can fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from influence_conformance.cases import build_case
from influence_core import EKFACIHVP, KFACIHVP, ExactIHVP, FirstOrderInfluenceCalculator
from influence_core.unrolling import ApproximateUnrolling


def perturbed(module: torch.nn.Module, scale: float, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * torch.randn(v.shape, generator=generator, dtype=v.dtype)
        for k, v in module.state_dict().items()
    }


def dense_function(H: np.ndarray, function) -> np.ndarray:
    values, vectors = np.linalg.eigh((H + H.T) / 2)
    return (vectors * function(values)) @ vectors.T


def exact_ggn(damping: float) -> ExactIHVP:
    """The exact Gauss-Newton curvature (the Hessian is indefinite at the checkpoints)."""
    return ExactIHVP(damping=damping, curvature="ggn")


@pytest.mark.parametrize("solver", [EKFACIHVP, KFACIHVP, exact_ggn])
def test_three_segments_equal_the_formula_written_out(solver) -> None:
    case = build_case("torch", "convnet", "float64")
    model, module = case.model, case.model.kernels.module
    train, test = case.data, (case.X[:5], case.y[:5])
    checkpoints = [perturbed(module, 0.1, seed) for seed in (1, 2, 3)]
    rates, steps = [0.5, 0.2, 0.1], [3, 5, 10]
    calc = ApproximateUnrolling(model, checkpoints, rates, steps, solver=solver(damping=1e-2)).fit(
        train
    )
    got = model.to_numpy(calc.influence(test))

    d = model.num_parameters
    u = model.to_numpy(model.per_sample_grads(test)).T  # ∇f(θ_T), (d, n_test)
    expected, wrong_order = 0.0, 0.0
    u_wrong = u.copy()
    for j in (2, 1, 0):
        reach = rates[j] * steps[j]
        eye = model.kernels.as_native(np.eye(d), floating=True)
        with model.checkpoint_loaded(checkpoints[j]):  # the exact solver's HVPs read θ_l
            H = model.to_numpy(calc.solvers_[j].damped_hvp(eye))
            G = model.to_numpy(model.per_sample_grads(train))  # g_l(z), (n_train, d)
        accumulated = dense_function(H, lambda s, r=reach: -np.expm1(-r * s) / s)
        decayed = dense_function(H, lambda s, r=reach: np.exp(-r * s))
        expected = expected + (G @ accumulated @ u).T
        u = decayed @ u
        u_wrong = decayed @ u_wrong  # the mutant: propagated through its own segment first
        wrong_order = wrong_order + (G @ accumulated @ u_wrong).T
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-10 * np.abs(expected).max())
    assert np.abs(wrong_order - expected).max() > 1e-3 * np.abs(expected).max()
    # The streamed path (prepared blocks, checkpoints loaded per chunk: what top-k, chunked
    # runs and the LDS read) gives the same scores, in chunks smaller than the data.
    calc.chunk_size = 4
    streamed = model.to_numpy(calc.influence_from_prepared(calc.prepare_test(test)))
    np.testing.assert_allclose(streamed, got, rtol=1e-12, atol=1e-12 * np.abs(got).max())
    # Self-influence: each training point's own loss as the test, the diagonal of the matrix.
    whole = model.to_numpy(calc.influence(train))
    own = model.to_numpy(calc.self_influence())
    np.testing.assert_allclose(own, np.diag(whole), rtol=1e-9, atol=1e-10 * np.abs(whole).max())


@pytest.mark.parametrize("solver", [EKFACIHVP, exact_ggn])
def test_one_long_segment_is_the_influence_function(solver) -> None:
    """η K s ≫ 1 for every eigenvalue: e^{−ηKs} = 0 and φ(s) = 1/s, the solve itself."""
    case = build_case("torch", "convnet", "float64")
    model, test = case.model, (case.X[:5], case.y[:5])
    state = {k: v.clone() for k, v in model.kernels.module.state_dict().items()}
    unrolled = ApproximateUnrolling(
        model, [state], [1.0], [10**9], solver=solver(damping=1e-2)
    ).fit(case.data)
    influence = FirstOrderInfluenceCalculator(model, solver(damping=1e-2)).fit(case.data)
    expected = model.to_numpy(influence.influence(test))
    got = model.to_numpy(unrolled.influence(test))
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12 * np.abs(expected).max())
    top = unrolled.top_k(test, k=3)
    np.testing.assert_array_equal(
        model.to_numpy(top.proponents), np.argsort(-expected, axis=1, kind="stable")[:, :3]
    )


def test_bad_segments_are_refused_with_what_to_give() -> None:
    case = build_case("torch", "convnet", "float64")
    model = case.model
    state = model.kernels.module.state_dict()
    with pytest.raises(ValueError, match="one learning rate and one step count per checkpoint"):
        ApproximateUnrolling(model, [state, state], [0.1], [5, 5])
    with pytest.raises(ValueError, match="steps must be positive integers"):
        ApproximateUnrolling(model, [state], [0.1], [0])
    with pytest.raises(ValueError, match="learning rates must be positive"):
        ApproximateUnrolling(model, [state], [-0.1], [3])
    with pytest.raises(TypeError, match="give an EKFACIHVP, KFACIHVP or ExactIHVP"):
        from influence_core import ConjugateGradientIHVP

        ApproximateUnrolling(model, [state], [0.1], [3], solver=ConjugateGradientIHVP())
    with pytest.raises(ValueError, match="give no query_rank"):
        ApproximateUnrolling(model, [state], [0.1], [3], solver=EKFACIHVP(query_rank=2))
    with pytest.raises(RuntimeError, match="not fitted yet"):
        ApproximateUnrolling(model, [state], [0.1], [3]).influence(case.data)


def test_torch_and_tensorflow_agree_to_1e_8() -> None:
    """The same weights in both frameworks; three segments (at the same θ, different η K)."""
    scores = []
    for backend in ("torch", "tensorflow"):
        case = build_case(backend, "convnet", "float64")
        model = case.model
        state = model.save_state()
        calc = ApproximateUnrolling(
            model, [state] * 3, [0.5, 0.2, 0.1], [3, 5, 10], solver=EKFACIHVP(damping=1e-2)
        ).fit(case.data)
        scores.append(model.to_numpy(calc.influence((case.X[:5], case.y[:5]))))
    np.testing.assert_allclose(scores[1], scores[0], rtol=1e-8, atol=1e-8 * np.abs(scores[0]).max())


@pytest.mark.parametrize("kind", ["embedding", "elementwise", "parameter"])
def test_every_layer_kind_takes_the_spectral_functions(kind: str) -> None:
    """Embeddings, norms and bare parameters (their bases are I or diagonal): one long segment is
    the influence function, and self-influence the diagonal of the scores on the training data."""
    from influence_core import InfluenceModel
    from influence_torch.reference_models import layer_kind_case

    net, loss_fn, (inputs, targets) = layer_kind_case(kind)
    model = InfluenceModel(net, loss_fn)
    data = (inputs, targets)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    solver = EKFACIHVP(damping=1e-2)
    unrolled = ApproximateUnrolling(model, [state], [1.0], [10**9], solver=solver).fit(data)
    expected = model.to_numpy(
        FirstOrderInfluenceCalculator(model, solver).fit(data).influence(data)
    )
    got = model.to_numpy(unrolled.influence(data))
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-11 * np.abs(expected).max())
    short = ApproximateUnrolling(model, [state, state], [0.1, 0.1], [3, 3], solver=solver).fit(data)
    whole = model.to_numpy(short.influence(data))
    np.testing.assert_allclose(
        model.to_numpy(short.self_influence()), np.diag(whole), rtol=1e-9, atol=1e-12
    )


def test_it_is_a_calculator_the_evaluation_and_the_chunked_runs_take(tmp_path) -> None:
    """LDS through the calculator equals LDS of its score matrix; a chunked run equals influence."""
    from influence_core.evaluation import linear_datamodeling_score
    from influence_core.runs import run_influence

    case = build_case("torch", "convnet", "float64")
    model, test = case.model, (case.X[:4], case.y[:4])
    state = {k: v.clone() for k, v in model.kernels.module.state_dict().items()}
    calc = ApproximateUnrolling(
        model, [state, state], [0.3, 0.2], [4, 6], solver=EKFACIHVP(damping=1e-2), chunk_size=5
    ).fit(case.data)
    scores = model.to_numpy(calc.influence(test))
    rng = np.random.default_rng(0)

    def retrain(indices):  # any retraining: here noisy copies of the weights
        return {
            k: v + 1e-3 * torch.from_numpy(rng.standard_normal(v.shape)) for k, v in state.items()
        }

    through = linear_datamodeling_score(calc, retrain, test, subsets=5, fraction=0.7, seed=2)
    from_scores = linear_datamodeling_score(scores, through)
    assert through.score == pytest.approx(from_scores.score, abs=1e-12)
    chunked = run_influence(calc, tmp_path / "run", test, chunk_size=5)
    np.testing.assert_allclose(model.to_numpy(chunked), scores, rtol=1e-12, atol=1e-14)
