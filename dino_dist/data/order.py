"""Epoch orders computed on demand from (seed, epoch, position).

A materialised permutation of a 1B-sample dataset costs 8 GB on every rank. The orders here
(except RandpermOrder, kept for folder datasets) answer "which dataset index sits at epoch
positions [start, stop)" with vectorised numpy in memory that depends on the chunk asked for
(and, for ShardWindowOrder, on the shard count), never on the number of samples.

How well an order mixes matters to DINO: the teacher's output is centred with a running mean
over batches, which assumes every batch is a fair draw of the whole dataset. GlobalOrder gives
that; ShardWindowOrder gives it only when each shard is itself a shuffled mix of classes.
"""

from __future__ import annotations

import abc
import hashlib
import operator
from collections.abc import Sequence

import numpy as np
import torch

_U64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def mix_key(*parts: int) -> int:
    """A stable 64-bit key from integers, the same in every process and Python version.

    Python's hash() is salted per process for some types and free to change between versions;
    every rank and every resumed run must derive the very same order, so a real hash is used.
    Each part takes a fixed 16 bytes, so (1, 23) and (12, 3) cannot collide by concatenation.
    """
    data = b"".join(operator.index(p).to_bytes(16, "little", signed=True) for p in parts)
    digest = hashlib.blake2b(data, digest_size=8, person=b"dino_dist.order").digest()
    return int.from_bytes(digest, "little")


def _splitmix64(x: int) -> int:
    """SplitMix64's finaliser on one Python int (for deriving round keys)."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _U64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _U64
    return x ^ (x >> 31)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, in place on a uint64 array; wraparound is the point."""
    with np.errstate(over="ignore"):
        z ^= z >> _S30
        z *= _MIX1
        z ^= z >> _S27
        z *= _MIX2
        z ^= z >> _S31
    return z


class FeistelPermutation:
    """A keyed bijection of [0, size), evaluated pointwise without a table.

    A balanced Feistel network over 2h bits (the fewest with 2^(2h) >= size) is a bijection of
    [0, 2^(2h)) whatever its round function; cycle-walking (re-applying it while the result is
    >= size) restricts it to a bijection of [0, size). Since 2^(2h) < 4 * size, fewer than four
    applications are needed on average. Six rounds of a 64-bit mixing hash make the output look
    like a uniform random permutation for shuffling purposes (not for cryptography).
    """

    def __init__(self, size: int, key: int, rounds: int = 6) -> None:
        if size < 0:
            raise ValueError(f"size must not be negative, got {size}")
        if rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {rounds}")
        self.size = size
        self.half_bits = max(1, (max(size - 1, 0).bit_length() + 1) // 2)
        self._mask = np.uint64((1 << self.half_bits) - 1)
        self._shift = np.uint64(self.half_bits)
        state = key & _U64
        keys = []
        for _ in range(rounds):
            state = (state + _GOLDEN) & _U64
            keys.append(np.uint64(_splitmix64(state)))
        self._round_keys = keys

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._shift, x & self._mask
        for round_key in self._round_keys:
            mixed = _mix64(right ^ round_key)
            left, right = right, left ^ (mixed & self._mask)
        return (left << self._shift) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        positions = np.asarray(positions)
        if positions.size and positions.dtype.kind not in "iu":
            raise ValueError(f"positions must be integers, got dtype {positions.dtype}")
        flat = positions.astype(np.int64, copy=False).ravel()
        if flat.size and (flat.min() < 0 or flat.max() >= self.size):
            raise ValueError(f"positions must be in [0, {self.size})")
        out = self._encrypt(flat.astype(np.uint64))
        outside = np.flatnonzero(out >= self.size)
        while outside.size:
            out[outside] = self._encrypt(out[outside])
            outside = outside[out[outside] >= self.size]
        return out.astype(np.int64).reshape(positions.shape)


class EpochOrder(abc.ABC):
    """The order in which an epoch visits a dataset: position -> dataset index, per epoch."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """The dataset's length (every epoch visits each index once)."""

    @abc.abstractmethod
    def indices(self, epoch: int, start: int, stop: int) -> np.ndarray:
        """The int64 dataset indices at positions [start, stop) of `epoch`'s order."""

    def _check_range(self, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= len(self):
            raise ValueError(f"positions [{start}, {stop}) are not within [0, {len(self)}]")


class RandpermOrder(EpochOrder):
    """torch.randperm seeded by seed + epoch: the sampler's original order, bit for bit.

    Folder datasets keep it so that existing checkpoints resume on the very order they were
    trained on. It materialises the epoch (8 bytes a sample), which is fine at folder scale.
    shuffle=False visits the indices in order.
    """

    def __init__(self, dataset_len: int, seed: int, shuffle: bool = True) -> None:
        if dataset_len < 0:
            raise ValueError(f"dataset_len must not be negative, got {dataset_len}")
        self.dataset_len = dataset_len
        self.seed = seed
        self.shuffle = shuffle
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.dataset_len

    def _permutation(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._cached = epoch, torch.randperm(self.dataset_len, generator=generator).numpy()
        return self._cached[1]

    def indices(self, epoch: int, start: int, stop: int) -> np.ndarray:
        self._check_range(start, stop)
        if not self.shuffle:
            return np.arange(start, stop, dtype=np.int64)
        # A copy, so that a caller writing into the result cannot corrupt the cached epoch.
        return self._permutation(epoch)[start:stop].copy()


class GlobalOrder(EpochOrder):
    """A fresh uniform-looking permutation of the whole dataset every epoch.

    Every sample can land at any position, so every batch is a fair draw of the dataset, the
    best mixing for DINO's centering. Consecutive positions read scattered samples: meant for
    storage that serves any read equally fast (S3 ranged GETs, local NVMe).
    """

    def __init__(self, dataset_len: int, seed: int) -> None:
        if dataset_len < 0:
            raise ValueError(f"dataset_len must not be negative, got {dataset_len}")
        self.dataset_len = dataset_len
        self.seed = seed

    def __len__(self) -> int:
        return self.dataset_len

    def indices(self, epoch: int, start: int, stop: int) -> np.ndarray:
        self._check_range(start, stop)
        permutation = FeistelPermutation(self.dataset_len, mix_key(self.seed, epoch))
        return permutation(np.arange(start, stop, dtype=np.int64))


class ShardWindowOrder(EpochOrder):
    """Shuffled shards, read `window_shards` at a time, samples shuffled within each window.

    Each epoch permutes the shard order, groups consecutive shuffled shards into windows of
    `window_shards` and permutes the samples inside each window. Reading an epoch thus keeps
    only K = window_shards shards open at a time (streaming reads, good for spinning disks and
    HDD-backed NFS), but mixing is limited to K shards: a batch holds samples of at most K
    shards (2K where it straddles two windows). DINO's centering wants batches that are fair
    draws of the dataset, so shards must themselves be shuffled mixes of classes, as
    `dino-shard` writes them; shards written class by class would give one-class batches.

    Dataset index of sample j of shard s is shard_start[s] + j, shards in their given order.
    Memory is O(number of shards) for the epoch's shard order, never O(samples).
    """

    def __init__(self, shard_sizes: Sequence[int], window_shards: int, seed: int) -> None:
        sizes = np.asarray(shard_sizes, dtype=np.int64).reshape(-1)
        if sizes.size and sizes.min() < 0:
            raise ValueError("shard sizes must not be negative")
        if window_shards < 1:
            raise ValueError(f"window_shards must be at least 1, got {window_shards}")
        self.shard_sizes = sizes
        self.shard_starts = np.cumsum(sizes) - sizes
        self.window_shards = window_shards
        self.seed = seed
        self.dataset_len = int(sizes.sum())
        self._cached: tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None

    def __len__(self) -> int:
        return self.dataset_len

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shuffled shard ids, position end of each, position end of each window)."""
        if self._cached is None or self._cached[0] != epoch:
            count = len(self.shard_sizes)
            # Feistel rather than numpy's Generator: its streams may change between numpy
            # versions, and a run resumed mid-epoch after an upgrade must keep the same order.
            shards = FeistelPermutation(count, mix_key(self.seed, epoch, 1))(np.arange(count))
            slot_ends = np.cumsum(self.shard_sizes[shards])
            last_slots = np.minimum(np.arange(self.window_shards - 1, count + self.window_shards - 1,
                                              self.window_shards), count - 1)
            self._cached = epoch, (shards, slot_ends, slot_ends[last_slots])
        return self._cached[1]

    def window_ends(self, epoch: int) -> np.ndarray:
        """The end position of each window of `epoch` (window w spans [ends[w-1], ends[w]))."""
        return self._epoch_plan(epoch)[2].copy()

    def _window_positions(self, epoch: int, window_ends: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Positions [start, stop) permuted within their windows (still in shuffled-shard space)."""
        parts = [np.empty(0, dtype=np.int64)]
        position = start
        while position < stop:
            window = int(np.searchsorted(window_ends, position, side="right"))
            window_start = int(window_ends[window - 1]) if window else 0
            window_end = int(window_ends[window])
            end = min(stop, window_end)
            permutation = FeistelPermutation(window_end - window_start, mix_key(self.seed, epoch, 2, window))
            local = np.arange(position - window_start, end - window_start, dtype=np.int64)
            parts.append(window_start + permutation(local))
            position = end
        return np.concatenate(parts)

    def indices(self, epoch: int, start: int, stop: int) -> np.ndarray:
        self._check_range(start, stop)
        shards, slot_ends, window_ends = self._epoch_plan(epoch)
        spot = self._window_positions(epoch, window_ends, start, stop)
        # side="right" skips empty shards, whose end equals their predecessor's.
        slot = np.searchsorted(slot_ends, spot, side="right")
        shard = shards[slot]
        within = spot - (slot_ends[slot] - self.shard_sizes[shard])
        return self.shard_starts[shard] + within
