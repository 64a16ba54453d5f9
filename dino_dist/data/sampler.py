"""A distributed sampler that can resume in the middle of an epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from .order import EpochOrder, RandpermOrder

# Positions of the global order computed at a time: enough to amortise numpy's per-call cost,
# small enough (a few MB of temporaries) that memory does not grow with the dataset.
CHUNK_POSITIONS = 1 << 16


class ShardedEpochSampler(Sampler[tuple[int, int]]):
    """Yields (epoch, index) keys for this rank.

    Each epoch visits all indices in one global order, the same on every rank: by default
    torch.randperm seeded by seed + epoch (RandpermOrder), or any EpochOrder given as `order`
    (e.g. GlobalOrder or ShardWindowOrder, which never materialise the epoch). The sampler
    drops the tail that does not divide by num_replicas (never pads, so no sample is seen
    twice), and deals the rest round-robin: rank r takes positions r, r + num_replicas, ...
    Because of the round-robin deal, the k-th batch of size b summed over R ranks holds exactly
    the indices of the k-th batch of size R*b on a single rank.
    """

    def __init__(self, dataset_len: int, num_replicas: int, rank: int, seed: int, shuffle: bool = True,
                 order: EpochOrder | None = None) -> None:
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        if dataset_len < 0:
            raise ValueError(f"dataset_len must not be negative, got {dataset_len}")
        if order is None:
            order = RandpermOrder(dataset_len, seed, shuffle)
        elif not shuffle:
            raise ValueError("shuffle=False selects the default order; it cannot apply to a given order")
        elif len(order) != dataset_len:
            raise ValueError(f"the order covers {len(order)} samples, the dataset has {dataset_len}")
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.order = order
        self.samples_per_rank = dataset_len // num_replicas
        self.epoch = 0
        self.consumed = 0

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        """Select the epoch to iterate, skipping the first `consumed` samples of its global order.

        `consumed` counts samples of all ranks together, so a run resumed on another number of
        ranks continues exactly where the old ranks stopped: the rest of the global order is
        dealt round-robin to the new ranks, and no sample of the epoch repeats.
        """
        if not 0 <= consumed <= self.dataset_len:
            raise ValueError(f"consumed must be in [0, {self.dataset_len}], got {consumed}")
        self.epoch = epoch
        self.consumed = consumed

    def epoch_permutation(self, epoch: int) -> torch.Tensor:
        """The whole global order of `epoch` (materialised: for small datasets and tests)."""
        return torch.from_numpy(self.order.indices(epoch, 0, self.dataset_len))

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, rank, replicas = self.epoch, self.rank, self.num_replicas
        end = self.consumed + len(self) * replicas
        # A whole number of deals per chunk keeps every chunk starting on this rank's stride.
        step = replicas * max(1, CHUNK_POSITIONS // replicas)
        for start in range(self.consumed, end, step):
            chunk = self.order.indices(epoch, start, min(start + step, end))
            for index in chunk[rank::replicas].tolist():
                yield epoch, index

    def __len__(self) -> int:
        """This rank's samples left in the epoch."""
        return (self.dataset_len - self.consumed) // self.num_replicas
