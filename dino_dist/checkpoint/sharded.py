"""Sharded (FSDP) checkpoints with torch.distributed.checkpoint (DCP).

One folder per save, `step_<8-digit step>/`: every rank writes its own shards of the student,
the teacher and the optimizer (DCP files plus DCP's `.metadata`), rank 0 adds `state.pt` (the
center, scaler, position, per-rank RNG, config: small, weights_only-loadable), and only after
all of that is on disk rank 0 writes `COMMITTED.json` (step, epoch, every file with its size).
A folder without that marker does not count: a kill at any moment leaves the previous
checkpoint the newest valid one. DCP stores each tensor with its global shape and offsets, so a
folder written by N ranks loads at any number of ranks (or into an unsharded model).

With `async_save`, training waits only while DCP copies the shards to host memory; the write
runs in a background thread on a process group of its own (so it never interleaves with the
training's collectives) and rank 0 writes the marker when it is done. The next save first
waits for the previous one.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from dino_dist.checkpoint.directory import COMMIT_MARKER, folder_name
from dino_dist.checkpoint.files import FORMAT_VERSION, atomic_write, fsync_dir, main_rank_writes
from dino_dist.errors import CheckpointError
from dino_dist.distributed.collectives import barrier

LOG = logging.getLogger("dino_dist")
EXTRA_STATE = "state.pt"


def _distributed() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


class ShardedSaver:
    """Saves sharded checkpoints; holds the background save in flight, if any."""

    def __init__(self, directory: Path, is_main: bool, async_save: bool = False,
                 after_commit: Callable[[], None] | None = None) -> None:
        self.directory, self.is_main, self.async_save = directory, is_main, async_save
        self.after_commit = after_commit or (lambda: None)
        self.pending: Future | None = None
        self._group = None  # the background writer's own process group

    def save(self, weights: dict[str, Any], extra: dict[str, Any]) -> Path:
        """`weights`: state dicts in DCP's layout (sharded tensors), written by every rank;
        `extra`: the rest of the state (small, plain), written by rank 0 into state.pt."""
        self.wait()
        folder = self.directory / folder_name(extra["step"])
        def start() -> None:
            _prepare_folder(folder)
            atomic_write(folder / EXTRA_STATE, lambda f: torch.save(extra, f))
        main_rank_writes(self.is_main, folder, start)
        if self.async_save:
            self.pending = self._start_async(weights, folder, extra)
            return folder
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # DCP's "no process group" notice
            dcp_save(weights, folder)
        barrier()  # every rank's shards are on disk
        self._commit(folder, extra)
        return folder

    def _start_async(self, weights, folder: Path, extra: dict[str, Any]) -> Future:
        import torch.distributed.checkpoint as dcp
        if _distributed() and self._group is None:
            self._group = dist.new_group(backend="gloo")
        future = dcp.async_save(weights, checkpoint_id=str(folder), process_group=self._group,
                                no_dist=not _distributed())
        # DCP's future resolves on rank 0 only after every rank reported its files and the
        # global .metadata is written, so the marker can follow from there. `wait` waits for
        # the marker too (callbacks run after the future's waiters are released).
        self.committed = threading.Event()
        if self.is_main:
            future.add_done_callback(lambda done: self._commit_in_background(done, folder, extra))
        else:
            self.committed.set()
        return future

    def _commit_in_background(self, done: Future, folder: Path, extra: dict[str, Any]) -> None:
        try:
            if done.exception() is not None:
                LOG.error("background save of %s failed (%s); earlier checkpoints are kept",
                          folder, done.exception())
                return
            self._commit(folder, extra, wait_for_ranks=False)
        except (OSError, CheckpointError) as err:
            LOG.error("%s", err)
        finally:
            self.committed.set()

    def _commit(self, folder: Path, extra: dict[str, Any], wait_for_ranks: bool = True) -> None:
        def commit() -> None:
            write_marker(folder, extra)
            self.after_commit()
        main_rank_writes(self.is_main, folder, commit, share=wait_for_ranks)

    def wait(self) -> None:
        """Block until the save in flight (if any) is written and committed."""
        if self.pending is not None:
            self.pending.result()
            self.committed.wait()
            self.pending = None
            barrier()  # the marker (written by rank 0's callback) exists before anyone goes on


def dcp_save(weights: dict[str, Any], folder: Path) -> None:
    import torch.distributed.checkpoint as dcp
    dcp.save(weights, checkpoint_id=str(folder), no_dist=not _distributed())


def _prepare_folder(folder: Path) -> None:
    if folder.exists():  # an uncommitted attempt at this step (a kill mid-save): start over
        shutil.rmtree(folder)
    folder.mkdir(parents=True)


def write_marker(folder: Path, extra: dict[str, Any]) -> None:
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir())
             if p.name != COMMIT_MARKER}
    for name in files:  # the shards were written by other processes: make them durable
        with open(folder / name, "rb") as f:
            os.fsync(f.fileno())
    marker = {"format_version": FORMAT_VERSION, "step": extra["step"], "epoch": extra["epoch"],
              "epoch_step": extra.get("epoch_step", 0), "world_size": extra.get("world_size"),
              "files": files}
    atomic_write(folder / COMMIT_MARKER, lambda f: f.write(json.dumps(marker).encode()))
    fsync_dir(folder)
    fsync_dir(folder.parent)


def read_marker(folder: Path) -> dict[str, Any]:
    """The folder's commit marker, checked against the files; CheckpointError if not valid."""
    try:
        marker = json.loads((folder / COMMIT_MARKER).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint folder '{folder}' has no {COMMIT_MARKER}: its save did "
                              f"not finish")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"commit marker of '{folder}' is unreadable ({err})")
    if marker.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint '{folder}' has format {marker.get('format_version')}, "
                              f"this version reads {FORMAT_VERSION}")
    for name, size in marker.get("files", {}).items():
        path = folder / name
        actual = path.stat().st_size if path.exists() else -1
        if actual != size:
            raise CheckpointError(f"checkpoint '{folder}': {name} is {actual} bytes, its marker "
                                  f"says {size}: the folder is damaged")
    return marker


def load_extra_state(folder: Path, map_location) -> dict[str, Any]:
    try:
        return torch.load(folder / EXTRA_STATE, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a damaged archive
        raise CheckpointError(f"checkpoint '{folder}': {EXTRA_STATE} cannot be read "
                              f"({type(err).__name__}): the folder is damaged")


def read_weights(folder: Path, weights: dict[str, Any]) -> dict[str, Any]:
    """Fill `weights` (state dicts in the reader's own layout, any world size, sharded or not)
    from the folder: DCP reshards by the tensors' global offsets. Optimizer states the folder
    does not hold are dropped from the request (see only_saved_parameter_states)."""
    import torch.distributed.checkpoint as dcp
    if "optimizer" in weights:
        weights = {**weights, "optimizer": only_saved_parameter_states(weights["optimizer"],
                                                                        saved_keys(folder))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(weights, checkpoint_id=str(folder), no_dist=not _distributed())
    return weights


def saved_keys(folder: Path) -> set[str]:
    """The flattened keys (`optimizer.state.<param>.exp_avg`, ...) a DCP folder holds."""
    from torch.distributed.checkpoint import FileSystemReader
    return set(FileSystemReader(str(folder)).read_metadata().state_dict_metadata)


def only_saved_parameter_states(optimizer_state: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    """Drop the per-parameter optimizer states the checkpoint does not hold.

    A parameter that never had a gradient (the last layer while `optim.freeze_last_layer`
    holds it) has no AdamW state when the folder is saved, but a fresh optimizer's DCP state
    dict asks for one for every parameter. Loading without it leaves that parameter with no
    state, exactly as in the run that was never stopped.
    """
    saved_params = {key[len("optimizer.state."):].rsplit(".", 1)[0] for key in keys
                    if key.startswith("optimizer.state.")}
    state = {name: value for name, value in optimizer_state["state"].items()
             if name in saved_params}
    return {**optimizer_state, "state": state}


def read_full(folder: Path) -> dict[str, Any]:
    """A committed folder as whole (unsharded) tensors in one process, with no model to load
    into: the extra state plus the `student` and `teacher` state dicts, for export,
    inspection and tests. The tensors' global shapes come from DCP's metadata."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    read_marker(folder)
    state = load_extra_state(folder, "cpu")
    stored = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    flat = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
            for key, meta in stored.items() if isinstance(meta, TensorStorageMetadata)
            and key.split(".", 1)[0] in ("student", "teacher")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(flat, checkpoint_id=str(folder), no_dist=True)
    for key, tensor in flat.items():
        part, name = key.split(".", 1)
        state.setdefault(part, {})[name] = tensor
    return state
