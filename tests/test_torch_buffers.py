"""The torch backend's patch buffers: reused over a pass, never while held, freed with the pass.

Each guard is also run broken (a mutant, through ``monkeypatch``) to show the
test would see it fail: a pool that never reuses, one that ignores who holds a
buffer, one that the kernels keep alive.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import influence_torch.buffers as buffers
from influence_core import InfluenceModel
from influence_torch.layers import conv2d_patches


def conv_model() -> InfluenceModel:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1, stride=2),  # a zero border the pool must keep
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 3),
    ).double()
    return InfluenceModel(net, torch.nn.CrossEntropyLoss(reduction="none"), batch_size=6)


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(6, 3, 8, 8, dtype=torch.float64, generator=generator)
    return X, torch.randint(0, 3, (6,), generator=generator)


def patches(model: InfluenceModel, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The convolution's patches as the statistics give them."""
    return model.kernels.layer_statistics(*data)["0"][0]


def fresh_patches(model: InfluenceModel, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return conv2d_patches(model.kernels.module[0], data[0])


def pass_of_three(model: InfluenceModel) -> tuple[list[int], set[int]]:
    """A pass as the solvers make it: each batch's statistics held while the next is computed.

    Returns where each batch's patches were, and where the pool's patch buffers are.
    """
    pointers, held = [], None
    for seed in range(3):
        stats = model.kernels.layer_statistics(*batch(seed))
        pointers.append(stats["0"][0].data_ptr())
        assert torch.equal(stats["0"][0], fresh_patches(model, batch(seed)))
        held = stats  # the previous batch's statistics are released only now
    pooled = {
        buffer.data_ptr()
        for slot, kept in held.pool._buffers.items()
        if slot[0][1] == "patches"
        for buffer in kept
    }
    return pointers, pooled


def test_a_pass_alternates_two_buffers_and_a_reused_one_keeps_its_zero_border() -> None:
    (first, second, third), pooled = pass_of_three(conv_model())
    assert first != second  # the first batch's statistics were still held
    assert third == first  # released by then: its buffer again, values equal to fresh patches
    assert pooled == {first, second}  # the pool's two buffers, alive: no address reused by chance


def test_a_pool_that_never_reuses_fails_the_test_above(monkeypatch) -> None:
    def never(self, key, shape, like):
        return like.new_empty(shape), False

    monkeypatch.setattr(buffers.BufferPool, "take", never)
    (first, _, _), pooled = pass_of_three(conv_model())
    assert first not in pooled


def test_statistics_still_held_are_never_overwritten() -> None:
    model = conv_model()
    kept = [model.kernels.layer_statistics(*batch(seed)) for seed in range(3)]
    for seed, stats in enumerate(kept):
        assert torch.equal(stats["0"][0], fresh_patches(model, batch(seed)))
    assert len({stats["0"][0].data_ptr() for stats in kept}) == 3


def test_ignoring_who_holds_a_buffer_would_overwrite_held_statistics(monkeypatch) -> None:
    monkeypatch.setattr(buffers, "_use_count", lambda tensor: 1)  # every buffer looks free
    model = conv_model()
    kept = [model.kernels.layer_statistics(*batch(seed)) for seed in range(2)]
    assert not torch.equal(kept[0]["0"][0], fresh_patches(model, batch(0)))


def test_the_pool_goes_with_the_last_statistics_of_its_pass() -> None:
    model = conv_model()
    stats = model.kernels.layer_statistics(*batch(0))
    pool = weakref.ref(stats.pool)
    del stats
    gc.collect()
    assert pool() is None  # the kernels hold it weakly: nothing stays allocated between calls
    assert model.kernels.layer_statistics(*batch(1)).pool is not None  # a new pass, a new pool


def test_kernels_that_held_their_pool_fail_the_test_above(monkeypatch) -> None:
    kept = []
    original = buffers.current_pool

    def holding(owner):
        pool = original(owner)
        kept.append(pool)
        return pool

    monkeypatch.setattr("influence_torch.model.current_pool", holding)
    model = conv_model()
    stats = model.kernels.layer_statistics(*batch(0))
    pool = weakref.ref(stats.pool)
    del stats
    gc.collect()
    assert pool() is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_buffer_is_handed_out_again_only_for_the_same_key_shape_and_dtype(dtype) -> None:
    pool, like = buffers.BufferPool(), torch.empty((), dtype=dtype)
    buffer, reused = pool.take("a", (2, 3), like)
    pointer = buffer.data_ptr()
    del buffer
    assert not reused
    again, reused = pool.take("a", (2, 3), like)
    assert reused and again.data_ptr() == pointer and again.dtype == dtype
    del again  # free again: only the key, the shape or the dtype keeps it from the next
    assert not pool.take("b", (2, 3), like)[1]  # another key
    assert not pool.take("a", (3, 2), like)[1]  # another shape
    other = torch.float64 if dtype == torch.float32 else torch.float32
    assert not pool.take("a", (2, 3), torch.empty((), dtype=other))[1]
