"""A shard set named by data.path: its store, the shards it selects and their indexed samples.

data.path names a shard set as a folder holding `.tar` shards (local or NFS), a brace pattern
of shard names in one folder (`/data/laion/{000000..012345}.tar`), or an `s3://bucket/prefix`
(optionally ending in a pattern). Everything that can be wrong with it (no index, a stale
index, a missing shard) is found here, when the run starts, before the first step.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dino_dist.errors import DataError

from .folder import is_image
from .shard_index import INDEX_DIR, ShardIndex, read_index
from .shard_store import RETRY_S, SHARD_SUFFIX, LocalStore, S3Store, is_remote, open_store

_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """`a{00..02}b{x,y}` -> a00bx, a00by, a01bx, ... (ranges keep the zero padding of their start)."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[:match.start()], pattern[match.end():]
    body = match.group(1)
    numbers = _RANGE.match(body)
    if numbers:
        first, last = numbers.groups()
        width = len(first) if first.startswith("0") else 0
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + 1)]
        if not choices:
            raise DataError(f"the range {{{body}}} in '{pattern}' is empty: write it low..high")
    else:
        choices = body.split(",")
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def looks_like_shard_set(path: str) -> bool:
    """True when data.path names shards: s3://, a .tar pattern, a folder with a shard index,
    or a folder holding only .tar files (an image folder with a stray archive stays a folder)."""
    if is_remote(path) or path.endswith(SHARD_SUFFIX) or "{" in path:
        return True
    folder = Path(path).expanduser()
    if (folder / INDEX_DIR).is_dir():
        return True
    if not folder.is_dir():
        return False
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    return any(p.suffix == SHARD_SUFFIX for p in entries) and not any(
        p.is_dir() or is_image(p) for p in entries)


def split_location(path: str) -> tuple[str, str | None]:
    """(folder or prefix, shard-name pattern or None for every indexed shard)."""
    trimmed = path.rstrip("/")
    head, _, last = trimmed.rpartition("/")
    if last.endswith(SHARD_SUFFIX) or "{" in last:
        if "{" in head:
            raise DataError(f"data.path '{path}': braces may only select shard names inside one "
                            "folder, e.g. /data/set/{000000..000099}.tar")
        return head or ".", last
    return trimmed, None


@dataclass
class ShardSet:
    """The selected shards of an indexed set; dataset position i is a row of the index."""

    store: LocalStore | S3Store
    index: ShardIndex
    shard_ids: np.ndarray  # positions in index.shards of the selected shards, in order
    starts: np.ndarray  # dataset position of each selected shard's first sample, plus the total

    @classmethod
    def open(cls, path: str, cache_dir: str | None = None, retry_s: float = RETRY_S) -> "ShardSet":
        location, pattern = split_location(path)
        store = open_store(location, retry_s)
        index = read_index(store, cache_dir)
        names = [s.name for s in index.shards]
        chosen = _choose(names, pattern, path)
        _check_present(store, index, chosen)
        counts = np.array([index.shards[i].samples for i in chosen], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)])
        if starts[-1] == 0:
            raise DataError(f"data.path '{path}' selects shards without any image: check the pattern "
                            "or re-index the shards")
        return cls(store, index, np.array(chosen, dtype=np.int64), starts)

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shard_sizes(self) -> list[int]:
        return np.diff(self.starts).tolist()

    def locate(self, position: int) -> tuple[str, int]:
        """(shard name, index row) of dataset position `position`."""
        shard = int(np.searchsorted(self.starts, position, side="right")) - 1
        index_shard = int(self.shard_ids[shard])
        row = int(self.index.shard_starts[index_shard]) + position - int(self.starts[shard])
        return self.index.shards[index_shard].name, row

    def label(self, position: int) -> int:
        return int(self.index.samples[self.locate(position)[1]]["label"])

    def labels(self) -> np.ndarray:
        """Every selected sample's label, in dataset order (one pass over the index)."""
        rows = [self.index.samples["label"][self.index.shard_starts[i]:self.index.shard_starts[i + 1]]
                for i in self.shard_ids]
        return np.concatenate(rows) if rows else np.zeros(0, dtype=np.int32)

    def name(self, position: int) -> str:
        """`shard/key`: how a sample is named in a warning."""
        shard, row = self.locate(position)
        return f"{self.store.location}/{shard}:{self.index.keys[row].decode(errors='replace')}"

    def read_image_bytes(self, position: int) -> bytes:
        shard, row = self.locate(position)
        sample = self.index.samples[row]
        return self.store.read(shard, int(sample["offset"]), int(sample["size"]))


def _choose(names: list[str], pattern: str | None, path: str) -> list[int]:
    if pattern is None:
        return list(range(len(names)))
    position = {name: i for i, name in enumerate(names)}
    wanted = expand_braces(pattern)
    unindexed = [name for name in wanted if name not in position]
    if unindexed:
        raise DataError(f"data.path '{path}' names {len(unindexed)} shard(s) the index does not list "
                        f"(first: '{unindexed[0]}'): fix the pattern, or re-run dino-shard --index "
                        "on the folder")
    return [position[name] for name in wanted]


def _check_present(store: LocalStore | S3Store, index: ShardIndex, chosen: list[int]) -> None:
    """Every selected shard exists with the size it was indexed at (one listing, no reads)."""
    present = store.list_shards()
    for i in chosen:
        shard = index.shards[i]
        where = f"{store.location}/{shard.name}"
        if shard.name not in present:
            raise DataError(f"shard '{where}' is listed in the index but missing: restore it, or "
                            f"re-run 'dino-shard --index {store.location}' on what is there")
        if present[shard.name] != shard.bytes:
            raise DataError(f"shard '{where}' has {present[shard.name]} bytes, the index says "
                            f"{shard.bytes}: it changed after indexing; re-run "
                            f"'dino-shard --index {store.location}'")


