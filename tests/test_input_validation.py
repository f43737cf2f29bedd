"""Bad input gets a clear error naming the fix: faults 6-9 of the trustworthy-results issue."""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
import pytest
import torch

from influence_core import (
    ArnoldiIHVP,
    ConjugateGradientIHVP,
    EmptyDataError,
    ExactIHVP,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
    InvalidSampleError,
    LissaIHVP,
    NonFiniteGradientError,
    PerSampleLossError,
    PrecisionWarning,
    RepresenterPointL2,
    TracIn,
)
from influence_core.io import parameter_fingerprint


def torch_model(dtype=torch.float64, out=3, **layers):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, out))
    return net.to(dtype)


def keras_model(dtype="float64"):
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh", dtype=dtype),
            keras.layers.Dense(3, dtype=dtype),
        ]
    )


CE = torch.nn.CrossEntropyLoss(reduction="none")


def model_of(backend: str, **settings) -> InfluenceModel:
    """A float64 4-8-3 MLP classifier in ``backend``, with its per-sample cross-entropy."""
    if backend == "torch":
        return InfluenceModel(torch_model(), CE, **settings)
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None, dtype="float64"
    )
    return InfluenceModel(keras_model(), loss, **settings)


X = np.random.default_rng(0).normal(size=(12, 4))
Y = np.arange(12) % 3


# -- fault 6: empty data ------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_fault6_empty_data_is_an_error_not_zeros(backend: str) -> None:
    model = model_of(backend)
    empty = (X[:0], Y[:0])
    for call in (model.loss_grad, model.hessian, model.per_sample_grads, model.per_sample_loss):
        with pytest.raises(EmptyDataError, match="no samples"):
            call(empty)
    calc = FirstOrderInfluenceCalculator(model, ExactIHVP(damping=10.0)).fit((X, Y))
    with pytest.raises(EmptyDataError):
        calc.influence((X[:2], Y[:2]), empty)
    with pytest.raises(EmptyDataError):
        FirstOrderInfluenceCalculator(model, ExactIHVP()).fit(empty)


# -- fault 7: settings that cannot work ----------------------------------------------------
@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: ConjugateGradientIHVP(maxiter=0), "maxiter must be an integer ≥ 1"),
        (lambda: ConjugateGradientIHVP(maxiter=-5), "maxiter"),
        (lambda: ConjugateGradientIHVP(tol=math.nan), "tol"),
        (lambda: ExactIHVP(damping=math.nan), "damping must be a finite number"),
        (lambda: ExactIHVP(damping=math.inf), "damping must be a finite number"),
        (lambda: LissaIHVP(depth=0), "depth"),
        (lambda: LissaIHVP(scale=math.inf), "scale"),
        (lambda: ArnoldiIHVP(rank=0), "rank"),
        (lambda: ArnoldiIHVP(rank=10, iterations=5), "rank ≤ iterations"),
    ],
)
def test_fault7_impossible_solver_settings_are_refused(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("rate", [-0.1, 0.0, math.nan, math.inf])
def test_fault7_tracin_learning_rates_must_be_finite_and_positive(rate: float) -> None:
    model = InfluenceModel(torch_model(), CE)
    with pytest.raises(ValueError, match="learning rates must be finite and positive"):
        TracIn(model, [model.kernels.save_state()], rate)


# -- fault 8: a torch model left in train() mode ---------------------------------------------
def test_fault8_torch_kernels_run_in_inference_mode_and_restore_the_users_mode() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3)
    ).double()
    net.train()  # the user's mode: dropout on, batch-norm statistics of the batch
    model = InfluenceModel(net, CE)
    grads = model.to_numpy(model.per_sample_grads((X, Y)))
    assert net.training and all(m.training for m in net.modules())  # restored
    net.eval()
    expected = model.to_numpy(model.per_sample_grads((X, Y)))
    np.testing.assert_allclose(grads, expected, rtol=1e-12)
    # and the per-sample gradients average to the batch gradient, as in Keras (training=False)
    np.testing.assert_allclose(
        grads.mean(axis=0), model.to_numpy(model.loss_grad((X, Y))), rtol=1e-10, atol=1e-14
    )


# -- fault 9: the right diagnosis -----------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_fault9_nan_inputs_to_representers_name_the_sample(backend: str) -> None:
    bad = X.copy()
    bad[5, 2] = np.nan
    model = model_of(backend)
    with pytest.raises(NonFiniteGradientError, match=r"outputs for the sample\(s\) at index \[5\]"):
        RepresenterPointL2(model).fit((bad, Y))


def test_fault9_a_b_by_1_loss_is_told_to_squeeze() -> None:
    model = InfluenceModel(torch_model(out=1), torch.nn.BCEWithLogitsLoss(reduction="none"))
    with pytest.raises(PerSampleLossError, match="squeeze it") as info:
        model.loss_grad((X, (Y[:, None] > 0).astype(np.float64)))
    assert "without reduction" not in str(info.value)


def test_fault9_precision_warning_only_when_precision_is_lost() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        loss64 = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=None, dtype="float64"
        )
        InfluenceModel(keras_model("float32"), loss64).loss_grad((X.astype("float32"), Y))
    loss32 = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    with pytest.warns(PrecisionWarning, match="lose precision"):
        InfluenceModel(keras_model("float64"), loss32).loss_grad((X, Y))


def test_fault9_a_loss_given_by_name_is_refused_with_advice() -> None:
    with pytest.raises(TypeError, match=r"reduction=None"):
        InfluenceModel(keras_model(), "sparse_categorical_crossentropy")


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_fault9_an_out_of_range_label_names_the_sample(backend: str) -> None:
    labels = Y.copy()
    labels[9] = 7  # three classes
    model = model_of(backend, batch_size=4)
    with pytest.raises(InvalidSampleError, match=r"index \[9\]"):
        model.loss_grad((X, labels))
    with pytest.raises(InvalidSampleError, match=r"index \[9\]"):
        model.per_sample_grads((X, labels))


def test_fault9_a_bfloat16_model_reports_nan_samples_and_saves_fingerprints() -> None:
    model = InfluenceModel(torch_model(torch.bfloat16), CE)
    bad = X.copy()
    bad[3, 0] = np.nan
    with pytest.raises(NonFiniteGradientError, match=r"index \[3\]"):
        model.loss_grad((bad, Y))
    assert len(parameter_fingerprint(model)) == 64
