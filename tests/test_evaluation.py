"""influence_core.evaluation on the convex digits problem, where retraining is exact and cheap.

The streamed predictions equal −(membership @ τᵀ) from the full score matrix;
the actual values equal the hand-computed loss at the retrained θ; exact
influence scores a high LDS and LOO correlation, and the same scores negated
score exactly the opposite (a metric that can fail); mislabel detection
agrees with scikit-learn's AUC.
"""

from __future__ import annotations

import numpy as np
import pytest
from digits_problem import MU, N_TRAIN, digits_model, fit, loss_at, problem
from sklearn.metrics import roc_auc_score

from influence_core import ExactIHVP, FirstOrderInfluenceCalculator, load_result
from influence_core.evaluation import (
    LDSResult,
    counterfactual_removal,
    linear_datamodeling_score,
    loo_correlation,
    mislabel_detection,
    select,
)


@pytest.fixture(scope="module")
def setting():
    p = problem()
    model = digits_model("torch")
    calc = FirstOrderInfluenceCalculator(model, ExactIHVP(damping=MU)).fit((p["X"], p["y"]))
    thetas: dict[tuple[int, ...], np.ndarray] = {}

    def theta_for(indices: np.ndarray) -> np.ndarray:
        key = tuple(int(i) for i in indices)
        if key not in thetas:
            thetas[key] = fit(p["X"][indices], p["y"][indices], p["theta"])
        return thetas[key]

    def retrain(indices: np.ndarray) -> dict:
        import torch

        theta = theta_for(indices)
        return {
            "layer0.weight": torch.tensor(theta[:640].reshape(64, 10).T.copy()),
            "layer0.bias": torch.tensor(theta[640:]),
        }

    return p, model, calc, retrain, theta_for


def test_lds_of_exact_influence_is_high_and_its_negation_is_its_opposite(setting) -> None:
    p, model, calc, retrain, theta_for = setting
    test = (p["X_test"], p["y_test"])
    result = linear_datamodeling_score(calc, retrain, test, subsets=12, fraction=0.9, seed=3)
    # The predictions are −Σ_{i∈S} τ, streamed; against the whole score matrix.
    scores = model.to_numpy(calc.influence(test))
    membership = np.zeros((12, N_TRAIN))
    np.put_along_axis(membership, result.subsets, 1.0, axis=1)
    np.testing.assert_allclose(result.predicted, -(membership @ scores.T), rtol=1e-10)
    # The actual values are the test losses at the retrained θ, by hand.
    for j, subset in enumerate(result.subsets):
        expected = loss_at(theta_for(subset), p["X_test"], p["y_test"])
        np.testing.assert_allclose(result.actual[j], expected, rtol=1e-10)
    assert result.subsets.shape == (12, 900)
    assert result.score > 0.8, result  # exact influence on a convex model
    assert 0 < result.interval < 0.5
    assert model.model.layer0.weight.shape == (10, 64)  # the model's weights are back

    class Negated(FirstOrderInfluenceCalculator):
        def _scores_from_prepared(self, prepared, train_data):
            for start, block in super()._scores_from_prepared(prepared, train_data):
                yield start, -block

    negated = Negated(model, ExactIHVP(damping=MU)).fit((p["X"], p["y"]))
    flipped = linear_datamodeling_score(negated, retrain, test, subsets=12, fraction=0.9, seed=3)
    np.testing.assert_allclose(flipped.per_test, -result.per_test, atol=1e-12)


def test_lds_subsets_are_seeded_and_can_be_given(setting) -> None:
    p, _, calc, retrain, _ = setting
    test = (p["X_test"], p["y_test"])
    a = linear_datamodeling_score(calc, retrain, test, subsets=3, fraction=0.95, seed=1)
    b = linear_datamodeling_score(calc, retrain, test, subsets=a.subsets)
    np.testing.assert_array_equal(a.subsets, b.subsets)
    np.testing.assert_allclose(a.per_test, b.per_test)
    with pytest.raises(ValueError, match="subsets"):
        linear_datamodeling_score(calc, retrain, test, subsets=[[0, N_TRAIN]])
    with pytest.raises(ValueError, match="fraction"):
        linear_datamodeling_score(calc, retrain, test, subsets=3, fraction=1.0)


def test_earlier_results_reuse_their_retrainings_and_arrays_score_by_the_same_protocol(
    setting,
) -> None:
    p, model, calc, retrain, _ = setting
    test = (p["X_test"], p["y_test"])
    first = linear_datamodeling_score(calc, retrain, test, subsets=4, fraction=0.9, seed=5)

    def no_retraining(indices):
        raise AssertionError("retrained again")

    again = linear_datamodeling_score(calc, first, test)
    np.testing.assert_array_equal(again.per_test, first.per_test)
    scores = model.to_numpy(calc.influence(test))
    external = linear_datamodeling_score(scores, first)
    np.testing.assert_allclose(external.per_test, first.per_test, atol=1e-12)
    np.testing.assert_allclose(external.predicted, first.predicted, rtol=1e-10)
    # Another library's scores that are wrong (reversed) score the opposite.
    np.testing.assert_allclose(linear_datamodeling_score(-scores, first).per_test, -first.per_test)
    with pytest.raises(TypeError, match="earlier"):
        linear_datamodeling_score(scores, no_retraining, test)
    with pytest.raises(ValueError, match="n_test"):
        linear_datamodeling_score(scores[:2], first)
    with pytest.raises(ValueError, match="NaN"):
        linear_datamodeling_score(np.where(scores > 0, np.nan, scores), first)
    elsewhere = LDSResult.from_retrained(first.subsets, first.actual)
    np.testing.assert_array_equal(
        linear_datamodeling_score(scores, elsewhere).per_test, external.per_test
    )
    with pytest.raises(ValueError, match="m ≥ 2"):
        LDSResult.from_retrained(first.subsets[:1], first.actual[:1])
    loo = loo_correlation(calc, retrain, test, [1, 2, 3])
    reused = loo_correlation(scores, loo)
    np.testing.assert_allclose(reused.predicted, loo.predicted, rtol=1e-10)
    assert reused.pearson == pytest.approx(loo.pearson, abs=1e-12)


def test_loo_correlation_of_exact_influence(setting, tmp_path) -> None:
    p, model, calc, retrain, _ = setting
    test = (p["X_test"], p["y_test"])
    scores = model.to_numpy(calc.influence(test))
    top = [int(i) for i in np.argsort(-np.abs(scores[0]), kind="stable") if i not in (0, 250)]
    removed = np.array([*top[:6], 0, 250])  # and the first points of two batches of 250
    result = loo_correlation(calc, retrain, test, removed)
    np.testing.assert_allclose(result.predicted, scores[:, removed].T / N_TRAIN, rtol=1e-10)
    assert result.actual.shape == (8, 3)
    assert result.pearson > 0.98, result
    saved = load_result(result.save(tmp_path / "loo"), model=model, data={"test": test})
    np.testing.assert_array_equal(saved.arrays["removed"], removed)
    assert saved.metadata["method"] == "loo_correlation"
    assert saved.metadata["parameters"]["pearson"] == result.pearson


def test_mislabel_detection_against_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    flipped = rng.random(200) < 0.1
    scores = rng.normal(size=200) + 2.0 * flipped
    scores[:20] = scores[0]  # ties count half in the AUC
    result = mislabel_detection(scores, flipped)
    assert result.auc == pytest.approx(roc_auc_score(flipped, scores), abs=1e-12)
    order = np.argsort(-scores, kind="stable")
    k = 30
    assert result.found_at(k / 200) == pytest.approx(flipped[order[:k]].sum() / flipped.sum())
    assert result.found[0] == 0 and result.found[-1] == 1
    perfect = mislabel_detection(flipped.astype(float), np.flatnonzero(flipped))
    assert perfect.auc == 1.0 and perfect.found_at(flipped.mean()) == 1.0
    assert mislabel_detection(-flipped.astype(float), flipped).auc == 0.0
    with pytest.raises(ValueError, match="some but not all"):
        mislabel_detection(scores, np.zeros(200, bool))
    bad = scores.copy()
    bad[5] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        mislabel_detection(bad, flipped)


def test_counterfactual_removal_against_retraining_by_hand_and_negated(setting) -> None:
    p, model, calc, retrain, theta_for = setting
    test = (p["X_test"], p["y_test"])
    calls = []

    def counted(indices):
        calls.append(len(indices))
        return retrain(indices)

    result = counterfactual_removal(calc, counted, test, fraction=0.02, draws=3, seed=1)
    k = 20
    assert result.removed.shape == (3, k) and result.random_removed.shape == (3, k)
    assert len(calls) == 1 + 3 + len({tuple(r) for r in result.removed.tolist()})
    # By hand: each test point's top-k proponents from the whole score matrix, retrained without.
    scores = model.to_numpy(calc.influence(test))
    expected_removed = np.sort(np.argsort(-scores, axis=1, kind="stable")[:, :k], axis=1)
    np.testing.assert_array_equal(result.removed, expected_removed)
    everything = np.arange(N_TRAIN)
    full = loss_at(theta_for(everything), p["X_test"], p["y_test"])
    np.testing.assert_allclose(result.full, full, rtol=1e-10)
    for t, row in enumerate(expected_removed):
        without = loss_at(theta_for(np.setdiff1d(everything, row)), p["X_test"], p["y_test"])
        np.testing.assert_allclose(result.top_change[t], without[t] - full[t], rtol=1e-9)
    rng = np.random.default_rng(1)
    drawn = [np.sort(rng.permutation(N_TRAIN)[:k]) for _ in range(3)]
    np.testing.assert_array_equal(result.random_removed, np.stack(drawn))
    random = np.mean(
        [loss_at(theta_for(np.setdiff1d(everything, r)), p["X_test"], p["y_test"]) for r in drawn],
        axis=0,
    )
    np.testing.assert_allclose(result.random_change, random - full, rtol=1e-9)
    assert result.score > 0 and np.all(result.top_change > result.random_change)

    class Negated(FirstOrderInfluenceCalculator):
        def _scores_from_prepared(self, prepared, train_data):
            for start, block in super()._scores_from_prepared(prepared, train_data):
                yield start, -block

    negated = Negated(model, ExactIHVP(damping=MU)).fit((p["X"], p["y"]))
    calls.clear()
    flipped = counterfactual_removal(negated, result, test, fraction=0.02)
    # Only its own removals were retrained: the all-data and random ones were reused.
    assert len(calls) == len({tuple(r) for r in flipped.removed.tolist()})
    np.testing.assert_array_equal(flipped.random_removed, result.random_removed)
    assert flipped.score < 0 < result.score
    with pytest.raises(ValueError, match="removed 20 points per retraining"):
        counterfactual_removal(negated, result, test, fraction=0.05)


def test_select_scores_a_damping_grid_on_one_set_of_retrainings(setting) -> None:
    p, model, _, retrain, _ = setting
    train, test = (p["X"], p["y"]), (p["X_test"], p["y_test"])
    calls = []

    def counted(indices):
        calls.append(len(indices))
        return retrain(indices)

    grid = {
        f"λ={d:g}": FirstOrderInfluenceCalculator(model, ExactIHVP(damping=d))
        for d in (MU, 1.0, 100.0)
    }
    chosen = select(grid, counted, train, test, subsets=10, fraction=0.9, seed=5)
    assert len(calls) == 10  # once for every candidate
    assert [c.name for c in chosen.candidates] == list(grid)
    # Each candidate's LDS is the one linear_datamodeling_score gives on those retrainings.
    for candidate, calculator in zip(chosen.candidates, grid.values(), strict=True):
        alone = linear_datamodeling_score(calculator, chosen.reference, test)
        assert candidate.score == pytest.approx(alone.score, abs=1e-12)
        assert candidate.fit_seconds > 0 and candidate.scoring_seconds > 0
    assert chosen.best == "λ=0.01"  # the damping the model was trained with
    assert "(best)" in str(chosen)
    # A configuration that cannot be solved is a row that says why, not a lost comparison:
    # the undamped softmax Hessian is singular (a constant added to every logit).
    singular = FirstOrderInfluenceCalculator(model, ExactIHVP(damping=0.0))
    with_refusal = select({**grid, "λ=0": singular}, chosen.reference, train, test)
    refused = with_refusal.candidates[-1]
    assert refused.refused.startswith("NotPositiveDefiniteError") and np.isnan(refused.score)
    assert with_refusal.best == "λ=0.01" and "refused: NotPositiveDefiniteError" in str(
        with_refusal
    )
    # Its figure: one point per candidate that gave scores, the refused one named under the axis.
    import matplotlib

    matplotlib.use("Agg")
    axis = with_refusal.plot()
    assert len(axis.containers) == len(grid) and "refused: λ=0" in axis.get_xlabel()
    with pytest.raises(ValueError, match="every candidate refused: λ=0: NotPositiveDefinite"):
        select({"λ=0": singular}, chosen.reference, train, test)
    # On a second, independent set of retrainings the choice stays within the best's interval.
    again = select(grid, retrain, train, test, subsets=10, fraction=0.9, seed=6)
    top = max(again.candidates, key=lambda c: c.score)
    picked = next(c for c in again.candidates if c.name == chosen.best)
    assert picked.score >= top.score - top.interval
    with pytest.raises(ValueError, match="another model or measurement"):
        other = digits_model("torch")
        select(
            {"a": grid["λ=0.01"], "b": FirstOrderInfluenceCalculator(other, ExactIHVP())},
            chosen.reference,
            train,
            test,
        )


def test_killed_retrainings_resume_from_their_directory(setting, tmp_path) -> None:
    """LDS and select keep each retraining's values as it finishes; a rerun retrains the rest."""
    from influence_core.errors import FingerprintMismatchError

    p, _, calc, retrain, _ = setting
    test = (p["X_test"], p["y_test"])  # its 3 test points
    expected = linear_datamodeling_score(calc, retrain, test, subsets=6, fraction=0.9, seed=7)
    calls = []

    def killed_after(limit):
        def retraining(indices):
            if len(calls) == limit:
                raise KeyboardInterrupt("killed")
            calls.append(1)
            return retrain(indices)

        return retraining

    where = tmp_path / "retrainings"
    with pytest.raises(KeyboardInterrupt):
        linear_datamodeling_score(
            calc, killed_after(4), test, subsets=6, fraction=0.9, seed=7, retrainings_dir=where
        )
    calls.clear()
    resumed = linear_datamodeling_score(
        calc, killed_after(99), test, subsets=6, fraction=0.9, seed=7, retrainings_dir=where
    )
    assert len(calls) == 2  # 4 of the 6 retrainings were saved before the kill
    np.testing.assert_allclose(resumed.actual, expected.actual, rtol=1e-12)
    assert resumed.score == pytest.approx(expected.score, abs=1e-12)
    # Other subsets (another seed), or other test points, are refused the saved values.
    with pytest.raises(FingerprintMismatchError, match="subsets_sha256"):
        linear_datamodeling_score(
            calc, retrain, test, subsets=6, fraction=0.9, seed=8, retrainings_dir=where
        )
    with pytest.raises(FingerprintMismatchError, match="'test' data"):
        linear_datamodeling_score(
            calc, retrain, (p["X_test"][:2], p["y_test"][:2]), subsets=6, fraction=0.9,
            seed=7, retrainings_dir=where,
        )  # fmt: skip
    # select reads the same directory: no retraining at all for the same subsets.
    calls.clear()
    chosen = select(
        {"exact": calc}, killed_after(0), (p["X"], p["y"]), test,
        subsets=6, fraction=0.9, seed=7, retrainings_dir=where,
    )  # fmt: skip
    np.testing.assert_allclose(chosen.reference.actual, expected.actual, rtol=1e-12)
