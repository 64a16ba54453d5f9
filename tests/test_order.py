"""Epoch orders computed on demand, and the sampler walking them."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from dino_dist.data import sampler as sampler_module
from dino_dist.data.order import (FeistelPermutation, GlobalOrder, RandpermOrder, ShardWindowOrder,
                                  mix_key)
from dino_dist.data.sampler import ShardedEpochSampler

UNEVEN_SHARDS = [5, 0, 1, 17, 3, 0, 8, 1, 30, 2, 11]
PINNED_KEY = 1331644622195570841
PINNED_GLOBAL = [869, 369, 150, 801, 338, 161, 528, 112]
PINNED_SHARDS = [728, 631, 735, 725, 729, 630, 726, 736]


def is_permutation(values: np.ndarray, size: int) -> bool:
    return len(values) == size and np.array_equal(np.sort(values), np.arange(size))


def shard_of(order: ShardWindowOrder, indices: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.cumsum(order.shard_sizes), indices, side="right")


# ---------------------------------------------------------------- keys and the Feistel bijection

def test_mix_key_is_stable_and_separates_its_parts():
    assert mix_key(1, 2) == mix_key(1, 2)
    assert len({mix_key(1, 23), mix_key(12, 3), mix_key(1, 2, 3), mix_key(123), mix_key(-1)}) == 5
    assert 0 <= mix_key(7) < 2**64
    # Pinned: a change here silently changes every order, and runs resume on another one.
    assert mix_key(0, 0) == PINNED_KEY


@pytest.mark.parametrize("size", [0, 1, 2, 3, 5, 7, 16, 17, 1000, 4097, 65536 + 3])
def test_feistel_is_a_permutation(size):
    assert is_permutation(FeistelPermutation(size, key=mix_key(size))(np.arange(size)), size)


def test_feistel_is_a_permutation_of_ten_million_checked_in_chunks():
    size, chunk = 10**7, 1 << 21
    permutation = FeistelPermutation(size, key=12345)
    counts = np.zeros(size, dtype=np.int64)
    for start in range(0, size, chunk):
        out = permutation(np.arange(start, min(start + chunk, size)))
        assert out.dtype == np.int64 and out.min() >= 0 and out.max() < size
        counts += np.bincount(out, minlength=size)
    assert (counts == 1).all()


def test_feistel_is_pointwise_and_keeps_the_shape():
    permutation = FeistelPermutation(1000, key=3)
    whole = permutation(np.arange(1000))
    picked = np.array([[999, 0], [17, 500]])
    assert np.array_equal(permutation(picked), whole[picked])
    assert permutation(np.empty(0, dtype=np.int64)).shape == (0,)
    assert FeistelPermutation(0, key=1)(np.empty(0, dtype=np.int64)).shape == (0,)


@pytest.mark.parametrize("bad", [[-1], [10], [0, 3, 11]])
def test_feistel_rejects_positions_outside_its_range(bad):
    with pytest.raises(ValueError):
        FeistelPermutation(10, key=1)(np.array(bad))
    with pytest.raises(ValueError):
        FeistelPermutation(0, key=1)(np.array([0]))


def test_feistel_depends_on_its_key_and_nothing_else():
    positions = np.arange(5000)
    assert np.array_equal(FeistelPermutation(5000, 9)(positions), FeistelPermutation(5000, 9)(positions))
    assert not np.array_equal(FeistelPermutation(5000, 9)(positions), FeistelPermutation(5000, 10)(positions))


# ---------------------------------------------------------------- orders

def make_orders(seed: int) -> list:
    return [RandpermOrder(sum(UNEVEN_SHARDS), seed), GlobalOrder(sum(UNEVEN_SHARDS), seed),
            ShardWindowOrder(UNEVEN_SHARDS, window_shards=3, seed=seed)]


@pytest.mark.parametrize("which", range(3))
def test_orders_are_permutations_that_change_per_epoch_and_seed(which):
    n = sum(UNEVEN_SHARDS)
    order = make_orders(seed=4)[which]
    epoch1 = order.indices(1, 0, n)
    assert len(order) == n and epoch1.dtype == np.int64 and is_permutation(epoch1, n)
    assert not np.array_equal(epoch1, order.indices(2, 0, n))
    assert not np.array_equal(epoch1, make_orders(seed=5)[which].indices(1, 0, n))
    assert np.array_equal(epoch1, make_orders(seed=4)[which].indices(1, 0, n))


@pytest.mark.parametrize("which", range(3))
def test_orders_answer_any_chunk_the_same_as_the_whole_epoch(which):
    n = sum(UNEVEN_SHARDS)
    order = make_orders(seed=2)[which]
    whole = order.indices(3, 0, n)
    cuts = [0, 1, 1, 7, 8, 40, 41, 77, n]
    chunks = [make_orders(seed=2)[which].indices(3, a, b) for a, b in zip(cuts, cuts[1:])]
    assert np.array_equal(np.concatenate(chunks), whole)
    with pytest.raises(ValueError):
        order.indices(3, 5, n + 1)


def test_orders_are_pinned():
    # A change to any of these changes the order of every run, so none could resume mid-epoch.
    assert GlobalOrder(1000, seed=0).indices(0, 0, 8).tolist() == PINNED_GLOBAL
    assert ShardWindowOrder([10] * 100, 4, seed=0).indices(1, 0, 8).tolist() == PINNED_SHARDS


def test_randperm_order_is_torch_randperm_of_seed_plus_epoch():
    expected = torch.randperm(300, generator=torch.Generator().manual_seed(7 + 2)).numpy()
    assert np.array_equal(RandpermOrder(300, seed=7).indices(2, 0, 300), expected)
    assert np.array_equal(RandpermOrder(300, seed=7, shuffle=False).indices(2, 10, 20), np.arange(10, 20))


def test_shard_window_order_reads_at_most_k_shards_per_window():
    order = ShardWindowOrder(UNEVEN_SHARDS * 3, window_shards=3, seed=1)
    for epoch in range(4):
        ends = order.window_ends(epoch)
        assert len(ends) == -(-len(UNEVEN_SHARDS * 3) // 3) and ends[-1] == len(order)
        for start, stop in zip(np.concatenate([[0], ends[:-1]]), ends):
            shards = shard_of(order, order.indices(epoch, start, stop))
            assert len(np.unique(shards)) <= 3
            # A window holds whole shards: every sample of each shard it touches.
            assert stop - start == order.shard_sizes[np.unique(shards)].sum()


def test_shard_window_order_shuffles_shards_and_samples_within_windows():
    sizes = [100] * 40
    order = ShardWindowOrder(sizes, window_shards=4, seed=0)
    first = order.indices(0, 0, 400)
    assert len(np.unique(shard_of(order, first))) == 4
    assert not np.array_equal(np.sort(np.unique(shard_of(order, first))), np.arange(4))
    assert not np.array_equal(first, np.sort(first))
    single = ShardWindowOrder(sizes, window_shards=1, seed=0).indices(0, 0, 100)
    assert len(np.unique(shard_of(order, single))) == 1 and not np.array_equal(single, np.sort(single))


@pytest.mark.parametrize("sizes", [[], [0], [0, 0], [1], [0, 1, 0], [3, 0, 0, 0, 2]])
def test_shard_window_order_handles_tiny_and_empty_shards(sizes):
    for window_shards in (1, 2, 5):
        order = ShardWindowOrder(sizes, window_shards, seed=3)
        assert is_permutation(order.indices(0, 0, len(order)), sum(sizes))


def test_global_order_batches_hold_every_class_in_roughly_even_counts():
    n, classes, batch = 10**5, 10, 256
    order = GlobalOrder(n, seed=0)
    for epoch in range(2):
        labels = order.indices(epoch, 0, 20 * batch) // (n // classes)
        for k in range(20):
            counts = np.bincount(labels[k * batch:(k + 1) * batch], minlength=classes)
            # Expected 25.6 each, standard deviation about 4.8.
            assert counts.min() >= 8 and counts.max() <= 50


def peak_bytes(order, epoch: int, start: int) -> int:
    tracemalloc.start()
    try:
        order.indices(epoch, start, start + (1 << 16))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_of_a_chunk_does_not_grow_with_the_dataset():
    mb = 1 << 20
    small = peak_bytes(GlobalOrder(10**6, seed=0), 0, 500_000)
    huge = peak_bytes(GlobalOrder(10**9, seed=0), 0, 5 * 10**8)
    assert huge < 6 * mb and small < 6 * mb and huge < small + mb


def test_memory_of_shard_windows_grows_with_shards_only():
    mb = 1 << 20
    small = ShardWindowOrder([10**4] * 100, window_shards=8, seed=0)  # 10^6 samples
    huge = ShardWindowOrder([10**4] * 10**5, window_shards=8, seed=0)  # 10^9 samples
    # The first chunk of an epoch also builds its shard order: O(shards), a few bytes a shard.
    assert peak_bytes(small, 0, 500_000) < 6 * mb and peak_bytes(huge, 0, 5 * 10**8) < 8 * mb
    assert peak_bytes(huge, 0, 7 * 10**8) < peak_bytes(small, 0, 0) + mb


# ---------------------------------------------------------------- the sampler over an order

def sampler_indices(n, replicas, rank, seed, order, epoch, consumed=0) -> list[int]:
    sampler = ShardedEpochSampler(n, replicas, rank, seed, order=order)
    sampler.set_epoch(epoch, consumed)
    keys = list(sampler)
    assert len(keys) == len(sampler) and all(e == epoch for e, _ in keys)
    assert all(type(i) is int for _, i in keys[:3])
    return [i for _, i in keys]


def order_for(kind: str, n: int, seed: int):
    if kind == "global":
        return GlobalOrder(n, seed)
    sizes = [n // 7] * 7
    sizes[0] += n - sum(sizes)
    return ShardWindowOrder(sizes, window_shards=2, seed=seed)


@pytest.fixture(params=[1 << 16, 5, 6])
def chunk(request, monkeypatch):
    """Small chunks make the sampler cross many chunk boundaries, aligned with ranks and not."""
    monkeypatch.setattr(sampler_module, "CHUNK_POSITIONS", request.param)
    return request.param


@pytest.mark.parametrize("kind", ["global", "shards"])
@pytest.mark.parametrize("replicas, consumed", [(1, 0), (3, 0), (4, 9), (2, 1)])
def test_sampler_deals_the_order_round_robin(chunk, kind, replicas, consumed):
    n, seed, epoch = 103, 6, 2
    expected = order_for(kind, n, seed).indices(epoch, 0, n)[consumed:]
    expected = expected[:len(expected) // replicas * replicas]
    for rank in range(replicas):
        got = sampler_indices(n, replicas, rank, seed, order_for(kind, n, seed), epoch, consumed)
        assert got == expected[rank::replicas].tolist()


@pytest.mark.parametrize("kind", ["global", "shards"])
def test_sampler_batches_over_ranks_match_one_rank_batches(chunk, kind):
    n, seed, replicas, b = 101, 3, 3, 4
    single = sampler_indices(n, 1, 0, seed, order_for(kind, n, seed), epoch=1)
    per_rank = [sampler_indices(n, replicas, r, seed, order_for(kind, n, seed), epoch=1)
                for r in range(replicas)]
    for k in range(len(per_rank[0]) // b):
        union = [i for r in range(replicas) for i in per_rank[r][k * b:(k + 1) * b]]
        assert sorted(union) == sorted(single[k * replicas * b:(k + 1) * replicas * b])


@pytest.mark.parametrize("kind", ["global", "shards"])
@pytest.mark.parametrize("old_world, new_world, consumed", [(2, 3, 8), (3, 2, 9), (4, 1, 12)])
def test_sampler_resumes_on_another_world_size_without_repeat_or_gap(chunk, kind, old_world, new_world,
                                                                      consumed):
    n, seed, epoch = 97, 8, 4
    order = order_for(kind, n, seed).indices(epoch, 0, n).tolist()
    before = [sampler_indices(n, old_world, r, seed, order_for(kind, n, seed), epoch)
              for r in range(old_world)]
    seen = [before[r][k] for k in range(consumed // old_world) for r in range(old_world)]
    after = [sampler_indices(n, new_world, r, seed, order_for(kind, n, seed), epoch, consumed)
             for r in range(new_world)]
    rest = [after[r][k] for k in range(len(after[0])) for r in range(new_world)]
    assert seen + rest == order[:consumed + len(rest)]
    assert n - consumed - len(rest) < new_world


@pytest.mark.parametrize("replicas, consumed", [(1, 0), (2, 0), (3, 7)])
def test_default_order_is_the_original_randperm(chunk, replicas, consumed):
    n, seed, epoch = 211, 13, 5
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))[consumed:]
    used = (n - consumed) // replicas * replicas
    for rank in range(replicas):
        sampler = ShardedEpochSampler(n, replicas, rank, seed)
        sampler.set_epoch(epoch, consumed)
        assert [i for _, i in sampler] == perm[:used][rank::replicas].tolist()
        whole = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        assert torch.equal(sampler.epoch_permutation(epoch), whole)
    unshuffled = ShardedEpochSampler(n, 1, 0, seed, shuffle=False)
    assert [i for _, i in unshuffled] == list(range(n))


def test_sampler_rejects_an_order_of_another_length():
    with pytest.raises(ValueError):
        ShardedEpochSampler(10, 1, 0, seed=0, order=GlobalOrder(11, seed=0))
    with pytest.raises(ValueError):
        ShardedEpochSampler(10, 1, 0, seed=0, shuffle=False, order=GlobalOrder(10, seed=0))
