"""The only module that touches checkpoint files.

A checkpoint is one `step_<8-digit step>.pt` file written by rank 0, loadable with
`torch.load(weights_only=True)`. It is written under a dot-name ending in `.tmp`, flushed,
fsynced and then `os.replace`d onto its final name, so a file with a final name is complete.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from dino_dist.dist import barrier

LOG = logging.getLogger("dino_dist")
CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8})\.pt$")
REQUIRED_KEYS = ("student", "teacher", "optimizer", "loss", "step", "epoch", "config")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def save_checkpoint(directory: Path, state: dict[str, Any], is_main: bool) -> Path:
    """Rank 0 writes atomically; every rank waits until the file is committed."""
    path = directory / checkpoint_name(state["step"])
    if is_main:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{path.name}.tmp"
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    barrier()
    return path


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(directory: Path) -> list[Path]:
    """Final-named checkpoints, newest step first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)),
                  reverse=True)


def load_checkpoint(path: Path, map_location: torch.device | str = "cpu") -> dict[str, Any]:
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


def load_newest_valid(directory: Path, map_location: torch.device | str = "cpu"):
    """The newest checkpoint that loads, skipping (and naming) damaged newer ones."""
    for path in list_checkpoints(directory):
        try:
            return path, load_checkpoint(path, map_location)
        except CheckpointError as err:
            LOG.warning("skipping %s", err)
    return None, None


def training_state(engine, config: dict[str, Any], step: int, epoch: int,
                   epoch_step: int) -> dict[str, Any]:
    """Everything a resumed run needs, as plain tensors and containers (weights_only-safe)."""
    return {
        "student": engine.student_module.state_dict(),
        "teacher": engine.teacher.state_dict(),
        "optimizer": engine.optimizer.state_dict(),
        "scaler": engine.scaler.state_dict(),
        "loss": engine.loss_fn.state_dict(),
        "step": step,
        "epoch": epoch,
        "epoch_step": epoch_step,
        "skipped_steps": engine.skipped_steps,
        "skipped_images": engine.skipped_images,
        "config": config,
        "rng": {"torch": torch.get_rng_state()},
    }


def restore_training_state(engine, state: dict[str, Any]) -> None:
    engine.student_module.load_state_dict(state["student"])
    engine.teacher.load_state_dict(state["teacher"])
    engine.optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):
        engine.scaler.load_state_dict(state["scaler"])
    engine.loss_fn.load_state_dict(state["loss"])
    engine.skipped_steps = int(state.get("skipped_steps", 0))
    engine.skipped_images = int(state.get("skipped_images", 0))
