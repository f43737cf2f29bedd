"""K-FAC and EK-FAC: exact where the Kronecker factorisation is exact, and a solver like any other.

The exact case. One linear layer z = W x + b with c outputs and the loss
ℓ = ½‖z − y‖², whose Hessian (of the mean loss) is H = E[ã ãᵀ] ⊗ I with
ã = [x, 1]. The training targets are chosen so that the residuals z_i − y_i at
the current weights run through every sign pattern in {−1, +1}^c for each
input (each input repeated 2^c times). Then g_i = z_i − y_i and the empirical
Fisher E[vec G_i vec G_iᵀ] = E[ã ãᵀ ⊗ g gᵀ] equals E[ã ãᵀ] ⊗ I = H exactly
(the cross terms of the sign patterns cancel), K-FAC's S = E[g gᵀ] = I exactly,
and EK-FAC's corrected eigenvalues equal K-FAC's. So both solvers must give
(H + λI)⁻¹ to rounding, which the exact solver computes from the Hessian.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from influence_core import (
    EKFACIHVP,
    KFACIHVP,
    ExactIHVP,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
)
from influence_core.ihvp import FACTORED_DAMPING
from influence_core.layerwise import per_sample_grads_from_layers

C, P = 2, 3


def squared(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((outputs - targets) ** 2).sum(dim=1)


def exact_case() -> tuple[InfluenceModel, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    layer = torch.nn.Linear(P, C).double()
    x = torch.randn(10, P, dtype=torch.float64)
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=C)), dtype=torch.float64)
    X = x.repeat_interleave(len(signs), dim=0)
    residuals = signs.repeat(len(x), 1)
    with torch.no_grad():
        Y = layer(X) - residuals
    return InfluenceModel(layer, squared), (X, Y)


@pytest.mark.parametrize("solver", [KFACIHVP, EKFACIHVP])
def test_kfac_is_exact_where_the_factorisation_is(solver) -> None:
    model, train = exact_case()
    damping = 1e-3
    V = torch.randn(model.num_parameters, 4, dtype=torch.float64)
    exact = ExactIHVP(damping=damping).fit(model, train).solve(V)
    factored = solver(damping=damping, fisher="empirical").fit(model, train)
    gap = float((factored.solve(V) - exact).abs().max() / exact.abs().max())
    assert gap < 1e-10, gap
    hessian = model.hessian(train) + damping * torch.eye(model.num_parameters, dtype=torch.float64)
    applied = factored.damped_hvp(V)
    assert float((applied - hessian @ V).abs().max() / (hessian @ V).abs().max()) < 1e-10


def test_an_inexact_case_is_inexact_for_kfac_but_not_for_ekfac_s_diagonal() -> None:
    """Off the exact case (random targets) K-FAC and EK-FAC differ from the Hessian and each other.

    EK-FAC's Λ is the best diagonal in K-FAC's eigenbasis: its Frobenius error
    against the empirical Fisher is never larger than K-FAC's.
    """
    model, (X, _) = exact_case()
    Y = torch.randn(len(X), C, dtype=torch.float64)
    train = (X, Y)
    grads = model.per_sample_grads(train)
    fisher = grads.T @ grads / len(X)
    d = model.num_parameters
    eye = torch.eye(d, dtype=torch.float64)
    errors = {}
    for solver in (KFACIHVP, EKFACIHVP):
        fitted = solver(damping=0.0, fisher="empirical").fit(model, train)
        errors[solver.__name__] = float(torch.linalg.norm(fitted.damped_hvp(eye) - fisher))
    assert errors["EKFACIHVP"] <= errors["KFACIHVP"] * (1 + 1e-12)
    assert errors["KFACIHVP"] > 1e-3 * float(torch.linalg.norm(fisher))  # really inexact here


def test_layer_statistics_rebuild_the_per_sample_gradients_of_a_conv_net() -> None:
    torch.manual_seed(1)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1, stride=2),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(27, 4),
    ).double()
    model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"))
    batch = (torch.randn(7, 2, 6, 6, dtype=torch.float64), torch.randint(0, 4, (7,)))
    flat = model.per_sample_grads(batch)
    rebuilt = per_sample_grads_from_layers(model, batch)
    assert float((rebuilt - flat).abs().max() / flat.abs().max()) < 1e-13


def test_ekfac_plugs_into_the_calculators_and_saves_without_pickle(tmp_path) -> None:
    model, train = exact_case()
    test = (train[0][:3], train[1][:3])
    exact = FirstOrderInfluenceCalculator(model, ExactIHVP(damping=1e-3)).fit(train)
    ekfac = FirstOrderInfluenceCalculator(model, EKFACIHVP(damping=1e-3, fisher="empirical")).fit(
        train
    )
    expected = exact.influence(test)
    assert float((ekfac.influence(test) - expected).abs().max() / expected.abs().max()) < 1e-10
    assert float((ekfac.self_influence() - exact.self_influence()).abs().max()) < 1e-8
    ekfac.ihvp.save(tmp_path / "ekfac")
    loaded = EKFACIHVP.load(tmp_path / "ekfac", model, train)
    V = torch.randn(model.num_parameters, 2, dtype=torch.float64)
    assert torch.equal(loaded.solve(V), ekfac.ihvp.solve(V))


def test_the_true_fisher_is_seeded_and_the_damping_is_fixed_or_relative_to_the_mean() -> None:
    torch.manual_seed(2)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()
    model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"))
    train = (torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,)))
    one, two = (EKFACIHVP(seed=5).fit(model, train) for _ in range(2))
    other = EKFACIHVP(seed=6).fit(model, train)
    V = torch.randn(model.num_parameters, 2, dtype=torch.float64)
    assert torch.equal(one.solve(V), two.solve(V))
    assert not torch.equal(one.solve(V), other.solve(V))
    assert one.layer_damping_ == [FACTORED_DAMPING] * 2 and FACTORED_DAMPING == 1e-3
    # damping=None: kronfluence's rule, c × each layer's mean eigenvalue (c = 0.1 unless set).
    for c in (0.1, 0.01):
        relative = EKFACIHVP(damping=None, relative_damping=c, seed=5).fit(model, train)
        for values, damping in zip(relative.eigenvalues_, relative.layer_damping_, strict=True):
            assert damping == pytest.approx(c * float(values.mean()), rel=1e-12)
        assert relative.get_params()["relative_damping"] == c  # a saved fit says which rule
    assert "relative_damping" not in one.get_params()
    with pytest.raises(ValueError, match="relative_damping must be a finite number > 0"):
        EKFACIHVP(damping=None, relative_damping=0.0)


def test_a_parameter_outside_the_supported_layers_is_named_with_why() -> None:
    """A BatchNorm normalising by the batch: its samples' gradients are not their own."""
    net = torch.nn.Sequential(
        torch.nn.BatchNorm2d(2, track_running_stats=False),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 3),
    ).double()
    model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"))
    train = (torch.randn(8, 2, 2, 2, dtype=torch.float64), torch.randint(0, 3, (8,)))
    with pytest.raises(
        ValueError,
        match=r"\['0.weight', '0.bias'\] belong to no layer .*0.weight: a BatchNorm2d without",
    ):
        KFACIHVP().fit(model, train)


def test_the_exactness_check_catches_wrong_factors_and_a_wrong_correction(monkeypatch) -> None:
    """Mutants: factors off by a scale (K-FAC), the corrected eigenvalues off by one (EK-FAC)."""
    from influence_core.ihvp import kfac

    model, train = exact_case()
    V = torch.randn(model.num_parameters, 2, dtype=torch.float64)
    exact = ExactIHVP(damping=1e-3).fit(model, train).solve(V)

    def gap(solver) -> float:
        fitted = solver(damping=1e-3, fisher="empirical").fit(model, train)
        return float((fitted.solve(V) - exact).abs().max() / exact.abs().max())

    eigh, squares = kfac._eigh, kfac._summed_rotated_squares
    with monkeypatch.context() as patch:  # S summed instead of averaged, say: a scale error
        patch.setattr(kfac, "_eigh", lambda m: (lambda v, q, j: (2 * v, q, j))(*eigh(m)))
        assert gap(KFACIHVP) > 0.1
    with monkeypatch.context() as patch:  # a sample's gradient mis-scaled in the correction pass
        patch.setattr(kfac, "_summed_rotated_squares", lambda *a: 1.5**2 * squares(*a))
        assert gap(EKFACIHVP) > 0.1
    assert gap(KFACIHVP) < 1e-10 and gap(EKFACIHVP) < 1e-10


@pytest.mark.parametrize("spec_name", ["mlp_tanh", "convnet"])
@pytest.mark.parametrize("fisher", ["true", "empirical"])
def test_ekfac_and_kfac_agree_across_backends(spec_name: str, fisher: str) -> None:
    """Same weights, same seed: the same scores in torch and TensorFlow (float64)."""
    from influence_conformance.cases import build_case

    results = {}
    for backend in ("torch", "tensorflow"):
        case = build_case(backend, spec_name, "float64")
        model, test = case.model, (case.X[:4], case.y[:4])
        for solver in (KFACIHVP, EKFACIHVP):
            calc = FirstOrderInfluenceCalculator(model, solver(fisher=fisher, seed=3))
            calc.fit(case.data)
            results[backend, solver.__name__] = (
                model.to_numpy(calc.influence(test)),
                model.to_numpy(calc.self_influence()),
            )
    for name in ("KFACIHVP", "EKFACIHVP"):
        for got, expected in zip(results["tensorflow", name], results["torch", name], strict=True):
            gap = float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))
            assert gap < 1e-8, (name, gap)


@pytest.mark.parametrize("normalize", [False, True])
def test_the_layer_wise_training_side_equals_the_gradient_one(normalize: bool) -> None:
    """Scores, self-influence and RelatIF from layer statistics = from per-sample gradients."""
    from influence_conformance.cases import build_case
    from influence_core.ihvp.base import InverseHessianVectorProduct

    case = build_case("torch", "convnet", "float64")
    model, test = case.model, (case.X[:3], case.y[:3])
    layerwise = FirstOrderInfluenceCalculator(model, EKFACIHVP(seed=1), normalize=normalize)
    layerwise.fit(case.data)

    class ThroughGradients(EKFACIHVP):
        training_side = InverseHessianVectorProduct.training_side

    gradients = FirstOrderInfluenceCalculator(model, ThroughGradients(seed=1), normalize=normalize)
    gradients.fit(case.data)
    for a, b in zip(
        layerwise.influence_and_self_influence(test),
        gradients.influence_and_self_influence(test),
        strict=True,
    ):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-12


def test_a_dense_layer_over_positions_takes_the_general_path() -> None:
    """A Linear applied to every position of a sequence (T > 1): G is formed, same numbers."""
    from influence_core.ihvp.base import InverseHessianVectorProduct

    torch.manual_seed(4)
    net = torch.nn.Sequential(
        torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(18, 3)
    ).double()
    model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=7)
    train = (torch.randn(20, 3, 5, dtype=torch.float64), torch.randint(0, 3, (20,)))
    test = (train[0][:4], train[1][:4])
    assert (
        float(
            (per_sample_grads_from_layers(model, test) - model.per_sample_grads(test)).abs().max()
        )
        < 1e-14
    )

    class ThroughGradients(EKFACIHVP):
        training_side = InverseHessianVectorProduct.training_side

    layerwise = FirstOrderInfluenceCalculator(model, EKFACIHVP(), normalize=True).fit(train)
    gradients = FirstOrderInfluenceCalculator(model, ThroughGradients(), normalize=True).fit(train)
    for a, b in zip(
        layerwise.influence_and_self_influence(test),
        gradients.influence_and_self_influence(test),
        strict=True,
    ):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-12


def test_an_eigendecomposition_that_does_not_converge_is_retried_with_jitter(monkeypatch) -> None:
    """LAPACK failing on a factor (kronfluence's EK-FAC died so once) costs a jittered retry, not the run."""
    model, train = exact_case()
    reference = EKFACIHVP(damping=1e-3, fisher="empirical").fit(model, train)
    eigh, calls = np.linalg.eigh, {"n": 0}

    def flaky(matrix):
        calls["n"] += 1
        if calls["n"] == 1:
            raise np.linalg.LinAlgError("Eigenvalues did not converge")
        return eigh(matrix)

    monkeypatch.setattr(np.linalg, "eigh", flaky)
    retried = EKFACIHVP(damping=1e-3, fisher="empirical").fit(model, train)
    assert calls["n"] >= 2 and max(retried.jitter_) > 0.0 and reference.jitter_ == [0.0]
    V = torch.randn(model.num_parameters, 2, dtype=torch.float64)
    gap = float(
        (retried.solve(V) - reference.solve(V)).abs().max() / reference.solve(V).abs().max()
    )
    assert gap < 1e-6  # the jitter (1e-12 of the mean eigenvalue) is removed from the eigenvalues


def tanh_mlp(seed: int) -> InfluenceModel:
    """A float64 4-6-3 tanh MLP in batches of 8, its weights drawn after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()
    return InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=8)


def test_nan_in_the_layer_statistics_names_the_samples() -> None:
    """At the fit (the factors) and when scoring (a training side): the sample index, not a NaN score."""
    from influence_core import NonFiniteGradientError

    model = tanh_mlp(seed=5)
    X, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    broken = X.clone()
    broken[13, 2] = float("nan")
    with pytest.raises(NonFiniteGradientError) as error:
        EKFACIHVP(fisher="empirical").fit(model, (broken, y))
    assert error.value.sample_indices == (13,)
    calc = FirstOrderInfluenceCalculator(model, EKFACIHVP(fisher="empirical")).fit((X, y))
    with pytest.raises(NonFiniteGradientError) as error:
        calc.self_influence((broken, y))
    assert error.value.sample_indices == (13,)
    # Pairwise scores: a training side's statistics are not scanned; its per-layer products are.
    with pytest.raises(NonFiniteGradientError) as error:
        calc.influence((X[:3], y[:3]), (broken, y))
    assert error.value.sample_indices == (13,)


def test_finite_statistics_whose_factor_sums_overflow_are_told_apart_from_nan_data() -> None:
    """The fit checks each pass's sums, not every batch: sums that overflow name no sample."""
    net = torch.nn.Linear(4, 3)
    with torch.no_grad():
        net.weight.zero_()  # finite outputs and gradients; the inputs' squares overflow float32
    model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=8)
    X, y = torch.full((16, 4), 1e20), torch.randint(0, 3, (16,))
    with pytest.raises(FloatingPointError, match=r"overflowed in torch.float32 .* use float64"):
        KFACIHVP().fit(model, (X, y))


def test_nan_in_a_shuffled_loader_is_named_by_its_dataset_index() -> None:
    """The fit checks its sums, then reads the data again to name the sample: a shuffling
    DataLoader gives another order on that pass, and the index is still the dataset's."""
    from torch.utils.data import DataLoader, TensorDataset

    from influence_core import NonFiniteGradientError

    model = tanh_mlp(seed=0)
    X, y = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,))
    X[13, 2] = float("nan")
    loader = DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True)
    for solver in (KFACIHVP, EKFACIHVP):
        with pytest.raises(NonFiniteGradientError) as error:
            solver(fisher="empirical").fit(model, loader)
        assert error.value.sample_indices == (13,)


def test_nan_in_data_read_once_is_named_as_it_is_read() -> None:
    """A generator cannot be read again to name the samples: it is scanned batch by batch."""
    from influence_core import NonFiniteGradientError

    net = torch.nn.Linear(4, 3)
    model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=8)
    X, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    X[5, 1] = float("nan")
    once = ((X[i : i + 8], y[i : i + 8]) for i in range(0, 16, 8))
    with pytest.raises(NonFiniteGradientError) as error:
        KFACIHVP().fit(model, once)
    assert error.value.sample_indices == (5,)


def test_the_true_fisher_refuses_floating_targets() -> None:
    model, train = exact_case()  # squared loss, floating targets
    with pytest.raises(ValueError, match="for other targets use fisher='empirical'"):
        KFACIHVP().fit(model, train)


def test_a_backend_whose_layer_description_disagrees_with_its_parameters_is_refused() -> None:
    """covering_layers checks each layer's p_in x p_out against its kernel's size."""
    import dataclasses

    from influence_torch.model import TorchKernels

    class WrongWidth(TorchKernels):
        def layers(self):
            return tuple(dataclasses.replace(x, inputs=x.inputs + 1) for x in super().layers())

    model, train = exact_case()
    model.kernels = WrongWidth(model.model, model.loss_fn, None)
    with pytest.raises(ValueError, match=r"describes layer .* as 4 x 2, but its kernel"):
        KFACIHVP(fisher="empirical").fit(model, train)


def test_an_unknown_curvature_is_refused() -> None:
    model, train = exact_case()
    with pytest.raises(ValueError, match="curvature must be 'hessian' or 'ggn'"):
        ExactIHVP(curvature="fisher")
    with pytest.raises(ValueError, match="curvature must be 'hessian' or 'ggn'"):
        model.curvature_vp(train, torch.ones(model.num_parameters), "fisher")


def test_a_wide_convolution_rotates_its_statistics_before_forming_the_gradient() -> None:
    """T (p² + o²) < p² o + p o²: Q_Aᵀ G Q_S = Σ_t (Q_Aᵀ ã_t)(Q_Sᵀ g_t)ᵀ, same as rotating G."""
    from influence_core.ihvp import kfac
    from influence_core.layerwise import covering_layers, layer_gradient_matrices

    torch.manual_seed(5)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(16, 32, 3), torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(128, 3)
    ).double()
    model = InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"))
    x, y = torch.randn(6, 16, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    stats = model.kernels.layer_statistics(x, y)
    block = covering_layers(model)[0]
    T, p, o = int(stats[block.layer.name][0].shape[1]), block.rows, block.layer.outputs
    assert T * (p * p + o * o) < p * p * o + p * o * o  # the rotate-first order is taken
    qa = torch.linalg.qr(torch.randn(p, p, dtype=torch.float64))[0]
    qs = torch.linalg.qr(torch.randn(o, o, dtype=torch.float64))[0]
    (G,) = layer_gradient_matrices(model.xp, [block], stats)
    expected = qa.T @ G @ qs
    got = kfac._rotated_matrices(model.xp, block, stats, qa, qs)
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-13


def test_host_decompositions_keep_to_the_framework_s_thread_count(monkeypatch) -> None:
    """NumPy's BLAS runs K-FAC's eigendecompositions with torch's thread count, not its own."""
    from threadpoolctl import threadpool_info, threadpool_limits

    seen = []
    original = np.linalg.eigh

    def recording(matrix):
        seen.append(max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"))
        return original(matrix)

    monkeypatch.setattr(np.linalg, "eigh", recording)
    model, train = exact_case()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with threadpool_limits(limits=4, user_api="blas"):  # NumPy's BLAS left at 4
            KFACIHVP(damping=1e-3, fisher="empirical").fit(model, train)
            outside = max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
    finally:
        torch.set_num_threads(threads)
    assert seen and set(seen) == {1}, seen
    assert outside == 4  # restored after the fit


@pytest.mark.parametrize("framework", ["numpy", "torch", "tensorflow"])
def test_the_gram_in_strips_equals_the_whole_product(framework: str) -> None:
    """K-FAC's factors aᵀa from upper strips and their mirrors = one product, at and around the split."""
    import influence_core
    from influence_core.ihvp.kfac import _GRAM_SPLIT_WIDTH, _factor, _gram_strips

    rng = np.random.default_rng(3)
    native = {
        "numpy": lambda x: x,
        "torch": torch.from_numpy,
        "tensorflow": lambda x: __import__("tensorflow").constant(x),
    }[framework]
    for width in (_GRAM_SPLIT_WIDTH - 1, _GRAM_SPLIT_WIDTH, _GRAM_SPLIT_WIDTH + 3, 1025):
        a = rng.normal(size=(40, width))
        xp = influence_core.array_namespace(native(a))
        sums = {f"a.0.{i}": strip for i, strip in enumerate(_gram_strips(xp, native(a)))}
        got = _factor(sums, "a.0", np.asarray)
        np.testing.assert_allclose(got, a.T @ a, rtol=1e-12, atol=1e-10)
        # With a bias: the [ã, 1] factor, its row and column joined on the host.
        sums.update({"a.0.sum": xp.sum(native(a), axis=0), "positions.0": 40})
        with_ones = np.concatenate([a, np.ones((40, 1))], axis=1)
        got = _factor(sums, "a.0", np.asarray)
        np.testing.assert_allclose(got, with_ones.T @ with_ones, rtol=1e-12, atol=1e-10)
