"""Reading checkpoints: the one place that tells a single file from a sharded folder.

`load_checkpoint` is what resuming needs (a folder's weights are read afterwards, through DCP,
into the run's own sharded or unsharded layout); `read_whole` is what tools need (every
tensor whole, in one process, with no model built).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from dino_dist.checkpoint.directory import is_sharded, list_checkpoints
from dino_dist.checkpoint.sharded import load_extra_state, read_full, read_marker
from dino_dist.checkpoint.single_file import load_file, read_manifest
from dino_dist.errors import CheckpointError

LOG = logging.getLogger("dino_dist")


def load_checkpoint(path: Path, map_location: torch.device | str = "cpu",
                    verify: bool = True) -> dict[str, Any]:
    """A file's whole state; a sharded folder's state without the weights."""
    path = Path(path)
    if is_sharded(path):
        read_marker(path)
        return load_extra_state(path, map_location)
    return load_file(path, map_location, verify)


def load_newest_valid(directory: Path, map_location: torch.device | str = "cpu"):
    """(path, state) of the newest checkpoint whose manifest or marker matches and that
    loads; damaged newer ones are named in a warning. (None, None) when there is none."""
    for path in list_checkpoints(directory):
        try:
            if not is_sharded(path):
                read_manifest(path)
            return path, load_checkpoint(path, map_location, verify=False)
        except CheckpointError as err:
            LOG.warning("skipping %s", err)
    return None, None


def read_whole(path: Path) -> dict[str, Any]:
    """Every tensor of a file or a folder, whole, in this process (for export and tools)."""
    path = Path(path)
    return read_full(path) if is_sharded(path) else load_file(path, map_location="cpu")
