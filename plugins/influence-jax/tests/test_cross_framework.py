"""JAX, PyTorch and TensorFlow give the same numbers on the same weights, for every estimator.

The conformance suite's cross-backend class over every installed backend
(kernels), then the estimators on one softmax-regression and one MLP case in
float64: each quantity is compared in its layout-free (canonical) form.
"""

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from influence_conformance import CrossBackendConformance  # noqa: E402
from influence_conformance.cases import build_case  # noqa: E402
from influence_conformance.selection_checks import last_layer_names  # noqa: E402
from influence_core import (  # noqa: E402
    EKFACIHVP,
    KFACIHVP,
    TRAK,
    ArnoldiIHVP,
    ArnoldiInfluenceCalculator,
    ConjugateGradientIHVP,
    ExactIHVP,
    FirstOrderInfluenceCalculator,
    GradientSimilarity,
    KroneckerProjection,
    RepresenterPointL2,
    RepresenterPointLJE,
    SecondOrderInfluenceCalculator,
    TracIn,
    available_backends,
)

DAMPING = 5.0  # above the random MLP's most negative curvature, so every solve is PD
BACKENDS = [b for b in ("jax", "torch", "tensorflow") if b in available_backends()]


class TestThreeFrameworksAgree(CrossBackendConformance):
    backends = ("jax", "torch", "tensorflow")


def estimates(backend: str, spec_name: str) -> dict[str, np.ndarray]:
    case = build_case(backend, spec_name, "float64")
    model, host = case.model, case.model.to_numpy
    train, test = case.data, (case.X[:4], case.y[:4])
    group = (case.X[:5], case.y[:5])
    exact = FirstOrderInfluenceCalculator(model, ExactIHVP(damping=DAMPING)).fit(train)
    head = last_layer_names(case)  # named: the representer methods on every framework
    theta = model.get_parameters()
    with model.parameters_set_to(theta * 0.5):
        halfway = model.kernels.save_state()
    out = {
        "exact influence": host(exact.influence(test)),
        "exact self-influence": host(exact.self_influence()),
        "RelatIF": host(
            FirstOrderInfluenceCalculator(model, ExactIHVP(damping=DAMPING), normalize=True)
            .fit(train)
            .influence(test)
        ),
        "CG influence": host(
            FirstOrderInfluenceCalculator(model, ConjugateGradientIHVP(damping=DAMPING, tol=1e-12))
            .fit(train)
            .influence(test)
        ),
        "margin influence": host(
            FirstOrderInfluenceCalculator(model, ExactIHVP(damping=DAMPING), measurement="margin")
            .fit(train)
            .influence(test)
        ),
        "second-order group influence": host(
            SecondOrderInfluenceCalculator(model, ExactIHVP(damping=DAMPING))
            .fit(train)
            .group_influence(test, group)
        ),
        "Arnoldi rank 5 of 10 iterations": host(
            ArnoldiInfluenceCalculator(
                model, ArnoldiIHVP(rank=5, iterations=10, damping=DAMPING, seed=2)
            )
            .fit(train)
            .influence(test)
        ),
        "representer points L2 (named last layer)": host(
            RepresenterPointL2(model, last_layer=head).fit(train).influence(test)
        ),
        "representer points LJE (named last layer)": host(
            RepresenterPointLJE(model, ExactIHVP(damping=DAMPING), last_layer=head)
            .fit(train)
            .influence(test)
        ),
        "K-FAC, true Fisher": host(
            FirstOrderInfluenceCalculator(model, KFACIHVP(seed=3)).fit(train).influence(test)
        ),
        "EK-FAC, true Fisher": host(
            FirstOrderInfluenceCalculator(model, EKFACIHVP(seed=3)).fit(train).influence(test)
        ),
        "EK-FAC, empirical Fisher, rank-2 query side": host(
            FirstOrderInfluenceCalculator(model, EKFACIHVP(fisher="empirical", query_rank=2))
            .fit(train)
            .influence(test)
        ),
        "Grad-Cos": host(GradientSimilarity(model, "cosine").fit(train).influence(test)),
        "TracIn, projected, two checkpoints": host(
            TracIn(model, [halfway, model.kernels.save_state()], [0.3, 0.1], projection_dim=8)
            .fit(train)
            .influence(test)
        ),
        "TRAK, projected, two checkpoints": host(
            TRAK(model, [halfway, model.kernels.save_state()], projection_dim=6, damping=0.1)
            .fit(train)
            .influence(test)
        ),
        "TRAK, Kronecker-projected, self-influence": host(
            TRAK(model, projector=KroneckerProjection(3, 2, seed=4), damping=0.1)
            .fit(train)
            .self_influence()
        ),
        "Grad-Dot, Kronecker-projected": host(
            GradientSimilarity(model, projector=KroneckerProjection(3, 2))
            .fit(train)
            .influence(test)
        ),
    }
    return out


# One spec: the conv net (a convolution, then a dense head) takes every estimator through
# both layer kinds. The other specs' kernels agree in TestThreeFrameworksAgree, and the
# estimators on them in the two-framework tests (tests/test_cross_backend_estimators.py).
@pytest.mark.parametrize("spec_name", ["convnet"])
def test_every_estimator_agrees_across_the_installed_frameworks(spec_name: str) -> None:
    if len(BACKENDS) < 2:
        pytest.skip(f"needs two installed backends, found {BACKENDS}")
    results = {backend: estimates(backend, spec_name) for backend in BACKENDS}
    reference = results[BACKENDS[0]]
    gaps = {}
    for backend in BACKENDS[1:]:
        for name, value in results[backend].items():
            gap = float(np.max(np.abs(value - reference[name])) / np.max(np.abs(reference[name])))
            gaps[f"{BACKENDS[0]} vs {backend}: {name}"] = gap
    print({k: f"{v:.1e}" for k, v in gaps.items()})
    assert max(gaps.values()) < 1e-8, max(gaps.items(), key=lambda kv: kv[1])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_replayed_run_s_metagradients_agree_across_the_installed_frameworks(optimizer) -> None:
    """influence_core.unrolling on the same initialisation, batch order and optimizer."""
    from influence_core.unrolling import SGD, Adam, ReplayedTraining

    if len(BACKENDS) < 2:
        pytest.skip(f"needs two installed backends, found {BACKENDS}")
    settings = {
        "sgd": SGD(lr=0.3, momentum=0.9, weight_decay=1e-2),
        "adam": Adam(lr=0.05, weight_decay=1e-2),
    }[optimizer]
    results = {}
    for backend in BACKENDS:
        case = build_case(backend, "mlp_tanh", "float64")
        run = ReplayedTraining(case.model, case.data, settings, epochs=2, batch_size=4, seed=1)
        scores = case.model.to_numpy(run.metagradient_scores((case.X[:3], case.y[:3])))
        final = case.model.to_numpy(case.model.to_canonical(run.train()))
        results[backend] = (scores, final)
    reference = results[BACKENDS[0]]
    for backend in BACKENDS[1:]:
        for got, expected in zip(results[backend], reference, strict=True):
            np.testing.assert_allclose(
                got, expected, rtol=1e-8, atol=1e-12 * np.abs(expected).max()
            )


def test_approximate_unrolling_agrees_across_the_installed_frameworks() -> None:
    """SOURCE's segments (EK-FAC spectral functions, propagation) on the same weights."""
    from influence_core import EKFACIHVP
    from influence_core.unrolling import ApproximateUnrolling

    if len(BACKENDS) < 2:
        pytest.skip(f"needs two installed backends, found {BACKENDS}")
    results = {}
    for backend in BACKENDS:
        case = build_case(backend, "convnet", "float64")
        state = case.model.save_state()
        calc = ApproximateUnrolling(
            case.model, [state] * 3, [0.5, 0.2, 0.1], [3, 5, 10], solver=EKFACIHVP(damping=1e-2)
        ).fit(case.data)
        results[backend] = case.model.to_numpy(calc.influence((case.X[:4], case.y[:4])))
    reference = results[BACKENDS[0]]
    for backend in BACKENDS[1:]:
        np.testing.assert_allclose(
            results[backend], reference, rtol=1e-8, atol=1e-8 * np.abs(reference).max()
        )
