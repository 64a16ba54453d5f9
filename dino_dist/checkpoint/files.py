"""Durable writes: a final name is never partial, and what was committed survives a crash.

Every checkpoint file is written under a dot-name ending in `.tmp`, flushed, fsynced and then
`os.replace`d onto its final name; the folder is fsynced after, so the rename itself is on
disk. A failed write removes its temporary file (and so frees the space it took).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import torch

from dino_dist.delays import pause_if_set
from dino_dist.distributed.collectives import broadcast_object
from dino_dist.errors import CheckpointError

FORMAT_VERSION = 1  # of the manifest and commit-marker files, checked when reading


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            pause_if_set("DINO_DIST_TEST_SAVE_DELAY_S")
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves no debris (and frees the space)
        raise


class _HashingWriter:
    """Passes torch.save's writes through, hashing them on the way (torch.save writes its
    archive front to back, so this is the file's checksum without reading it back), and keeps
    the OSError a write raised: torch.save reports a failed write (disk full, quota) as a
    RuntimeError that has lost the errno."""

    def __init__(self, file) -> None:
        self.file, self.error = file, None
        self.digest, self.size = hashlib.sha256(), 0

    def write(self, data) -> int:
        try:
            written = self.file.write(data)
        except OSError as err:
            self.error = err
            raise
        self.digest.update(data)
        self.size += len(data)
        return written

    def flush(self) -> None:
        self.file.flush()


def save_tensors(state: dict[str, Any], file) -> _HashingWriter:
    writer = _HashingWriter(file)
    try:
        torch.save(state, writer)
    except RuntimeError:
        if writer.error is not None:
            raise writer.error from None
        raise
    return writer


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_error(path: Path, err: OSError) -> str:
    return (f"cannot write checkpoint '{path}' ({err.strerror or err}): free disk space or "
            f"fix the folder's permissions, then restart; earlier checkpoints are kept")


def main_rank_writes(is_main: bool, path: Path, write: Callable[[], None],
                     share: bool = True) -> None:
    """Rank 0 runs `write`; with `share`, every rank waits for it and learns whether it failed
    (instead of a bare barrier), so all stop together with CheckpointError rather than train
    on without a checkpoint. A failed write names `path` and what to do."""
    error = None
    if is_main:
        try:
            write()
        except OSError as err:
            error = write_error(path, err)
    if share:
        error = broadcast_object(error)
    if error:
        raise CheckpointError(error)
