"""The only module that touches checkpoint files.

A checkpoint is one `step_<8-digit step>.pt` file written by rank 0, loadable with
`torch.load(weights_only=True)`, plus a small manifest `step_<...>.pt.manifest.json` (step,
epoch, size, sha256, format version) written *after* the data file is committed. Both are
written under dot-names ending in `.tmp`, fsynced and `os.replace`d, so a final name is never
partial; a data file without a matching manifest (a crash between the two) does not count.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dino_dist.delays import pause_if_set
from dino_dist.errors import CheckpointError
from dino_dist.distributed.env import all_gather_objects, broadcast_object

LOG = logging.getLogger("dino_dist")
FORMAT_VERSION = 1
# step_<8 digits>.pt: a rank-0 file (DDP); step_<8 digits>: a folder of shards (FSDP).
CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8})(\.pt)?$")
REQUIRED_KEYS = ("student", "teacher", "optimizer", "loss", "step", "epoch", "config")


COMMIT_MARKER = "COMMITTED.json"  # written last into a sharded checkpoint folder


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".manifest.json")


def _sha256(path: Path) -> str:
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


def _save_tensors(state: dict[str, Any], file) -> _HashingWriter:
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


def save_checkpoint(directory: Path, state: dict[str, Any], is_main: bool,
                    keep_last: int = 0, keep_every_epochs: int = 0) -> Path:
    """Rank 0 writes data then manifest; every rank waits until both are committed.

    Old checkpoints are pruned only after the new one is committed (keep_last 0 keeps all).
    """
    path = directory / checkpoint_name(state["step"])
    error = None
    if is_main:
        try:
            _commit(path, state)
        except OSError as err:
            error = (f"cannot write checkpoint '{path}' ({err.strerror or err}): free disk space "
                     f"or fix the folder's permissions, then restart; earlier checkpoints are kept")
        if keep_last and error is None:
            prune_checkpoints(directory, keep_last, keep_every_epochs)
    # Instead of a bare barrier: every rank waits for the commit *and* learns whether it
    # failed, so all stop together rather than training on without a checkpoint.
    error = broadcast_object(error)
    if error:
        raise CheckpointError(error)
    return path


def _commit(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    atomic_write(path, lambda f: written.append(_save_tensors(state, f)))
    if written[0].size != path.stat().st_size:  # torch.save seeked back: hash the file instead
        written[0].digest = hashlib.sha256(path.read_bytes())
    manifest = {"format_version": FORMAT_VERSION, "step": state["step"],
                "epoch": state["epoch"], "epoch_step": state.get("epoch_step", 0),
                "size": path.stat().st_size, "sha256": written[0].digest.hexdigest()}
    atomic_write(manifest_path(path), lambda f: f.write(json.dumps(manifest).encode()))
    fsync_dir(path.parent)


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a checkpoint file, checked against the file; CheckpointError if not."""
    try:
        manifest = json.loads(manifest_path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{path}' has no manifest: its save did not finish")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint manifest of '{path}' is unreadable ({err})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint '{path}' has format {manifest.get('format_version')}, "
                              f"this version reads {FORMAT_VERSION}")
    size = path.stat().st_size if path.exists() else -1
    if size != manifest.get("size"):
        raise CheckpointError(f"checkpoint '{path}' is {size} bytes, its manifest says "
                              f"{manifest.get('size')}: it is truncated or was replaced")
    if _sha256(path) != manifest.get("sha256"):
        raise CheckpointError(f"checkpoint '{path}' does not match its checksum: it is corrupt")
    return manifest


def list_checkpoints(directory: Path) -> list[Path]:
    """Final-named checkpoint files and folders, newest step first (validity not checked)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))
             and (p.is_file() if m.group(2) else p.is_dir())]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)),
                  reverse=True)


def _description(path: Path) -> dict[str, Any]:
    """A checkpoint's manifest (file) or commit marker (folder), unchecked; {} if unreadable."""
    small_file = path / COMMIT_MARKER if path.is_dir() else manifest_path(path)
    try:
        return json.loads(small_file.read_text())
    except (OSError, ValueError):
        return {}


def prune_checkpoints(directory: Path, keep_last: int, keep_every_epochs: int) -> list[Path]:
    """Delete all but the newest `keep_last` valid-looking checkpoints and epoch-end keepers."""
    removed = []
    for index, path in enumerate(list_checkpoints(directory)):
        if index < keep_last:
            continue
        description = _description(path)
        at_epoch_end = description.get("epoch_step") == 0
        if keep_every_epochs and at_epoch_end and description.get("epoch", 0) % keep_every_epochs == 0:
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
            manifest_path(path).unlink(missing_ok=True)
        removed.append(path)
    return removed


def load_checkpoint(path: Path, map_location: torch.device | str = "cpu",
                    verify: bool = True) -> dict[str, Any]:
    """A file's whole state; a sharded folder's state without the weights (those are read
    through DCP into the run's own layout: sharded_checkpoint.load_weights)."""
    path = Path(path)
    if path.is_dir():
        from dino_dist.checkpoint import sharded as sharded_checkpoint
        sharded_checkpoint.read_marker(path)
        return sharded_checkpoint.load_extra_state(path, map_location)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist: check the path")
    if verify and manifest_path(path).exists():
        read_manifest(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a damaged archive
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({type(err).__name__}): "
                              f"it is truncated or corrupt; delete it or point to another one")
    missing = [k for k in REQUIRED_KEYS if k not in state] if isinstance(state, dict) else REQUIRED_KEYS
    if missing:
        raise CheckpointError(f"checkpoint '{path}' lacks {', '.join(missing)}: "
                              f"it was not written by dino-train")
    return state


def remove_unfinished_writes(directory: Path) -> list[Path]:
    """Delete what a killed writer left behind: `.tmp` files, and shard folders without a
    commit marker (never a committed checkpoint). Only at start-up, before any save."""
    if not directory.is_dir():
        return []
    debris = [p for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    debris += [p for p in list_checkpoints(directory)
               if p.is_dir() and not (p / COMMIT_MARKER).exists()]
    for path in debris:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        LOG.warning("removed %s: a save that was interrupted before it was committed", path)
    return debris


def load_newest_valid(directory: Path, map_location: torch.device | str = "cpu"):
    """The newest checkpoint whose manifest matches and that loads; damaged ones are named."""
    for path in list_checkpoints(directory):
        try:
            if path.is_file():
                read_manifest(path)
            return path, load_checkpoint(path, map_location, verify=False)
        except CheckpointError as err:
            LOG.warning("skipping %s", err)
    return None, None


def rng_state() -> dict[str, Any]:
    """This process's RNG states as plain lists: weights_only-loadable, and they cross
    all_gather_object on every backend (tensors do not)."""
    name, keys, *rest = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state().tolist(),
             "numpy": (name, keys.tolist(), *rest)}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# Settings that fix tensor shapes: a checkpoint cannot be loaded into a model built otherwise.
SHAPE_KEYS = ("model.arch", "model.patch_size", "model.img_size", "model.out_dim",
              "model.use_bn_in_head", "model.norm_last_layer", "model.head_hidden_dim",
              "model.head_bottleneck_dim")


def check_compatible(path: Path, saved_config: dict[str, Any], config: dict[str, Any]) -> None:
    """CheckpointError naming every shape-fixing key that differs, before anything is loaded."""
    def value(cfg: dict[str, Any], dotted: str):
        section, key = dotted.split(".")
        return cfg.get(section, {}).get(key)

    differing = [f"{k}: {value(saved_config, k)!r} in the checkpoint, {value(config, k)!r} now"
                 for k in SHAPE_KEYS if value(saved_config, k) != value(config, k)]
    if differing:
        raise CheckpointError(
            f"checkpoint '{path}' was trained with another model ({'; '.join(differing)}): "
            f"use the checkpoint's settings, or a new train.output_dir to start afresh")


def training_state(engine, config: dict[str, Any], position: dict[str, int]) -> dict[str, Any]:
    """Everything a resumed run needs, as plain tensors and containers (weights_only-safe).

    `position` holds step, epoch, epoch_step, epoch_samples and schedule_step.
    Collective: every rank contributes its RNG state, so call it on all ranks.
    """
    return {
        "student": engine.student_module.state_dict(),
        "teacher": engine.teacher.state_dict(),
        "optimizer": engine.optimizer.state_dict(),
        "scaler": engine.scaler.state_dict(),
        "loss": engine.loss_fn.state_dict(),
        **position,
        "world_size": engine.env.world_size,
        "skipped_steps": engine.skipped_steps,
        "skipped_images": engine.skipped_images,
        "config": config,
        "rng": all_gather_objects(rng_state()),
    }


def restore_training_state(engine, state: dict[str, Any]) -> None:
    """Load weights, optimizer and counters; RNG streams only on the world size that wrote them
    (rank r's stream belongs to rank r of that world)."""
    if "student" in state:  # sharded checkpoints load their weights through DCP instead
        engine.student_module.load_state_dict(state["student"])
        engine.teacher.load_state_dict(state["teacher"])
        engine.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        engine.scaler.load_state_dict(state["scaler"])
    engine.loss_fn.load_state_dict(state["loss"])
    engine.skipped_steps = int(state.get("skipped_steps", 0))
    engine.skipped_images = int(state.get("skipped_images", 0))
    if state.get("world_size") == engine.env.world_size:
        set_rng_state(state["rng"][engine.env.rank])
