"""Index webdataset tar shards: where each sample's image lies in its tar, and its label.

A tar is read once, front to back, as a stream (so a shard on S3 costs one GET), and grouped
into samples by the rules webdataset's own reader applies (`webdataset.tariterators`), so the
index holds exactly the samples `webdataset.WebDataset` would yield that have an image.

Each finished shard leaves a part file in `dino-index/parts/`; a re-run after a kill reuses
the parts of unchanged shards and scans only the rest, then all parts merge into the index.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import sys
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Executor, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from dino_dist.errors import DataError

from .shard_index import INDEX_DIR, SAMPLE_DTYPE, ShardEntry, write_index
from .shard_store import LocalStore, S3Store, is_remote

PARTS_DIR = f"{INDEX_DIR}/parts"
IMAGE_EXTENSIONS = frozenset(("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff"))
LABEL_EXTENSION = "cls"
MAX_IMAGE_BYTES = int(np.iinfo(SAMPLE_DTYPE["size"]).max)
LABEL_RANGE = (-1, int(np.iinfo(SAMPLE_DTYPE["label"]).max))

# webdataset's base_plus_ext: the key runs to the first dot of the basename.
_KEY_AND_EXTENSION = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# webdataset's skip_meta: members such as `__key__` or `__index__/...` are never sample data.
_META_MEMBER = re.compile(r"__[^/]*__($|/)")


@dataclass
class ScannedShard:
    """One tar's samples that have an image, in tar order."""

    keys: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: int = 0  # samples without an image
    bytes: int = 0  # the tar's size when it was scanned

    def __len__(self) -> int:
        return len(self.keys)


class _HeaderCheckedInfo(tarfile.TarInfo):
    """tarfile ends its iteration quietly at a cut-off or garbled header anywhere but the first,
    which would index a truncated shard as a short one; this remembers why it stopped."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # the zero block that ends a whole archive
            raise
        except tarfile.HeaderError as error:
            tar.header_error = f"{type(error).__name__} at byte {tar.offset}: {error}"
            raise


@dataclass
class _Sample:
    key: str
    image: tuple[int, int] | None = None
    label_text: bytes | None = None


def scan_tar(fileobj: BinaryIO, name: str = "tar") -> ScannedShard:
    """Scan an uncompressed tar stream; `name` only names the shard in errors and warnings.

    Raises tarfile.ReadError for what is not a whole tar (index_shards names the shard)."""
    scanned, bad_labels = ScannedShard(), []
    tar = tarfile.open(fileobj=fileobj, mode="r|", tarinfo=_HeaderCheckedInfo)
    sample = None
    for member in tar:
        tar.members = []  # a stream needs no member list, and 10k entries per shard add up
        split = _sample_member(member)
        if split is None:
            continue
        key, extension = split
        if sample is None or key != sample.key:
            _finish(sample, scanned, bad_labels)
            sample = _Sample(key)
        _add_member(sample, member, extension, tar)
    _finish(sample, scanned, bad_labels)
    if getattr(tar, "header_error", None):
        raise tarfile.ReadError(f"cut off or damaged: {tar.header_error}")
    if bad_labels:
        warnings.warn(f"{name}: {len(bad_labels)} samples have a .{LABEL_EXTENSION} that is not an "
                      f"integer (the first: '{bad_labels[0]}'); they get label -1", stacklevel=2)
    return scanned


def _sample_member(member: tarfile.TarInfo) -> tuple[str, str] | None:
    """(key, extension) of a member that belongs to a sample, else None."""
    name = member.name
    if not member.isreg() or name.rsplit("/", 1)[-1].startswith(".") or _META_MEMBER.match(name):
        return None
    match = _KEY_AND_EXTENSION.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def _add_member(sample: _Sample, member: tarfile.TarInfo, extension: str, tar: tarfile.TarFile) -> None:
    if sample.image is None and extension.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
        sample.image = (member.offset_data, member.size)
    elif extension == LABEL_EXTENSION and sample.label_text is None:
        sample.label_text = tar.extractfile(member).read()


def _finish(sample: _Sample | None, scanned: ScannedShard, bad_labels: list[str]) -> None:
    if sample is None:
        return
    if sample.image is None:
        scanned.skipped += 1
        return
    offset, size = sample.image
    if size > MAX_IMAGE_BYTES:
        raise tarfile.ReadError(f"the image of sample '{sample.key}' has {size} bytes, more than "
                                f"the index holds ({MAX_IMAGE_BYTES})")
    scanned.keys.append(sample.key)
    scanned.offsets.append(offset)
    scanned.sizes.append(size)
    scanned.labels.append(_parse_label(sample, bad_labels))


def _parse_label(sample: _Sample, bad_labels: list[str]) -> int:
    if sample.label_text is None:
        return -1
    try:
        label = int(sample.label_text.decode("ascii").strip())
    except ValueError:  # UnicodeDecodeError is one too
        label = None
    if label is None or not LABEL_RANGE[0] <= label <= LABEL_RANGE[1]:
        bad_labels.append(sample.key)
        return -1
    return label


@dataclass(frozen=True)
class IndexSummary:
    shards: int
    samples: int
    skipped: int  # samples without an image, left out of the index
    bytes: int
    reused: int  # shards whose part an earlier run had left (interrupted, or on S3 any)


def default_workers() -> int:
    return min(8, os.cpu_count() or 1)


def index_shards(store: LocalStore | S3Store, names: list[str] | None = None,
                 workers: int | None = None, progress: bool = True,
                 classes: list[str] | None = None) -> IndexSummary:
    """Scan the shards `names` (default: every .tar of the store) and write the store's index."""
    workers = workers or default_workers()
    sizes = store.list_shards()
    names = sorted(sizes if names is None else names)
    if not names:
        raise DataError(f"'{store.location}' holds no .tar shards: point dino-shard --index at the "
                        "folder or s3:// prefix that holds them")
    missing = [name for name in names if name not in sizes]
    if missing:
        raise DataError(f"shard '{store.location}/{missing[0]}' is missing ({len(missing)} in all)")
    jobs = [(store, name, sizes[name]) for name in names]
    scanned, reused = {}, 0
    # Local tars are parsed in processes (tarfile holds the GIL); S3 reads wait on the network.
    finished = run_jobs(_index_one, jobs, workers, processes=not is_remote(store.location))
    with tqdm(finished, total=len(jobs), desc="indexing", unit="shard", file=sys.stderr,
              disable=not progress) as bar:
        for name, shard, was_reused in bar:
            scanned[name], reused = shard, reused + was_reused
    entries, samples, keys = _merge(names, scanned)
    write_index(store, entries, samples, keys, classes)
    _remove_parts(store)
    return IndexSummary(len(entries), len(samples), sum(s.skipped for s in scanned.values()),
                        sum(e.bytes for e in entries), reused)


def run_jobs(function: Callable, jobs: Iterable[tuple], workers: int, processes: bool) -> Iterator:
    """`function(*job)` for each job, yielded as they finish; the first error cancels the rest."""
    jobs = list(jobs)
    if workers <= 1 or len(jobs) <= 1:  # a pool would only add its start-up
        yield from (function(*job) for job in jobs)
        return
    pool_type: type[Executor] = ProcessPoolExecutor if processes else ThreadPoolExecutor
    with pool_type(max_workers=min(workers, len(jobs))) as pool:
        pending = {pool.submit(function, *job) for job in jobs}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                yield from (future.result() for future in done)
        finally:
            for future in pending:
                future.cancel()


def _index_one(store: LocalStore | S3Store, name: str, size: int) -> tuple[str, ScannedShard, bool]:
    """(name, its samples, whether an earlier run's part held them)."""
    part = f"{PARTS_DIR}/{name}.npz"
    if store.exists(part):
        scanned = _read_part(store.read_file(part))
        if scanned is not None and scanned.bytes == size:
            return name, scanned, True
    scanned = _scan_shard(store, name)
    scanned.bytes = size
    store.write_file(part, _part_bytes(scanned))
    return name, scanned, False


def _scan_shard(store: LocalStore | S3Store, name: str) -> ScannedShard:
    where = f"{store.location}/{name}"
    try:
        if isinstance(store, S3Store):
            stream = store.fs.open(f"{store.url}/{name}", "rb", block_size=16 << 20)
        else:
            stream = open(store.local_path(name), "rb", buffering=1 << 20)
        with stream:
            return scan_tar(stream, where)
    except tarfile.ReadError as error:
        raise DataError(f"shard '{where}' is not a whole, uncompressed tar ({error}): write or copy "
                        "it again, or move it out of the shard set") from error
    except OSError as error:
        raise DataError(f"shard '{where}' cannot be read ({type(error).__name__}: {error}): check "
                        "the storage, then re-run (shards already scanned are kept)") from error


def _part_bytes(scanned: ScannedShard) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, keys=_key_array([_utf8(k) for k in scanned.keys]),
             offsets=np.asarray(scanned.offsets, dtype=np.int64),
             sizes=np.asarray(scanned.sizes, dtype=np.int64),
             labels=np.asarray(scanned.labels, dtype=np.int64),
             counts=np.asarray([scanned.bytes, scanned.skipped], dtype=np.int64))
    return buffer.getvalue()


def _read_part(data: bytes) -> ScannedShard | None:
    """The part's samples, or None when it cannot be read (it is then scanned again)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as part:
            shard_bytes, skipped = part["counts"].tolist()
            keys = [key.decode("utf-8", "surrogateescape") for key in part["keys"].tolist()]
            return ScannedShard(keys, part["offsets"].tolist(), part["sizes"].tolist(),
                                part["labels"].tolist(), skipped, shard_bytes)
    except (OSError, ValueError, KeyError):
        return None


def _utf8(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")  # tarfile keeps undecodable name bytes as surrogates


def _key_array(keys: list[bytes]) -> np.ndarray:
    return np.array(keys, dtype=f"S{max(map(len, keys), default=1) or 1}")


def _merge(names: list[str],
           scanned: dict[str, ScannedShard]) -> tuple[list[ShardEntry], np.ndarray, np.ndarray]:
    entries = [ShardEntry(name, scanned[name].bytes, len(scanned[name])) for name in names]
    samples = np.empty(sum(e.samples for e in entries), dtype=SAMPLE_DTYPE)
    start = 0
    for entry in entries:
        shard, end = scanned[entry.name], start + entry.samples
        samples["offset"][start:end] = shard.offsets
        samples["size"][start:end] = shard.sizes
        samples["label"][start:end] = shard.labels
        start = end
    keys = _key_array([_utf8(key) for name in names for key in scanned[name].keys])
    return entries, samples, keys


def _remove_parts(store: LocalStore | S3Store) -> None:
    """Parts are only a resume aid. A store has no delete, so remote parts stay (small, and a
    later re-index of unchanged shards reuses them)."""
    folder = store.local_path(PARTS_DIR)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
