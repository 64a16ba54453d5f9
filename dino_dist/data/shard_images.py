"""The images of a shard set, read one sample at a time by byte range.

A DataLoader batch arrives as one list of positions (`prefetch`), so its byte ranges are
fetched together on a few threads: remote reads overlap instead of paying one round trip
after another, and decoding starts when they are in.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property

import numpy as np
import torch

from .images import ImageSet, decode_bytes
from .shard_set import ShardSet
from .shard_store import RETRY_S

READ_THREADS = 16  # concurrent ranged reads per loader process


class ShardImages(ImageSet):
    def __init__(self, path: str, cache_dir: str | None = None, read_threads: int = READ_THREADS,
                 retry_s: float = RETRY_S) -> None:
        super().__init__()
        self.root = path
        self.shards = ShardSet.open(path, cache_dir, retry_s)
        self.read_threads = read_threads
        self._fetched: dict[int, bytes] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = -1

    def __getstate__(self) -> dict:
        # A spawned loader process gets the set, not this process's threads or fetched bytes.
        state = dict(self.__dict__)
        state.update(_fetched={}, _pool=None, _pool_pid=-1)
        return state

    def __len__(self) -> int:
        return len(self.shards)

    def decode(self, position: int) -> torch.Tensor:
        data = self._fetched.pop(position, None)
        return decode_bytes(data if data is not None else self.shards.read_image_bytes(position))

    def label(self, position: int) -> int:
        return self.shards.label(position)

    def name(self, position: int) -> str:
        return self.shards.name(position)

    @cached_property
    def labels(self) -> np.ndarray:
        """All labels in dataset order: one pass over the index, so only for evaluation sets."""
        return self.shards.labels()

    @cached_property
    def classes(self) -> list[str]:
        if self.shards.index.classes is not None:
            return list(self.shards.index.classes)
        labelled = self.labels[self.labels >= 0]
        return [str(c) for c in range(int(labelled.max()) + 1)] if len(labelled) else []

    @property
    def identity(self) -> list[str]:
        """The location and a digest of the selected shards' index rows: a shard rewritten
        with other images changes their sizes (one pass over the rows: for evaluation sets)."""
        index = self.shards.index
        digest = hashlib.sha256()
        for i in self.shards.shard_ids:
            shard = index.shards[i]
            digest.update(json.dumps([shard.name, shard.bytes, shard.samples]).encode())
            rows = slice(int(index.shard_starts[i]), int(index.shard_starts[i + 1]))
            digest.update(np.ascontiguousarray(index.samples[rows]).tobytes())
        return [self.shards.store.location, digest.hexdigest()]

    def prefetch(self, positions: Sequence[int]) -> None:
        self._fetched = {}  # what an earlier batch left (a failed one) is not read again
        wanted = list(dict.fromkeys(positions))
        if len(wanted) < 2 or self.read_threads < 2:
            return
        for position, data in zip(wanted, self._threads().map(self.shards.read_image_bytes, wanted)):
            self._fetched[position] = data

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None or self._pool_pid != os.getpid():  # threads do not survive a fork
            self._pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="shard-read")
            self._pool_pid = os.getpid()
        return self._pool
