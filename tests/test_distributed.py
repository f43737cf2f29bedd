"""influence_core.distributed on a LocalCluster (2 worker processes, 1 thread each).

Every result equals the single-process one (float64: 1e-12 for the
deterministic solvers, identical top-k), a worker killed mid-run changes no
bit, a run to a directory resumes, and the guards name what is wrong. The
cluster is started once for the module and closed at its end; the last test
checks that no worker process outlives it.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
torch = pytest.importorskip("torch")
cloudpickle = pytest.importorskip("cloudpickle")

from influence_core import (  # noqa: E402
    EKFACIHVP,
    KFACIHVP,
    ArnoldiIHVP,
    ChunkRecomputedWarning,
    ConjugateGradientIHVP,
    ExactIHVP,
    FingerprintMismatchError,
    FirstOrderInfluenceCalculator,
    InfluenceModel,
    LissaIHVP,
    TracIn,
)
from influence_core.distributed import (  # noqa: E402
    ArrayShard,
    DistributedInfluence,
    ModelFactory,
    NpzShard,
    ShardedTrainingSet,
    shard_arrays,
)

# Workers import this module's functions by value (they cannot import tests/).
cloudpickle.register_pickle_by_value(sys.modules[__name__])

N, N_TEST, SHARD, BATCH = 400, 6, 100, 50
LOSS = functools.partial(torch.nn.CrossEntropyLoss, reduction="none")


def build() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()


def data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 8))
    return X, (X[:, 0] + 0.5 * X[:, 1] > 0).astype(np.int64) + (X[:, 2] > 1).astype(np.int64)


TRAIN, TEST = data(0, N), data(1, N_TEST)


def trained_model(steps: int = 60) -> InfluenceModel:
    torch.manual_seed(0)
    net = build()
    optimiser = torch.optim.SGD(net.parameters(), lr=0.5)
    X, y = torch.as_tensor(TRAIN[0]), torch.as_tensor(TRAIN[1])
    for _ in range(steps):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(net(X), y).backward()
        optimiser.step()
    return InfluenceModel(net, LOSS(), batch_size=BATCH)


@pytest.fixture(scope="module")
def client():
    import psutil

    before = {p.pid for p in psutil.Process().children(recursive=True)}
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    )
    client = distributed.Client(cluster)
    yield client
    client.close()
    cluster.close()
    leftover = [
        p
        for p in psutil.Process().children(recursive=True)
        if p.pid not in before
        and p.status() != psutil.STATUS_ZOMBIE  # the killed worker, not yet reaped
        and not _is_multiprocessing_helper(p)
    ]
    for p in leftover:  # reap what the close left (none expected), then fail below
        p.kill()
    assert not leftover, f"worker processes outlived the cluster: {leftover}"


def _is_multiprocessing_helper(process) -> bool:
    """multiprocessing's resource tracker: one per parent process, it exits with pytest."""
    return any("resource_tracker" in part for part in process.cmdline())


@pytest.fixture(scope="module")
def model() -> InfluenceModel:
    return trained_model()


@pytest.fixture(scope="module")
def factory(model) -> ModelFactory:
    return ModelFactory.from_model(model, build, LOSS)


def close(actual, expected, rtol: float = 1e-12) -> None:
    expected = np.asarray(expected)
    scale = np.max(np.abs(expected))
    assert np.max(np.abs(np.asarray(actual) - expected)) <= rtol * scale


def same_top_k(actual, expected) -> None:
    for name in ("proponents", "opponents"):
        np.testing.assert_array_equal(getattr(actual, name), getattr(expected, name).numpy())
    close(actual.proponent_scores, expected.proponent_scores.numpy())


SOLVERS = {
    "ekfac": lambda: EKFACIHVP(),
    "kfac-empirical": lambda: KFACIHVP(fisher="empirical", damping=1e-2),
    "exact-ggn": lambda: ExactIHVP(damping=1e-2, curvature="ggn"),
    "arnoldi": lambda: ArnoldiIHVP(rank=10, damping=1e-2, curvature="ggn"),
    # 28 iterations: each one map over the shards and a tree sum, the iterate on the driver
    "cg": lambda: ConjugateGradientIHVP(damping=1e-1, curvature="ggn", tol=1e-13, maxiter=300),
}


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_fit_and_scores_equal_the_single_process_run(client, model, factory, solver) -> None:
    def make(m, solver=solver):
        return FirstOrderInfluenceCalculator(m, SOLVERS[solver]())

    run = DistributedInfluence(client, factory, make).fit(shard_arrays(*TRAIN, SHARD))
    local = make(model).fit(TRAIN)
    close(run.influence(TEST).compute(), local.influence(TEST).numpy())
    same_top_k(run.top_k(TEST, k=5), local.top_k(TEST, k=5))
    if solver == "cg":  # per-point solves over the whole cluster are refused, by name
        with pytest.raises(ValueError, match="ConjugateGradientIHVP solves one block per"):
            run.self_influence()
        relatif = DistributedInfluence(
            client,
            factory,
            lambda m: FirstOrderInfluenceCalculator(m, SOLVERS["cg"](), normalize=True),
        ).fit(shard_arrays(*TRAIN, SHARD))
        with pytest.raises(ValueError, match="influence with ConjugateGradientIHVP solves"):
            relatif.top_k(TEST)
    else:
        close(run.self_influence(), local.self_influence().numpy())


def test_tracin_over_checkpoints_equals_the_single_process_run(client, model, factory) -> None:
    checkpoints = [trained_model(steps).weights_as_numpy() for steps in (5, 20, 60)]

    def make(m):
        return TracIn(m, checkpoints, learning_rates=[0.5, 0.5, 0.2])

    run = DistributedInfluence(client, factory, make).fit(shard_arrays(*TRAIN, SHARD))
    local = make(model).fit(TRAIN)
    close(run.self_influence(), local.self_influence().numpy())
    close(run.influence(TEST).compute(), local.influence(TEST).numpy())
    same_top_k(run.top_k(TEST, k=4), local.top_k(TEST, k=4))


def test_file_shards_and_uneven_shards_number_samples_globally(
    client, model, factory, tmp_path
) -> None:
    """Top-k indices and the true Fisher's seeded labels follow the global sample numbers."""
    X, y = TRAIN
    np.savez(tmp_path / "a.npz", X=X[:150], y=y[:150])
    shards = [NpzShard(str(tmp_path / "a.npz")), ArrayShard(X[150:], y[150:])]

    def make(m):
        return FirstOrderInfluenceCalculator(m, EKFACIHVP(batch_size=BATCH))

    run = DistributedInfluence(client, factory, make).fit(shards)
    local = make(model).fit(TRAIN)
    close(run.self_influence(), local.self_influence().numpy())
    same_top_k(run.top_k(TEST, k=5), local.top_k(TEST, k=5))


@dataclass(frozen=True, eq=False)
class KillsItsWorkerOnce(ArrayShard):
    """A shard whose first load kills the worker process loading it (SIGKILL), mid-run."""

    marker: str = ""

    def load(self):
        if not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().load()


def test_a_worker_killed_mid_run_changes_no_bit(client, factory, tmp_path) -> None:
    def make(m):
        return FirstOrderInfluenceCalculator(m, EKFACIHVP())

    shards = shard_arrays(*TRAIN, SHARD)
    uninterrupted = DistributedInfluence(client, factory, make).fit(shards)
    expected = uninterrupted.self_influence(), uninterrupted.top_k(TEST, k=5)

    marker = tmp_path / "killed"
    dying = list(shards)
    dying[2] = KillsItsWorkerOnce(shards[2].inputs, shards[2].targets, marker=str(marker))
    pids = set(client.run(os.getpid).values())
    run = DistributedInfluence(client, factory, make).fit(dying)  # the fit's first pass kills
    values, top = run.self_influence(), run.top_k(TEST, k=5)
    assert marker.exists() and int(marker.read_text()) in pids  # a worker did die
    client.wait_for_workers(2, timeout=60)
    assert set(client.run(os.getpid).values()) != pids  # and was replaced by its nanny
    np.testing.assert_array_equal(values, expected[0])
    for name in top._fields:
        np.testing.assert_array_equal(getattr(top, name), getattr(expected[1], name))


def test_scores_to_a_directory_resume_and_recompute_a_damaged_chunk(
    client, model, factory, tmp_path
) -> None:
    def make(m):
        return FirstOrderInfluenceCalculator(m, ExactIHVP(damping=1e-2, curvature="ggn"))

    run = DistributedInfluence(client, factory, make).fit(shard_arrays(*TRAIN, SHARD))
    first = run.influence_to_directory(TEST, tmp_path)
    assert run.computed_shards_ == [0, 1, 2, 3]
    close(first, make(model).fit(TRAIN).influence(TEST).numpy())
    again = run.influence_to_directory(TEST, tmp_path)
    assert run.computed_shards_ == []
    np.testing.assert_array_equal(again, first)
    (tmp_path / "chunks" / "chunk_000001.npz").write_bytes(b"damaged")
    with pytest.warns(ChunkRecomputedWarning, match="shard 1"):
        mended = run.influence_to_directory(TEST, tmp_path)
    assert run.computed_shards_ == [1]
    np.testing.assert_array_equal(mended, first)
    # Not assembled: the driver keeps no (n_test, n_train) array; the chunks hold the scores.
    elsewhere = tmp_path / "unassembled"
    assert run.influence_to_directory(TEST, elsewhere, assemble=False) is None
    chunks = sorted((elsewhere / "chunks").glob("chunk_*.npz"))
    np.testing.assert_array_equal(
        np.concatenate([np.load(c)["scores"] for c in chunks], axis=1), first
    )


def test_a_factory_that_does_not_reproduce_the_weights_is_refused(client, model) -> None:
    """No weights and a random build(): each worker's model differs from the driver's."""

    def random_build():
        return build()  # a fresh random initialisation in every process

    factory = ModelFactory(random_build, LOSS, batch_size=BATCH)
    run = DistributedInfluence(
        client, factory, lambda m: FirstOrderInfluenceCalculator(m, EKFACIHVP())
    )
    with pytest.raises(FingerprintMismatchError, match="other weights than the driver"):
        run.fit(shard_arrays(*TRAIN, SHARD))


def test_bad_shards_and_a_bad_k_are_refused_by_name(client, factory) -> None:
    X, y = TRAIN
    with pytest.raises(TypeError, match="Shard descriptors"):
        ShardedTrainingSet(client, factory, [(X, y)])
    with pytest.raises(ValueError, match=r"shard 1 .* holds no samples"):
        ShardedTrainingSet(client, factory, [ArrayShard(X, y), ArrayShard(X[:0], y[:0])])
    with pytest.raises(ValueError, match="at least one shard"):
        ShardedTrainingSet(client, factory, [])
    run = DistributedInfluence(
        client, factory, lambda m: FirstOrderInfluenceCalculator(m, EKFACIHVP())
    ).fit(shard_arrays(X, y, SHARD))
    with pytest.raises(ValueError, match="k must be ≥ 1"):
        run.top_k(TEST, k=0)


def test_sharded_data_is_never_iterated_on_the_driver(client, model, factory) -> None:
    training = ShardedTrainingSet(client, factory, shard_arrays(*TRAIN, SHARD))
    assert model.count(training) == N
    with pytest.raises(TypeError, match="iterated on its workers"):
        next(iter(model.batches(training)))
    lissa = LissaIHVP().fit(model, training)
    with pytest.raises(TypeError, match="iterated on its workers"):
        lissa.solve(model.get_parameters())  # LiSSA samples batches here: refused by name


def test_calculators_whose_fit_does_not_travel_are_refused(client, factory) -> None:
    from influence_core import RepresenterPointL2

    run = DistributedInfluence(client, factory, lambda m: RepresenterPointL2(m))
    with pytest.raises(TypeError, match="cannot be scored on workers"):
        run.fit(shard_arrays(*TRAIN, SHARD))
    with pytest.raises(TypeError, match="a recipe"):
        DistributedInfluence(client, factory, FirstOrderInfluenceCalculator(trained_model()))


@pytest.mark.parametrize("backend", ["torch", "tensorflow", "jax"])
def test_a_factory_rebuilds_the_model_of_every_framework_from_numpy(backend) -> None:
    """Pickled (as a worker receives it) and called, it gives the same model: weights and gradients."""
    if backend == "jax":
        pytest.importorskip("influence_jax")
        import jax

        jax.config.update("jax_enable_x64", True)
    from influence_conformance.cases import build_case, registered_builder
    from influence_conformance.reference_specs import SPECS
    from influence_core.io import weights_fingerprint

    case = build_case(backend, "convnet", "float64")
    spec, weights = SPECS["convnet"], [np.zeros_like(w) for w in case.weights]
    factory = ModelFactory(
        build=lambda: registered_builder(backend)(spec, weights, "float64").model,
        loss=lambda: registered_builder(backend)(spec, weights, "float64").loss_fn,
        weights=case.model.weights_as_numpy(),
        backend=backend,
    )
    rebuilt = cloudpickle.loads(cloudpickle.dumps(factory))()
    assert weights_fingerprint(rebuilt) == weights_fingerprint(case.model)
    batch = (case.X[:5], case.y[:5])
    np.testing.assert_array_equal(
        rebuilt.to_numpy(rebuilt.per_sample_grads(batch)),
        case.model.to_numpy(case.model.per_sample_grads(batch)),
    )
