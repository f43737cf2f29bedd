"""Errors whose advice must be true: faults 6-11 of "No silent wrong number, round three".

Each test failed on the main it was written against: a damping suggestion no
larger than the one in use, NaN weights blamed on the data, ``damping=nan``,
a frozen layer called unknown, a one-output margin blamed on the data, and a
residual printed as equal to the tolerance it exceeds.
"""

from __future__ import annotations

import re
import warnings

import keras
import numpy as np
import pytest
import torch

from influence_core import (
    TRAK,
    ConjugateGradientIHVP,
    ExactIHVP,
    InfluenceModel,
    LissaIHVP,
    NonFiniteGradientError,
    NotPositiveDefiniteError,
)
from influence_core.errors import (
    ConvergenceWarning,
    FrozenParameterError,
    MeasurementError,
    UnknownParameterError,
    format_above,
)

rng = np.random.default_rng(0)
X = rng.normal(size=(40, 4))
Y = rng.integers(0, 3, size=40)
CE = torch.nn.CrossEntropyLoss(reduction="none")


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()


def suggested_damping(error: BaseException) -> float:
    return float(re.search(r"damping=([0-9.e+-]+)\)", str(error)).group(1))


# -- fault 6: the damping an indefinite Hessian needs -----------------------------------------
def test_the_suggested_damping_is_above_the_one_in_use_and_makes_the_hessian_definite() -> None:
    model = InfluenceModel(mlp(), CE)  # random weights, all parameters: an indefinite Hessian
    H = model.to_numpy(model.hessian((X, Y)))
    smallest = float(np.linalg.eigvalsh(0.5 * (H + H.T)).min())
    assert smallest < -1e-3
    damping = -smallest - 1e-9  # just too little: H + λI has an eigenvalue of -1e-9
    with pytest.raises(NotPositiveDefiniteError) as info:
        ExactIHVP(damping=damping).fit(model, (X, Y))
    message = str(info.value)
    assert "curvature='ggn'" in message and "EKFACIHVP" in message
    assert info.value.smallest_eigenvalue == pytest.approx(smallest, rel=1e-6)
    suggestion = suggested_damping(info.value)
    assert suggestion > damping
    ExactIHVP(damping=suggestion).fit(model, (X, Y))  # the advice works


def test_conjugate_gradient_on_a_non_convex_model_suggests_more_damping_and_the_alternatives() -> (
    None
):
    model = InfluenceModel(mlp(), CE)
    solver = ConjugateGradientIHVP(damping=2.0e-4, curvature="hessian").fit(model, (X, Y))
    with pytest.raises(NotPositiveDefiniteError, match="curvature='ggn'") as info:
        solver.solve(np.eye(model.num_parameters)[:, :3])
    assert suggested_damping(info.value) > 2.0e-4
    assert info.value.smallest_eigenvalue < 0


# -- fault 7: NaN in a weight ----------------------------------------------------------------------
def test_a_nan_weight_is_named_instead_of_blaming_every_sample() -> None:
    net = mlp()
    with torch.no_grad():
        net[0].weight[0, 0] = float("nan")  # an unselected weight
    model = InfluenceModel(net, CE, parameters=["2"])
    with pytest.raises(NonFiniteGradientError, match=r"weights \['0.weight'\] hold NaN") as info:
        model.per_sample_grads((X, Y))
    assert info.value.parameters == ("0.weight",)
    assert "inputs and targets" not in str(info.value)


def test_a_nan_weight_in_theta_is_named_in_keras() -> None:
    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, dtype="float64", name="head")])
    kernel = net.layers[0].kernel
    kernel.assign(np.where(np.eye(4, 3) > 0, np.nan, kernel.numpy()))
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None, dtype="float64"
    )
    model = InfluenceModel(net, loss)
    with pytest.raises(NonFiniteGradientError, match="hold NaN or infinity themselves") as info:
        model.loss_grad((X, Y))
    assert any("head" in name and "kernel" in name for name in info.value.parameters)


# -- fault 8: no damping=nan -----------------------------------------------------------------------
def mlp_of(backend: str, **settings) -> InfluenceModel:
    if backend == "torch":
        return InfluenceModel(mlp(), CE, **settings)
    keras.utils.set_random_seed(0)
    net = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, "tanh", dtype="float64"),
            keras.layers.Dense(3, dtype="float64"),
        ]
    )
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None, dtype="float64"
    )
    return InfluenceModel(net, loss, **settings)


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])  # TF's eigh raises on NaN
def test_nan_data_with_checks_off_is_reported_as_non_finite_curvature_not_as_damping_nan(
    backend: str,
) -> None:
    model = mlp_of(backend, check_finite=False)
    bad = X.copy()
    bad[3, 1] = np.nan
    with pytest.raises(NotPositiveDefiniteError, match="non-finite") as info:
        ExactIHVP(damping=1.0).fit(model, (bad, Y))
    assert "damping=nan" not in str(info.value)
    solver = ConjugateGradientIHVP(damping=1.0).fit(model, (bad, Y))
    with pytest.raises(NotPositiveDefiniteError, match="NaN or infinity") as info:
        solver.solve(np.ones(model.num_parameters))
    assert "damping=nan" not in str(info.value)


# -- fault 9: a frozen layer -----------------------------------------------------------------------
def test_selecting_a_frozen_layer_says_it_is_frozen() -> None:
    net = mlp()
    net[0].requires_grad_(False)
    with pytest.raises(FrozenParameterError, match=r"\['0'\] is frozen") as info:
        InfluenceModel(net, CE, parameters=["0"])
    assert isinstance(info.value, UnknownParameterError)  # old handlers still catch it
    with pytest.raises(UnknownParameterError, match="unknown layer") as unknown:
        InfluenceModel(net, CE, parameters=["7"])
    assert not isinstance(unknown.value, FrozenParameterError)


def test_selecting_a_frozen_keras_layer_says_it_is_frozen() -> None:
    net = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, dtype="float64", name="body"),
            keras.layers.Dense(3, dtype="float64", name="head"),
        ]
    )
    net.get_layer("body").trainable = False
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    with pytest.raises(FrozenParameterError, match="frozen"):
        InfluenceModel(net, loss, parameters=["body"])


# -- fault 10: TRAK's margin on a regression model ----------------------------------------------------
def test_the_margin_of_a_one_output_model_says_it_needs_a_classifier() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 1)).double()

    def squared_error(outputs, targets):
        return ((outputs - targets) ** 2).reshape(-1)

    model = InfluenceModel(net, squared_error)
    data = (X, rng.normal(size=(40, 1)))
    with pytest.raises(
        MeasurementError, match=r"needs a classifier's outputs.*returns 1 per sample"
    ):
        TRAK(model, projection_dim=4).fit(data)


# -- fault 11: a residual printed so that it is visibly above the tolerance ---------------------------
def test_a_residual_is_printed_with_the_digits_that_show_it_exceeds_the_tolerance() -> None:
    assert format_above(0.1017, 0.1) == "0.102"
    assert float(format_above(0.1000004, 0.1)) > 0.1
    model = InfluenceModel(mlp(), CE, parameters=["2"])
    solver = LissaIHVP(damping=0.1, scale=10.0, depth=3, batch_size=40).fit(model, (X, Y))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        solver.solve(np.ones(model.num_parameters))
    text = next(str(w.message) for w in caught if issubclass(w.category, ConvergenceWarning))
    printed, tol = re.search(r"is ([0-9.e+-]+) > tol=([0-9.e+-]*[0-9])", text).groups()
    assert float(printed) > float(tol)
