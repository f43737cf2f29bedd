"""``DistributedInfluence``: fit on the driver through the shards, score every shard on the cluster.

The flow, for N shards on W workers::

    fit        the calculator's own fit, on the driver, over a ShardedTrainingSet:
               each data pass (Hessian, HVP, K-FAC factors) is one task per shard
               plus a tree sum; the driver keeps the iterate and the factorisation
    broadcast  the fitted state and the solved test block, as NumPy, held once on
               the cluster (each worker fetches them once, then reuses them)
    score      one task per shard: self-influence, a block of scores, or a top-k;
               top-k lists are merged pairwise (a tree), the lower shards first

A worker builds its model from the :class:`ModelFactory` once and the
calculator from its recipe once per fit. Results are NumPy (the pairwise
scores a Dask array), whatever the framework.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..chunk_store import check_manifest, locked, verified_chunk, write_chunk
from ..errors import ChunkRecomputedWarning, NotFittedError
from ..estimators.base import InfluenceCalculator
from ..estimators.top_k import TopK
from ..io import FORMAT, data_fingerprint, parameter_fingerprint, weights_fingerprint
from ..model import InfluenceModel
from ..tree import tree_map
from .factory import ModelFactory
from .sharded_set import ShardedTrainingSet, _to_numpy
from .shards import Shard
from .tasks import (
    FittedCalculator,
    MakeCalculator,
    TestSide,
    merge_top_k,
    shard_meta,
    shard_scores,
    shard_scores_result,
    shard_self_influence,
    shard_top_k,
)

__all__ = ["DistributedInfluence"]


class DistributedInfluence:
    """A calculator fitted on a sharded training set and scored shard by shard on a Dask cluster.

    ::

        from distributed import Client, LocalCluster
        client = Client(LocalCluster(n_workers=2, threads_per_worker=1))
        factory = ModelFactory(build_net, loss, weights=im.weights_as_numpy())
        run = DistributedInfluence(
            client, factory, lambda m: FirstOrderInfluenceCalculator(m, EKFACIHVP())
        ).fit(shard_arrays(X_train, y_train, shard_size=8192))
        values = run.self_influence()                 # (n_train,)
        top = run.top_k((X_test, y_test), k=10)       # TopK of NumPy arrays
        scores = run.influence((X_test, y_test))      # dask array (n_test, n_train)

    Args:
        client: a ``distributed.Client``.
        factory: builds the model on the driver and on each worker.
        calculator: ``calculator(model) -> InfluenceCalculator``, configured
            and unfitted (a function or ``functools.partial``, picklable:
            importable on the workers or pickled by value). Calculators that
            export their fit: first-order (exact, CG, Arnoldi, K-FAC, EK-FAC
            solvers), Arnoldi, TracIn (checkpoints as paths or NumPy),
            gradient similarity.

    The same code runs on a ``LocalCluster`` and on a remote cluster
    (``Client("tcp://scheduler:8786")``); ``docs/distributed.md`` has the
    scaling model.
    """

    def __init__(self, client: Any, factory: ModelFactory, calculator: MakeCalculator) -> None:
        if not isinstance(factory, ModelFactory):
            raise TypeError(f"factory must be a ModelFactory, got {type(factory).__name__}")
        if not callable(calculator):  # a built calculator is not callable
            raise TypeError(
                "calculator must be a recipe, calculator(model) -> InfluenceCalculator (e.g. "
                "lambda m: FirstOrderInfluenceCalculator(m, EKFACIHVP())), not a built "
                "calculator: each worker builds its own around its own model"
            )
        self.client = client
        self.factory = factory
        self.make_calculator = calculator

    # -- fitting -------------------------------------------------------------------------
    def fit(self, shards: Sequence[Shard] | ShardedTrainingSet) -> DistributedInfluence:
        """Fit the calculator on all the shards; returns ``self``.

        Sets ``model_`` (the driver's model), ``calculator_`` (the driver's
        fitted calculator: its solver, ``residuals_`` …) and ``training_set_``.
        """
        import cloudpickle

        training = (
            shards
            if isinstance(shards, ShardedTrainingSet)
            else ShardedTrainingSet(self.client, self.factory, shards)
        )
        model = self.factory()
        # A fresh copy of the recipe, as a worker gets: a solver inside it is never shared.
        calculator = cloudpickle.loads(cloudpickle.dumps(self.make_calculator))(model)
        if not isinstance(calculator, InfluenceCalculator):
            raise TypeError(
                f"calculator(model) returned {type(calculator).__name__}, not an InfluenceCalculator"
            )
        if not calculator.exports_fitted_state:
            raise TypeError(
                f"{type(calculator).__name__} cannot be scored on workers: its fit is not "
                "exported to NumPy yet. Distributed: FirstOrderInfluenceCalculator, "
                "ArnoldiInfluenceCalculator, TracIn, GradientSimilarity"
            )
        calculator.fit(training)
        self.model_: InfluenceModel = model
        self.calculator_: InfluenceCalculator = calculator
        self.training_set_ = training
        self._job = training.job(model, self.make_calculator)
        self._fitted = training.hold(
            FittedCalculator(uuid.uuid4().hex, calculator.fitted_state()), "fitted"
        )
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "calculator_"):
            raise NotFittedError(self, "call fit(shards) first")

    def _refuse_per_point_solves(self, what: str) -> None:
        """Self-influence (and RelatIF) with an iterative solver would need a cluster-wide solve per batch."""
        if self.calculator_.solves_per_point(what):
            settings = self.calculator_.get_params().get("ihvp") or {}
            solver = settings.get("class", type(self.calculator_).__name__)
            raise ValueError(
                f"{what} with {solver} solves one block per training batch, each an iterative "
                "solve over the whole sharded training set: not run on a cluster. Fit "
                "ExactIHVP, ArnoldiIHVP, KFACIHVP or EKFACIHVP (one product per batch, on "
                "each worker)"
            )

    @property
    def num_train(self) -> int:
        self._check_fitted()
        return self.training_set_.num_samples

    # -- results -------------------------------------------------------------------------
    def self_influence(self) -> np.ndarray:
        """score(z, z) for every training point, shape (n_train,), NumPy; shard by shard."""
        self._check_fitted()
        self._refuse_per_point_solves("self-influence")
        training = self.training_set_
        futures = training.map_shards(
            shard_self_influence, self._job, self._fitted, name="self-influence"
        )
        parts: dict[int, np.ndarray] = {}
        for result in training.follow(futures, "self-influence"):
            parts[result.index] = result.values["self_influence"]
        return np.concatenate([parts[j] for j in range(len(training))])

    def prepare_test(self, test_data: Any) -> Any:
        """The calculator's test side (solved once, on the driver), as NumPy: what is broadcast."""
        self._check_fitted()
        self._refuse_per_point_solves("influence")
        prepared = self.calculator_.prepare_test(test_data)
        return tree_map(lambda a: _to_numpy(self.model_, a), prepared)

    def _held_test_side(self, test_data: Any) -> Any:
        side = TestSide(uuid.uuid4().hex, self.prepare_test(test_data))
        return self.training_set_.hold(side, "test-side")

    def top_k(self, test_data: Any, k: int = 5) -> TopK:
        """The k strongest proponents and opponents of each test point (NumPy), merged as a tree."""
        self._check_fitted()
        if int(k) < 1:
            raise ValueError(f"k must be ≥ 1, got {k}")
        training = self.training_set_
        held = self._held_test_side(test_data)
        leaves = training.submit_each(
            shard_top_k,
            lambda j: (self._job, self._fitted, training.shard_futures[j], held, int(k)),
            "top-k",
        )
        metas = [self.client.submit(shard_meta, f, pure=False) for f in leaves]
        merged = training.tree(leaves, merge_top_k, int(k), name="top-k-merge")
        for _ in training.follow(metas, "top-k"):
            pass
        values = merged.result().values
        return TopK(
            values["proponents"],
            values["proponent_scores"],
            values["opponents"],
            values["opponent_scores"],
        )

    def influence(self, test_data: Any) -> Any:
        """The scores of every training point for every test point: a Dask array (n_test, n_train).

        One chunk per shard, (n_test, shard size), computed when asked
        (``.compute()``, ``.to_zarr(...)``, a reduction); the solved test
        block is computed now, on the driver, and held on the cluster.
        """
        import dask
        import dask.array as da

        self._check_fitted()
        training = self.training_set_
        held = self._held_test_side(test_data)
        n_test = self.model_.count(test_data)
        dtype = np.dtype(f"float{8 * self.model_.itemsize}")
        stamp = uuid.uuid4().hex[:8]
        blocks = [
            da.from_delayed(
                dask.delayed(shard_scores, pure=True)(
                    self._job,
                    self._fitted,
                    training.shard_futures[p.index],
                    held,
                    dask_key_name=f"influence-scores-{training.token}-{stamp}-{p.index}",
                ),
                shape=(n_test, p.size),
                dtype=dtype,
            )
            for p in training.placed
        ]
        return da.concatenate(blocks, axis=1)

    def influence_to_directory(
        self, test_data: Any, directory: str | Path, *, assemble: bool = True
    ) -> np.ndarray | None:
        """The scores (n_test, n_train), one verified chunk file per shard in ``directory``: resumable.

        With ``assemble=False`` nothing is returned and the driver holds one
        shard's block at a time (n_test × shard size), never n_test × n_train:
        read the chunks (``chunks/chunk_N.npz``, key ``scores``) as you need them.

        Started again on the same directory (after an interruption), shards
        whose chunk is there and checks out are read instead of computed; a
        damaged one is computed again with a
        :class:`~influence_core.errors.ChunkRecomputedWarning`. Chunks are
        written by the driver, so workers need no shared disk.
        ``computed_shards_`` records which shards the last call computed.
        """
        import warnings

        self._check_fitted()
        training, model = self.training_set_, self.model_
        directory = Path(directory)
        chunks_dir = directory / "chunks"

        def valid(arrays: dict[str, np.ndarray], start: int, length: int) -> bool:
            return arrays["scores"].ndim == 2 and arrays["scores"].shape[1] == length

        with locked(directory):
            check_manifest(
                directory,
                {
                    "format": FORMAT,
                    "run": "distributed influence",
                    "method": type(self.calculator_).__name__,
                    "settings": self.calculator_.get_params(),
                    "shards": [p.size for p in training.placed],
                    "parameter_names": list(model.parameter_names),
                    "parameter_fingerprint": parameter_fingerprint(model),
                    "weights_fingerprint": weights_fingerprint(model),
                    "test": data_fingerprint(model, test_data),
                },
            )
            parts: dict[int, np.ndarray] = {}
            missing = []
            for p in training.placed:
                path = chunks_dir / f"chunk_{p.index:06d}.npz"
                stored, problem = verified_chunk(path, p.start, p.size, valid)
                if stored is not None:
                    if assemble:
                        parts[p.index] = stored["scores"]
                    continue
                if problem is not None:
                    warnings.warn(
                        f"shard {p.index} of {directory} ({path.name}) {problem}: computing it "
                        "again",
                        ChunkRecomputedWarning,
                        stacklevel=2,
                    )
                missing.append(p.index)
            if missing:
                chunks_dir.mkdir(parents=True, exist_ok=True)
                held = self._held_test_side(test_data)
                futures = training.submit_each(
                    shard_scores_result,
                    lambda j: (self._job, self._fitted, training.shard_futures[j], held),
                    "scores",
                    shards=missing,
                )
                for result in training.follow(futures, "influence"):
                    p = training.placed[result.index]
                    scores = result.values["scores"]
                    write_chunk(
                        chunks_dir / f"chunk_{p.index:06d}.npz",
                        {"scores": scores},
                        p.start,
                        p.size,
                    )
                    if assemble:
                        parts[p.index] = scores
            #: The shards the last call computed (the others were read from their chunks).
            self.computed_shards_ = missing
        if not assemble:
            return None
        return np.concatenate([parts[j] for j in range(len(training))], axis=1)
