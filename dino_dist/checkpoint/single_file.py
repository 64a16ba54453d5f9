"""Single-file checkpoints (DDP and one-process runs): `step_<8-digit step>.pt` by rank 0.

The file is loadable with `torch.load(weights_only=True)`. A small manifest
`step_<...>.pt.manifest.json` (step, epoch, size, sha256, format version) is written *after*
the data file is committed, so a data file without a matching manifest (a crash between the
two) does not count. The checksum is computed while writing, not by reading the file back.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from dino_dist.checkpoint.directory import file_name, manifest_path
from dino_dist.checkpoint.files import (FORMAT_VERSION, atomic_write, fsync_dir,
                                        main_rank_writes, save_tensors, sha256)
from dino_dist.errors import CheckpointError


def save_file(directory: Path, state: dict[str, Any], is_main: bool) -> Path:
    """Rank 0 writes data then manifest; every rank waits until both are committed."""
    path = directory / file_name(state["step"])
    main_rank_writes(is_main, path, lambda: _commit(path, state))
    return path


def _commit(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    atomic_write(path, lambda f: written.append(save_tensors(state, f)))
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
    if sha256(path) != manifest.get("sha256"):
        raise CheckpointError(f"checkpoint '{path}' does not match its checksum: it is corrupt")
    return manifest


def load_file(path: Path, map_location: torch.device | str = "cpu",
              verify: bool = True) -> dict[str, Any]:
    """The whole state of a checkpoint file (its manifest checked first when `verify`)."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist: check the path")
    if verify and manifest_path(path).exists():
        read_manifest(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for a damaged archive
        raise CheckpointError(f"checkpoint '{path}' cannot be read ({type(err).__name__}): "
                              f"it is truncated or corrupt; delete it or point to another one")
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint '{path}' holds no state dict: it was not written "
                              f"by dino-train")
    return state
