"""A distributed sampler that can resume in the middle of an epoch."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ShardedEpochSampler(Sampler[tuple[int, int]]):
    """Yields (epoch, index) keys for this rank.

    Each epoch shuffles all indices with a generator seeded by seed + epoch (the
    same on every rank), drops the tail that does not divide by num_replicas
    (never pads, so no sample is seen twice), and deals the rest round-robin:
    rank r takes perm[r::num_replicas]. Because of the round-robin deal, the k-th
    batch of size b summed over R ranks holds exactly the indices of the k-th
    batch of size R*b on a single rank.
    """

    def __init__(self, dataset_len: int, num_replicas: int, rank: int, seed: int, shuffle: bool = True) -> None:
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        if dataset_len < 0:
            raise ValueError(f"dataset_len must not be negative, got {dataset_len}")
        self.dataset_len = dataset_len
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.samples_per_rank = dataset_len // num_replicas
        self.epoch = 0
        self.consumed = 0

    def set_epoch(self, epoch: int, consumed: int = 0) -> None:
        """Select the epoch to iterate, skipping the first `consumed` samples of its global order.

        `consumed` counts samples of all ranks together, so a run resumed on another number of
        ranks continues exactly where the old ranks stopped: the rest of the permutation is
        dealt round-robin to the new ranks, and no sample of the epoch repeats.
        """
        if not 0 <= consumed <= self.dataset_len:
            raise ValueError(f"consumed must be in [0, {self.dataset_len}], got {consumed}")
        self.epoch = epoch
        self.consumed = consumed

    def epoch_permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.dataset_len)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.dataset_len, generator=generator)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rest = self.epoch_permutation(self.epoch)[self.consumed :]
        used = len(self) * self.num_replicas
        epoch = self.epoch
        for index in rest[:used][self.rank :: self.num_replicas].tolist():
            yield epoch, index

    def __len__(self) -> int:
        """This rank's samples left in the epoch."""
        return (self.dataset_len - self.consumed) // self.num_replicas
