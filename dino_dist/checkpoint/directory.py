"""A run's `checkpoints/` folder: names, what counts as a checkpoint, retention, clean-up.

`step_<8-digit step>.pt` is a single-file checkpoint (with `<name>.manifest.json` beside it),
`step_<8-digit step>/` a sharded one (with `COMMITTED.json` inside). Anything still being
written has a dot-name ending in `.tmp`, or is a folder without its commit marker.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

LOG = logging.getLogger("dino_dist")
CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8})(\.pt)?$")
COMMIT_MARKER = "COMMITTED.json"  # written last into a sharded checkpoint folder


def file_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def folder_name(step: int) -> str:
    return f"step_{step:08d}"


def manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".manifest.json")


def is_sharded(path: Path) -> bool:
    """A folder of shards (written by FSDP ranks) rather than one file: the one place that
    decides which reader a checkpoint path needs."""
    return Path(path).is_dir()


def list_checkpoints(directory: Path) -> list[Path]:
    """Final-named checkpoint files and folders, newest step first (validity not checked)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))
             and (p.is_file() if m.group(2) else p.is_dir())]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)),
                  reverse=True)


def description(path: Path) -> dict[str, Any]:
    """A checkpoint's manifest (file) or commit marker (folder), unchecked; {} if unreadable."""
    small_file = path / COMMIT_MARKER if is_sharded(path) else manifest_path(path)
    try:
        return json.loads(small_file.read_text())
    except (OSError, ValueError):
        return {}


def remove(path: Path) -> None:
    if is_sharded(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
        manifest_path(path).unlink(missing_ok=True)


def prune_checkpoints(directory: Path, keep_last: int, keep_every_epochs: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints and the kept epoch ends."""
    removed = []
    for index, path in enumerate(list_checkpoints(directory)):
        if index < keep_last:
            continue
        info = description(path)
        at_epoch_end = info.get("epoch_step") == 0
        if keep_every_epochs and at_epoch_end and info.get("epoch", 0) % keep_every_epochs == 0:
            continue
        remove(path)
        removed.append(path)
    return removed


def remove_unfinished_writes(directory: Path) -> list[Path]:
    """Delete what a killed writer left behind: `.tmp` files, and shard folders without a
    commit marker (never a committed checkpoint). Only at start-up, before any save."""
    if not directory.is_dir():
        return []
    debris = [p for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
    debris += [p for p in list_checkpoints(directory)
               if is_sharded(p) and not (p / COMMIT_MARKER).exists()]
    for path in debris:
        remove(path)
        LOG.warning("removed %s: a save that was interrupted before it was committed", path)
    return debris
