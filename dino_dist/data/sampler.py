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
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch to iterate; skip this rank's first `start` samples (to resume)."""
        if not 0 <= start <= self.samples_per_rank:
            raise ValueError(f"start must be in [0, {self.samples_per_rank}], got {start}")
        self.epoch = epoch
        self.start = start

    def epoch_permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.dataset_len)
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.dataset_len, generator=generator)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        used = self.samples_per_rank * self.num_replicas
        mine = self.epoch_permutation(self.epoch)[:used][self.rank :: self.num_replicas]
        epoch = self.epoch
        for index in mine[self.start :].tolist():
            yield epoch, index

    def __len__(self) -> int:
        return self.samples_per_rank - self.start
