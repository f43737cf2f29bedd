"""How faithful is an estimator on *your* model? Leave-one-out, LDS and mislabel detection.

Every metric compares a calculator's scores with what retraining actually
does. ``retrain`` is your own training loop, in your framework::

    def retrain(indices: np.ndarray) -> Any:  # sorted training indices to train on
        ...                                   # train from your usual initialisation
        return weights                        # anything InfluenceModel.checkpoint_loaded takes

(a torch ``state_dict``, Keras weights or a saved-weights path, an nnx
state). The calculator's model is evaluated with those weights loaded (and
restored afterwards) on the test points' **loss-like measurement**: the
per-sample loss by default, −f for a measurement f that proponents raise, so
that a proponent's presence lowers it whatever the measurement.

* :func:`linear_datamodeling_score` (Park et al., TRAK, ICML 2023): random
  subsets S_j of ``fraction`` × n training points, retrained; per test point,
  the Spearman correlation over j of the additive prediction
  −Σ_{i ∈ S_j} τ(z_i, z_test) with the retrained loss-like value; the mean
  over test points and a 95 % interval (± 1.96 standard errors over test
  points).
* :func:`loo_correlation` (Koh and Liang 2017, Fig. 2): for chosen training
  points, retrained without each; Pearson and Spearman of the predicted change
  τ / n with the actual change of the loss-like value.
* :func:`counterfactual_removal`: for each test point, retrained without its
  top ``fraction`` of proponents; the change of its loss-like value against
  removing as many random points (Bergson's query-loss difference).
* :func:`select`: several configurations (a damping grid, several solvers)
  fitted and scored on one set of retrainings; their LDS, fit and scoring
  costs as a table, and the best.
* :func:`mislabel_detection`: checking training points in decreasing order
  of a score (self-influence, say), the fraction of the flipped labels found
  after each fraction of the data checked, and the ROC AUC.

**Several estimators, one set of retrainings.** Pass the result of an
earlier call as ``retrain`` to reuse its subsets (or removed points) and
its retrained values, and pass an (n_test, n_train) array of scores in
place of a calculator to evaluate another library's scores by the same
protocol::

    reference = linear_datamodeling_score(exact, retrain, test, subsets=100)
    trak = linear_datamodeling_score(TRAK(model).fit(train), reference, test)
    theirs = linear_datamodeling_score(scores_from_elsewhere, reference)

Scores are streamed: the test side is prepared once and the training data
scored in batches, each batch's scores folded into the (subsets × n_test)
predictions at once, so no (n_test, n_train) matrix is formed. Subsets are
drawn from ``numpy.random.default_rng(seed)``; retrainings run under a
progress bar; a result saves (``.save``) with the fingerprints of the model
and data through the results layer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import pearsonr, rankdata, spearmanr

from .errors import (
    CostLimitError,
    FingerprintMismatchError,
    LissaDivergenceError,
    NonFiniteGradientError,
    NotPositiveDefiniteError,
)
from .estimators.base import InfluenceCalculator
from .io import METADATA, host, load_result, save_result
from .progress import progress

__all__ = [
    "Candidate",
    "CounterfactualResult",
    "LDSResult",
    "LOOResult",
    "MislabelResult",
    "Selection",
    "counterfactual_removal",
    "linear_datamodeling_score",
    "loo_correlation",
    "mislabel_detection",
    "plot_candidates",
    "select",
]

Retrain = Callable[[np.ndarray], Any]
#: A fitted calculator, or an (n_test, n_train) array of scores from elsewhere.
Scores = Any


# -- what retraining does -------------------------------------------------------------
def loss_like_values(calculator: InfluenceCalculator, test_data: Any) -> np.ndarray:
    """The test points' loss-like measurement at the model's current weights: shape (n_test,)."""
    model, measurement = calculator.model, calculator.measurement
    if measurement.is_loss:
        return np.asarray(host(model, model.per_sample_loss(test_data)), np.float64)
    function = measurement.loss_like(model.xp)
    parts = [
        host(model, function(model.kernels.outputs(batch.inputs), batch.targets))
        for batch in model.batches(test_data, calculator.batch_size)
    ]
    return np.concatenate(parts).astype(np.float64)


#: The ``method`` of a directory of retrainings in progress (``retrainings_dir``).
RETRAININGS = "retrainings"


def _retrained_values(
    calculator: InfluenceCalculator,
    retrain: Retrain,
    test_data: Any,
    subsets: Sequence[np.ndarray],
    directory: str | Path | None = None,
) -> np.ndarray:
    """Loss-like test values after retraining on each subset: shape (len(subsets), n_test).

    With ``directory``, the values are saved after every retraining
    (:mod:`influence_core.io`, fingerprinted: the trained model, the test
    data, the measurement and the subsets), and a rerun resumes after the
    last one saved; values saved for other subsets, weights or data are refused.
    """
    rows: list[np.ndarray] = []
    parameters = {
        "calculator": type(calculator).__name__,
        "measurement": calculator.measurement.name,
        "subsets_sha256": hashlib.sha256(
            np.ascontiguousarray(np.stack([np.asarray(s, np.int64) for s in subsets])).tobytes()
        ).hexdigest(),
    }
    if directory is not None and (Path(directory) / METADATA).exists():
        saved = load_result(
            directory,
            model=calculator.model,
            data={"test": test_data},
            batch_size=calculator.batch_size,
            method=RETRAININGS,
        )
        recorded = {k: saved.metadata["parameters"].get(k) for k in parameters}
        if recorded != parameters:
            differing = ", ".join(k for k in parameters if recorded[k] != parameters[k])
            raise FingerprintMismatchError(
                f"{directory} holds retrainings of other settings ({differing} differ); "
                "use another directory for these"
            )
        rows = list(saved.arrays["values"])
    todo = list(enumerate(subsets))[len(rows) :]
    for j, subset in progress(todo, desc="retraining", total=len(todo)):
        weights = retrain(np.asarray(subset))
        with calculator.model.checkpoint_loaded(weights):
            rows.append(loss_like_values(calculator, test_data))
        if directory is not None:
            save_result(
                directory,
                {"values": np.stack(rows)},
                method=RETRAININGS,
                model=calculator.model,
                parameters={**parameters, "done": j + 1},
                data={"test": test_data},
                batch_size=calculator.batch_size,
            )
    return np.stack(rows)


def _folded_scores(
    calculator: InfluenceCalculator,
    test_data: Any,
    train_data: Any,
    weights_of: Callable[[int, int], np.ndarray],
) -> np.ndarray:
    """Σ_batches weights_of(start, b) @ τ_batchᵀ, shape (m, n_test), scoring batch by batch.

    ``weights_of(start, size)`` gives the (m, size) weights of one training
    batch, so neither the (n_test, n_train) scores nor an (m, n_train) weight
    matrix exists.
    """
    model = calculator.model
    prepared = calculator.prepare_test(test_data)
    total = None
    # The calculator's own stream of score blocks: what influence() and top_k() consume, so
    # a TRAK reads its stored features and a TracIn loads each checkpoint once per chunk.
    for start, block in calculator._scores_from_prepared(prepared, train_data):
        scores = np.asarray(host(model, block), np.float64)  # (n_test, b)
        part = weights_of(start, scores.shape[1]) @ scores.T
        total = part if total is None else total + part
    return total


def _member_weights(subsets: np.ndarray) -> Callable[[int, int], np.ndarray]:
    """(m, size) 0/1 weights of training points start … start + size in each sorted subset."""

    def weights_of(start: int, size: int) -> np.ndarray:
        out = np.zeros((len(subsets), size))
        for j, row in enumerate(subsets):  # one slice per subset (m of them), not per sample
            lo = np.searchsorted(row, start)
            hi = np.searchsorted(row, start + size)
            out[j, row[lo:hi] - start] = 1.0
        return out

    return weights_of


def _fingerprinted_save(
    directory: str | Path,
    arrays: dict[str, np.ndarray],
    method: str,
    calculator: InfluenceCalculator,
    parameters: dict[str, Any],
    data: dict[str, Any],
) -> Path:
    return save_result(
        directory,
        arrays,
        method=method,
        model=calculator.model,
        parameters={"calculator": type(calculator).__name__, **parameters},
        data=data,
        batch_size=calculator.batch_size,
    )


class _Saved:
    """What a result saves: ``_ARRAYS`` by attribute name, ``_parameters()``, under ``_METHOD``."""

    _ARRAYS: tuple[str, ...] = ()
    _METHOD = ""
    _provenance: dict[str, Any]

    def _parameters(self) -> dict[str, Any]:
        return {}

    def save(self, directory: str | Path) -> Path:
        """``arrays.npz`` + ``metadata.json`` with the model's and the data's fingerprints."""
        p = self._provenance
        return _fingerprinted_save(
            directory,
            {k: getattr(self, k) for k in self._ARRAYS},
            self._METHOD,
            p["calculator"],
            {**p.get("parameters", {}), **self._parameters()},
            p["data"],
        )


# -- LDS --------------------------------------------------------------------------------
@dataclass(frozen=True)
class LDSResult(_Saved):
    """A linear datamodeling score.

    Attributes:
        score: the mean Spearman correlation over test points.
        interval: half-width of its 95 % interval, 1.96 × the standard error over test points.
        per_test: each test point's Spearman correlation, shape (n_test,).
        subsets: the training indices of each subset, shape (m, size).
        predicted: −Σ_{i ∈ S_j} τ(z_i, z_test), shape (m, n_test).
        actual: the loss-like test values after retraining on S_j, shape (m, n_test).
    """

    score: float
    interval: float
    per_test: np.ndarray
    subsets: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray
    _provenance: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    _ARRAYS = ("per_test", "subsets", "predicted", "actual")
    _METHOD = "linear_datamodeling_score"

    def _parameters(self) -> dict[str, Any]:
        return {"score": self.score, "interval": self.interval}

    @classmethod
    def from_retrained(cls, subsets: Any, actual: Any) -> LDSResult:
        """A reference built from retrainings done elsewhere (a cluster, another script).

        ``subsets`` (m, size): the training indices of each subset; ``actual``
        (m, n_test): the test points' loss-like values after training on each.
        Pass it as ``retrain`` to score calculators or arrays against it.
        """
        drawn = np.sort(np.asarray(subsets, dtype=np.int64), axis=1)
        values = np.asarray(actual, dtype=np.float64)
        if drawn.ndim != 2 or values.ndim != 2 or len(drawn) != len(values) or len(drawn) < 2:
            raise ValueError(
                f"need (m, size) subsets and (m, n_test) values with m ≥ 2, got shapes "
                f"{drawn.shape} and {values.shape}"
            )
        nothing = np.full(values.shape[1], np.nan)
        return cls(np.nan, np.nan, nothing, drawn, np.zeros_like(values), values)


def linear_datamodeling_score(
    calculator: Scores,
    retrain: Retrain | LDSResult,
    test_data: Any = None,
    *,
    subsets: int | Sequence[Sequence[int]] = 50,
    fraction: float = 0.5,
    seed: int = 0,
    train_data: Any = None,
    retrainings_dir: str | Path | None = None,
) -> LDSResult:
    """The LDS of a fitted calculator's scores (see the module docstring).

    Args:
        calculator: fitted; its training data (or ``train_data``) is what subsets
            index. Or an (n_test, n_train) array of scores (with a previous
            result as ``retrain``).
        retrain: ``retrain(indices) -> weights`` (sorted indices of the subset),
            or an earlier :class:`LDSResult` whose subsets and retrained values are reused.
        test_data: the test points (not needed for an array of scores).
        subsets: how many random subsets to draw, or the subsets themselves.
        fraction: each drawn subset's share of the training set.
        seed: seeds the subsets.
        train_data: the training data to score (default: the calculator's).
        retrainings_dir: a directory where each retraining's test values are saved
            as it finishes; a rerun with the same subsets, model and test data resumes
            after the last one (the retrainings are the expensive part).
    """
    if isinstance(retrain, LDSResult):
        drawn, actual = retrain.subsets, retrain.actual
        if not isinstance(calculator, InfluenceCalculator):
            predicted = -_array_folded(calculator, _member_weights(drawn), actual.shape[1])
            return _lds_result(predicted, drawn, actual, retrain._provenance, "external scores")
        train = calculator.training_data(train_data)
        predicted = -_folded_scores(calculator, test_data, train, _member_weights(drawn))
        provenance = {"calculator": calculator, "data": {"train": train, "test": test_data}}
        return _lds_result(predicted, drawn, actual, {**retrain._provenance, **provenance})
    if not isinstance(calculator, InfluenceCalculator):
        raise TypeError(
            "an array of scores has no model to retrain: pass the LDSResult of an earlier "
            "call (with a calculator) as retrain, to reuse its subsets and retrained values"
        )
    train = calculator.training_data(train_data)
    n = calculator.model.count(train, calculator.batch_size)
    if isinstance(subsets, int):
        if subsets < 2 or not 0.0 < fraction < 1.0:
            raise ValueError(
                f"need at least 2 subsets and 0 < fraction < 1, got {subsets} and {fraction}"
            )
        size = max(1, round(fraction * n))
        rng = np.random.default_rng(seed)
        drawn = np.stack([np.sort(rng.permutation(n)[:size]) for _ in range(subsets)])
    else:
        drawn = np.asarray(subsets, dtype=np.int64)
        if drawn.ndim != 2 or len(drawn) < 2 or drawn.min() < 0 or drawn.max() >= n:
            raise ValueError(
                f"subsets must be at least 2 equal-sized rows of indices into the {n} training "
                f"points, got an array of shape {drawn.shape}"
            )
    drawn = np.sort(drawn, axis=1)
    predicted = -_folded_scores(calculator, test_data, train, _member_weights(drawn))
    actual = _retrained_values(calculator, retrain, test_data, list(drawn), retrainings_dir)
    provenance = {
        "calculator": calculator,
        "parameters": {"fraction": fraction, "seed": seed, "subsets": len(drawn)},
        "data": {"train": train, "test": test_data},
    }
    return _lds_result(predicted, drawn, actual, provenance)


def _lds_result(
    predicted: np.ndarray,
    drawn: np.ndarray,
    actual: np.ndarray,
    provenance: dict[str, Any],
    scored: str | None = None,
) -> LDSResult:
    per_test = np.array([_spearman(predicted[:, t], actual[:, t]) for t in range(actual.shape[1])])
    valid = per_test[np.isfinite(per_test)]
    interval = _interval(valid)
    if scored is not None:
        parameters = {**provenance.get("parameters", {}), "scores": scored}
        provenance = {**provenance, "parameters": parameters}
    return LDSResult(
        score=float(np.mean(valid)) if len(valid) else np.nan,
        interval=interval,
        per_test=per_test,
        subsets=drawn,
        predicted=predicted,
        actual=actual,
        _provenance=provenance,
    )


def _array_folded(
    scores: Any, weights_of: Callable[[int, int], np.ndarray], n_test: int
) -> np.ndarray:
    """weights_of(0, n_train) @ scoresᵀ for a given (n_test, n_train) array: shape (m, n_test)."""
    matrix = np.asarray(_to_host(scores), np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != n_test:
        raise ValueError(
            f"scores must be an (n_test, n_train) array with n_test = {n_test} (the earlier "
            f"result's test points), got shape {matrix.shape}"
        )
    if not np.all(np.isfinite(matrix)):
        raise ValueError("the scores hold NaN or inf")
    return weights_of(0, matrix.shape[1]) @ matrix.T


def _interval(values: np.ndarray) -> float:
    """Half-width of a 95 % interval of the mean over test points: 1.96 standard errors."""
    if len(values) < 2:
        return np.nan
    return float(1.96 * np.std(values, ddof=1) / np.sqrt(len(values)))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's ρ; NaN when either side is constant (no ranking to compare)."""
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return np.nan
    return float(spearmanr(a, b).statistic)


# -- leave-one-out -----------------------------------------------------------------------
@dataclass(frozen=True)
class LOOResult(_Saved):
    """Predicted against actual leave-one-out changes.

    Attributes:
        pearson, spearman: correlations over all (test point, removed point) pairs.
        removed: the training indices retrained without, shape (k,).
        predicted: τ(z_i, z_test) / n, shape (k, n_test): the predicted rise of
            the loss-like value when z_i is removed.
        actual: the measured change after retraining without z_i, shape (k, n_test).
        n_train: n, the size of the training set the scores were divided by.
    """

    pearson: float
    spearman: float
    removed: np.ndarray
    predicted: np.ndarray
    actual: np.ndarray
    n_train: int = 0
    _provenance: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    _ARRAYS = ("removed", "predicted", "actual")
    _METHOD = "loo_correlation"

    def _parameters(self) -> dict[str, Any]:
        return {"pearson": self.pearson, "spearman": self.spearman}


def loo_correlation(
    calculator: Scores,
    retrain: Retrain | LOOResult,
    test_data: Any = None,
    removed: Sequence[int] | None = None,
    *,
    train_data: Any = None,
) -> LOOResult:
    """Leave-one-out: retrain without each of ``removed`` and correlate with τ / n.

    ``retrain(indices)`` is given every training index but one; the baseline is
    the model's current weights, so train ``retrain`` the way those were
    trained (for a non-convex model, warm-started from them is the usual choice).
    ``retrain`` may be an earlier :class:`LOOResult` (its removed points and
    retrained changes are reused), and then ``calculator`` may be an
    (n_test, n_train) array of scores from elsewhere.
    """
    if isinstance(retrain, LOOResult):
        removed, actual = retrain.removed, retrain.actual
        if isinstance(calculator, InfluenceCalculator):
            train = calculator.training_data(train_data)
            n = calculator.model.count(train, calculator.batch_size)
            predicted = _folded_scores(calculator, test_data, train, _picks(removed)) / n
        else:
            n = retrain.n_train
            predicted = _array_folded(calculator, _picks(removed), actual.shape[1]) / n
        return _loo_result(predicted, removed, actual, retrain._provenance, n)
    if not isinstance(calculator, InfluenceCalculator):
        raise TypeError(
            "an array of scores has no model to retrain: pass the LOOResult of an earlier "
            "call (with a calculator) as retrain"
        )
    if removed is None:
        raise TypeError("loo_correlation needs removed=, the training indices to leave out")
    train = calculator.training_data(train_data)
    n = calculator.model.count(train, calculator.batch_size)
    removed = np.asarray(removed, dtype=np.int64)
    if removed.ndim != 1 or len(removed) < 2 or removed.min() < 0 or removed.max() >= n:
        raise ValueError(
            f"removed must be at least 2 indices into the {n} training points, got {removed!r}"
        )

    predicted = _folded_scores(calculator, test_data, train, _picks(removed)) / n
    baseline = loss_like_values(calculator, test_data)
    everyone = np.arange(n)
    actual = (
        _retrained_values(
            calculator, retrain, test_data, [everyone[everyone != i] for i in removed]
        )
        - baseline
    )
    provenance = {"calculator": calculator, "data": {"train": train, "test": test_data}}
    return _loo_result(predicted, removed, actual, provenance, n)


def _picks(removed: np.ndarray) -> Callable[[int, int], np.ndarray]:
    """(k, size) weights: row j picks training point removed[j] when it is in the batch."""

    def picks(start: int, size: int) -> np.ndarray:
        out = np.zeros((len(removed), size))
        inside = (removed >= start) & (removed < start + size)
        out[np.flatnonzero(inside), removed[inside] - start] = 1.0
        return out

    return picks


def _loo_result(
    predicted: np.ndarray,
    removed: np.ndarray,
    actual: np.ndarray,
    provenance: dict[str, Any],
    n_train: int,
) -> LOOResult:
    return LOOResult(
        pearson=float(pearsonr(predicted.ravel(), actual.ravel()).statistic),
        spearman=float(spearmanr(predicted.ravel(), actual.ravel()).statistic),
        removed=removed,
        predicted=predicted,
        actual=actual,
        n_train=n_train,
        _provenance=provenance,
    )


# -- choosing among configurations ------------------------------------------------------
#: What a configuration may refuse with, as a row of :func:`select`'s table: its curvature
#: is not positive definite, LiSSA diverged, its cost is over the limit, its gradients are
#: not finite. Any other error is a bug, and is raised.
REFUSALS = (NotPositiveDefiniteError, LissaDivergenceError, CostLimitError, NonFiniteGradientError)


@dataclass(frozen=True)
class Candidate:
    """One configuration's row in a :class:`Selection`: its LDS and what it cost."""

    name: str
    score: float
    interval: float
    fit_seconds: float
    scoring_seconds: float
    lds: LDSResult | None = field(repr=False, compare=False)
    #: Why the configuration gave no scores (its solver refused: not positive definite,
    #: diverged, over its cost limit), or ``None``; its score is then NaN.
    refused: str | None = None


@dataclass(frozen=True)
class Selection:
    """Configurations compared on one set of retrainings (:func:`select`).

    Attributes:
        candidates: one :class:`Candidate` per configuration, in the order given.
        best: the name of the candidate with the highest LDS.
        reference: the shared retrainings (an :class:`LDSResult`): pass it as
            ``retrain`` to score more configurations on them.
        retraining_seconds: what the retrainings cost, once for all candidates.
    """

    candidates: tuple[Candidate, ...]
    best: str
    reference: LDSResult
    retraining_seconds: float

    def __str__(self) -> str:
        rows = [
            "| configuration | LDS | fit (s) | scoring (s) |",
            "|---|---:|---:|---:|",
            *(
                f"| {c.name}{' (best)' if c.name == self.best else ''} | "
                + (
                    f"refused: {_first_clause(c.refused)}"
                    if c.refused
                    else f"{c.score:.3f} ± {c.interval:.3f}"
                )
                + f" | {c.fit_seconds:.2f} | {c.scoring_seconds:.2f} |"
                for c in self.candidates
            ),
        ]
        return "\n".join(rows) + f"\nretrainings, shared: {self.retraining_seconds:.1f} s"

    def plot(self, axis: Any = None, *, title: str | None = None) -> Any:
        """LDS (± its 95 % interval) against fit + scoring seconds: :func:`plot_candidates`."""
        return plot_candidates(self.candidates, self.best, axis, title=title)


def plot_candidates(
    candidates: Sequence[Candidate], best: str, axis: Any = None, *, title: str | None = None
) -> Any:
    """LDS (± its 95 % interval) against fit + scoring seconds, one point per candidate.

    ``best`` (a candidate's name) is drawn in orange; a refused candidate has
    no point and is named under the axis. Needs matplotlib; draws on ``axis``
    (a new figure's if ``None``) and returns it.
    """
    try:
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plotting a selection needs matplotlib: pip install matplotlib"
        ) from error
    if axis is None:
        _, axis = plt.subplots(figsize=(6.5, 5))
    for c in candidates:
        if c.refused:
            continue
        seconds = max(c.fit_seconds + c.scoring_seconds, 1e-3)
        axis.errorbar(
            seconds,
            c.score,
            yerr=c.interval,
            fmt="o",
            color="tab:orange" if c.name == best else "tab:blue",
            capsize=3,
        )
        axis.annotate(
            c.name, (seconds, c.score), fontsize=7, xytext=(4, 3), textcoords="offset points"
        )
    refused = [c.name for c in candidates if c.refused]
    axis.set_xscale("log")
    axis.xaxis.set_minor_formatter(NullFormatter())  # log minor labels collide on short ranges
    axis.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    axis.margins(x=0.2)  # room for the right-most name
    axis.set_xlabel(
        "fit + scoring, seconds" + (f"\nrefused: {', '.join(refused)}" if refused else "")
    )
    axis.set_ylabel("LDS (mean Spearman, ± 95 %)")
    axis.set_title(title or f"{len(candidates)} configurations, one set of retrainings")
    axis.grid(alpha=0.3)
    return axis


def _first_clause(reason: str) -> str:
    """An error's first clause, for a table cell (the whole reason stays in ``refused``)."""
    head = reason.split(": ", 2)
    return ": ".join(head[:2]) if len(head) > 2 else reason


def select(
    candidates: dict[str, InfluenceCalculator],
    retrain: Retrain | LDSResult,
    train_data: Any,
    test_data: Any,
    *,
    subsets: int = 20,
    fraction: float = 0.5,
    seed: int = 0,
    retrainings_dir: str | Path | None = None,
) -> Selection:
    """Fit and score every candidate configuration on one set of retrainings; the best LDS wins.

    Retraining is the cost, and it does not depend on the estimator: the
    ``subsets`` random subsets are drawn and retrained once, then every
    candidate is fitted and its LDS taken on those same retrainings (its fit
    and scoring timed). A damping grid is a dict of calculators::

        grid = {f"EK-FAC λ={d:g}": FirstOrderInfluenceCalculator(model, EKFACIHVP(damping=d))
                for d in (1e-4, 1e-3, 1e-2, 1e-1)}
        chosen = select(grid, retrain, train, test, subsets=20)
        print(chosen)                      # the table; chosen.best is the name

    Args:
        candidates: name → calculator, unfitted (each is fitted on ``train_data``).
            They must share the model and the measurement, which the retrained
            values are of. One whose solver refuses (:data:`REFUSALS`: not positive
            definite, diverged …) is a row with ``refused`` set and a NaN LDS.
        retrain: ``retrain(indices) -> weights`` (see the module docstring), or an
            earlier :class:`LDSResult` (``Selection.reference``) to reuse.
        train_data: what the candidates are fitted on and subsets index.
        test_data: the test points.
        subsets, fraction, seed, retrainings_dir: the retrainings, as for
            :func:`linear_datamodeling_score` (a killed selection resumes its retrainings).
    """
    import time

    if not candidates:
        raise ValueError("select needs at least one candidate configuration")
    first = next(iter(candidates.values()))
    for name, calculator in candidates.items():
        same = calculator.measurement.name == first.measurement.name
        if calculator.model is not first.model or not same:
            raise ValueError(
                f"candidate {name!r} has another model or measurement than the first: the "
                "retrained values are of one model's measurement, so the candidates must share it"
            )
    began = time.perf_counter()
    if isinstance(retrain, LDSResult):
        reference = retrain
    else:
        n = first.model.count(train_data, first.batch_size)
        if subsets < 2 or not 0.0 < fraction < 1.0:
            raise ValueError(f"need ≥ 2 subsets and 0 < fraction < 1, got {subsets}, {fraction}")
        rng = np.random.default_rng(seed)
        size = max(1, round(fraction * n))
        drawn = np.stack([np.sort(rng.permutation(n)[:size]) for _ in range(subsets)])
        actual = _retrained_values(first, retrain, test_data, list(drawn), retrainings_dir)
        reference = LDSResult.from_retrained(drawn, actual)
    retraining = time.perf_counter() - began
    rows = []
    for name, calculator in progress(candidates.items(), desc="candidates", total=len(candidates)):
        start = fitted = time.perf_counter()
        try:
            calculator.fit(train_data)
            fitted = time.perf_counter()
            lds = linear_datamodeling_score(calculator, reference, test_data)
        except REFUSALS as error:  # a configuration that cannot be solved is a row, not a crash
            now = time.perf_counter()
            reason = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            rows.append(Candidate(name, np.nan, np.nan, fitted - start, now - fitted, None, reason))
            continue
        rows.append(
            Candidate(
                name, lds.score, lds.interval, fitted - start, time.perf_counter() - fitted, lds
            )
        )
    if all(c.refused for c in rows):
        raise ValueError(
            "every candidate refused: " + "; ".join(f"{c.name}: {c.refused}" for c in rows)
        )
    best = max(rows, key=lambda c: -np.inf if not np.isfinite(c.score) else c.score)
    return Selection(tuple(rows), best.name, reference, retraining)


# -- counterfactual removal ---------------------------------------------------------------
@dataclass(frozen=True)
class CounterfactualResult(_Saved):
    """Removing each test point's strongest proponents, against removing as many at random.

    Δ is the change of a test point's loss-like value when the removed points
    are left out of training: Δ_top for its k strongest proponents by the
    calculator's scores, Δ_random for k points drawn at random (the mean over
    the draws). A faithful estimator's proponents raise the loss when removed
    more than random points do: ``score`` > 0.

    Attributes:
        score: the mean over test points of Δ_top − Δ_random.
        interval: half-width of its 95 % interval (1.96 standard errors over test points).
        top_change: Δ_top per test point, shape (n_test,).
        random_change: Δ_random per test point, shape (n_test,).
        removed: each test point's k removed proponents, shape (n_test, k).
        random_removed: the random draws, shape (draws, k).
        full: the loss-like values after training on all the data, shape (n_test,).
        random_values: after each random removal, shape (draws, n_test).
    """

    score: float
    interval: float
    top_change: np.ndarray
    random_change: np.ndarray
    removed: np.ndarray
    random_removed: np.ndarray
    full: np.ndarray
    random_values: np.ndarray
    _provenance: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    _ARRAYS = (
        "top_change",
        "random_change",
        "removed",
        "random_removed",
        "full",
        "random_values",
    )
    _METHOD = "counterfactual_removal"

    def _parameters(self) -> dict[str, Any]:
        return {"score": self.score, "interval": self.interval, "k": int(self.removed.shape[1])}


def counterfactual_removal(
    calculator: InfluenceCalculator,
    retrain: Retrain | CounterfactualResult,
    test_data: Any,
    *,
    fraction: float = 0.05,
    draws: int = 5,
    seed: int = 0,
    train_data: Any = None,
) -> CounterfactualResult:
    """How much removing each test point's top proponents changes it, against random removal.

    The quantity the demo's retraining table shows and what Bergson reports
    as its query-loss difference: for each test point, retrain without its
    k = round(``fraction`` · n) strongest proponents (the calculator's running
    top-k, streamed) and compare the change of its loss-like value with the
    change after removing k random points (``draws`` seeded draws, shared by
    all test points). Retrainings: 1 (all data) + ``draws`` + one per test
    point (fewer when test points share their top-k set).

    Args:
        calculator: fitted.
        retrain: ``retrain(indices) -> weights`` as for the LDS, or an earlier
            :class:`CounterfactualResult` (same k) whose all-data and random
            retrainings are reused, so several estimators pay only their own
            removals.
        test_data: the test points.
        fraction: the share of the training set removed per test point.
        draws: random removals to compare with.
        seed: seeds the random removals.
        train_data: the training data (default: the calculator's).
    """
    train = calculator.training_data(train_data)
    n = calculator.model.count(train, calculator.batch_size)
    if not 0.0 < fraction < 1.0 or draws < 1:
        raise ValueError(f"need 0 < fraction < 1 and draws ≥ 1, got {fraction} and {draws}")
    k = max(1, round(fraction * n))
    if isinstance(retrain, CounterfactualResult):
        if retrain.random_removed.shape[1] != k:
            raise ValueError(
                f"the earlier result removed {retrain.random_removed.shape[1]} points per "
                f"retraining; fraction={fraction} removes {k} of these {n}"
            )
        full, randomly = retrain.full, retrain.random_removed
        random_values, fit = retrain.random_values, retrain._provenance["retrain"]
    else:
        fit = retrain
        rng = np.random.default_rng(seed)
        randomly = np.stack([np.sort(rng.permutation(n)[:k]) for _ in range(draws)])
        full = _retrained_values(calculator, fit, test_data, [np.arange(n)])[0]
        random_values = _retrained_values(
            calculator, fit, test_data, [np.setdiff1d(np.arange(n), r) for r in randomly]
        )
    top = calculator.top_k(test_data, train, k)
    removed = np.sort(np.asarray(host(calculator.model, top.proponents), np.int64), axis=1)
    sets = {tuple(row) for row in removed.tolist()}
    kept = {r: np.setdiff1d(np.arange(n), np.asarray(r)) for r in sets}
    values = dict(
        zip(kept, _retrained_values(calculator, fit, test_data, list(kept.values())), strict=True)
    )
    own = np.array([values[tuple(row)][t] for t, row in enumerate(removed.tolist())])
    top_change = own - full
    random_change = np.mean(random_values - full, axis=0)
    gain = top_change - random_change
    interval = _interval(gain)
    provenance = {
        "calculator": calculator,
        "retrain": fit,
        "parameters": {"fraction": fraction, "draws": len(randomly), "seed": seed},
        "data": {"train": train, "test": test_data},
    }
    return CounterfactualResult(
        score=float(np.mean(gain)),
        interval=interval,
        top_change=top_change,
        random_change=random_change,
        removed=removed,
        random_removed=randomly,
        full=full,
        random_values=random_values,
        _provenance=provenance,
    )


# -- mislabel detection -------------------------------------------------------------------
@dataclass(frozen=True)
class MislabelResult:
    """How fast checking points by decreasing score finds the flipped labels.

    Attributes:
        checked: fractions of the training set checked, shape (n + 1,), from 0 to 1.
        found: the fraction of the flipped points found by then, shape (n + 1,).
        auc: the ROC AUC of the score as a detector of the flipped points.
    """

    checked: np.ndarray
    found: np.ndarray
    auc: float

    def found_at(self, fraction: float) -> float:
        """The fraction of flipped points found after checking ``fraction`` of the data."""
        k = int(np.floor(fraction * (len(self.checked) - 1) + 1e-9))
        return float(self.found[k])


def mislabel_detection(scores: Any, flipped: Any) -> MislabelResult:
    """Rank training points by decreasing ``scores``; how many ``flipped`` ones come first.

    ``scores``: one value per training point (self-influence, say; NumPy or a
    native array); ``flipped``: a boolean mask of the same length, or the
    flipped indices. Ties in the ranking are broken by index (stable). The AUC
    is the Mann–Whitney statistic with ties counted half.
    """
    values = np.asarray(_to_host(scores), np.float64).ravel()
    n = len(values)
    mask = np.asarray(_to_host(flipped))
    if mask.dtype != bool:
        indices, mask = mask.astype(np.int64), np.zeros(n, bool)
        mask[indices] = True
    if mask.shape != (n,) or not 0 < mask.sum() < n:
        raise ValueError(
            f"flipped must mark some but not all of the {n} scored points, got {mask.sum()} of "
            f"shape {mask.shape}"
        )
    if not np.all(np.isfinite(values)):
        raise ValueError(
            f"scores hold NaN or inf at indices {np.flatnonzero(~np.isfinite(values))[:10]}"
        )
    order = np.argsort(-values, kind="stable")
    found = np.concatenate([[0.0], np.cumsum(mask[order]) / mask.sum()])
    ranks = rankdata(values)
    positives = int(mask.sum())
    auc = (ranks[mask].sum() - positives * (positives + 1) / 2) / (positives * (n - positives))
    return MislabelResult(checked=np.arange(n + 1) / n, found=found, auc=float(auc))


def _to_host(values: Any) -> np.ndarray:
    """A host copy through the array protocol (NumPy, or a native CPU array without gradients)."""
    return np.asarray(values)
