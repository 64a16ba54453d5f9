"""The index of a shard set: where each sample's image lies in which tar, and its label.

It lives beside the shards, in `dino-index/` of the same folder or prefix:
- `samples.npy`: one row per sample, shards in name order, samples in tar order;
  (offset of the image's bytes in its tar, their size, label or -1). 16 bytes a sample.
- `keys.npy`: each sample's webdataset key (fixed-width bytes), read only to name a sample.
- `shards.json`, written last (its presence means the index is whole): per shard its name,
  byte size and sample count; the class names when the shards came from an ImageFolder.

Both arrays are plain .npy files, so a reader memory-maps them (locally) and never holds a
billion rows in memory; a remote index is copied once per machine into a local cache first.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dino_dist.atomic_file import write_atomically
from dino_dist.errors import DataError

from .shard_store import LocalStore, S3Store

INDEX_DIR = "dino-index"
SAMPLES_FILE = f"{INDEX_DIR}/samples.npy"
KEYS_FILE = f"{INDEX_DIR}/keys.npy"
SHARDS_FILE = f"{INDEX_DIR}/shards.json"
FORMAT = "dino_dist shard index"
VERSION = 1
SAMPLE_DTYPE = np.dtype([("offset", "<i8"), ("size", "<u4"), ("label", "<i4")])


@dataclass(frozen=True)
class ShardEntry:
    name: str
    bytes: int
    samples: int


@dataclass
class ShardIndex:
    """All shards of a set, their samples as rows (memory-mapped when the index is local)."""

    shards: list[ShardEntry]
    classes: list[str] | None
    samples: np.ndarray  # SAMPLE_DTYPE, one row per sample
    keys: np.ndarray  # |S<n>, one key per row

    shard_starts: np.ndarray = field(init=False)  # row of each shard's first sample, plus the total

    def __post_init__(self) -> None:
        # Once: every sample read looks its shard up here.
        counts = np.array([s.samples for s in self.shards], dtype=np.int64)
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)])


def write_index(store: LocalStore | S3Store, shards: list[ShardEntry], samples: np.ndarray,
                keys: np.ndarray, classes: list[str] | None) -> None:
    """Write the three files, shards.json last so that a half-written index never reads as whole."""
    if len(samples) != sum(s.samples for s in shards) or len(keys) != len(samples):
        raise ValueError(f"{len(samples)} sample rows and {len(keys)} keys for "
                         f"{sum(s.samples for s in shards)} samples in the shards")
    store.write_file(SAMPLES_FILE, _npy_bytes(samples.astype(SAMPLE_DTYPE, copy=False)))
    store.write_file(KEYS_FILE, _npy_bytes(keys))
    about = {"format": FORMAT, "version": VERSION, "samples": int(len(samples)), "classes": classes,
             "shards": [{"name": s.name, "bytes": s.bytes, "samples": s.samples} for s in shards]}
    store.write_file(SHARDS_FILE, json.dumps(about, indent=0).encode())


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def read_index(store: LocalStore | S3Store, cache_dir: str | Path | None = None) -> ShardIndex:
    """Load the index of the shards in `store`, or one DataError saying how to make it."""
    if not store.exists(SHARDS_FILE):
        raise DataError(f"'{store.location}' has no shard index ({SHARDS_FILE}): write it with "
                        f"'dino-shard --index {store.location}'")
    about_bytes = store.read_file(SHARDS_FILE)
    about = _parse_about(about_bytes, store.location)
    folder = store.local_path(INDEX_DIR)
    if folder is None:
        folder = _cached_copy(store, about_bytes, cache_dir)
    else:
        folder = Path(folder)
    samples = _load_npy(folder / "samples.npy", store.location)
    keys = _load_npy(folder / "keys.npy", store.location)
    shards = [ShardEntry(s["name"], int(s["bytes"]), int(s["samples"])) for s in about["shards"]]
    if samples.dtype != SAMPLE_DTYPE or len(samples) != about["samples"] or len(keys) != len(samples):
        raise DataError(f"the shard index of '{store.location}' is inconsistent ({len(samples)} rows, "
                        f"{len(keys)} keys, {about['samples']} samples listed): re-run "
                        f"'dino-shard --index {store.location}'")
    return ShardIndex(shards, about.get("classes"), samples, keys)


def _parse_about(data: bytes, location: str) -> dict:
    try:
        about = json.loads(data)
        valid = about.get("format") == FORMAT and isinstance(about.get("shards"), list)
    except (ValueError, AttributeError):
        valid = False
    if not valid:
        raise DataError(f"'{location}/{SHARDS_FILE}' is not a dino_dist shard index: re-run "
                        f"'dino-shard --index {location}'")
    if about["version"] > VERSION:
        raise DataError(f"the shard index of '{location}' has version {about['version']}, newer than "
                        f"this dino_dist reads ({VERSION}): upgrade dino_dist")
    return about


def _load_npy(path: Path, location: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"the shard index of '{location}' cannot be read ({path.name}: {error}): "
                        f"re-run 'dino-shard --index {location}'") from error


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dino_dist" / "shard-index"


def _cached_copy(store: S3Store, about_bytes: bytes, cache_dir: str | Path | None) -> Path:
    """A local copy of a remote index, shared by the ranks of a machine and reused while the
    remote shards.json stays the same (a rewritten index gets a new folder)."""
    digest = hashlib.sha256(store.location.encode() + b"\0" + about_bytes).hexdigest()[:20]
    folder = Path(cache_dir or default_cache_dir()) / digest
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("samples.npy", "keys.npy"):
        if not (folder / name).exists():  # ranks racing here each write whole files, then rename
            data = store.read_file(f"{INDEX_DIR}/{name}")
            write_atomically(folder / name, lambda f, data=data: f.write(data))
    return folder
