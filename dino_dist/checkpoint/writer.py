"""Writes a run's checkpoints in the format its parallelism needs.

DDP (and single-process) runs: one rank-0 file per save (dino_dist.checkpoint.single_file). FSDP runs: one
folder of shards per save (dino_dist.checkpoint.sharded), optionally written in the
background. Both prune old checkpoints only after the new one is committed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dino_dist.checkpoint.single_file import prune_checkpoints, save_checkpoint
from dino_dist.checkpoint.sharded import ShardedSaver


class CheckpointWriter:
    def __init__(self, directory: Path, is_main: bool, keep_last: int = 0,
                 keep_every_epochs: int = 0, sharded: bool = False, async_save: bool = False):
        self.directory, self.is_main = directory, is_main
        self.keep_last, self.keep_every_epochs = keep_last, keep_every_epochs
        self.sharded = ShardedSaver(directory, is_main, async_save, self._prune) if sharded else None

    def _prune(self) -> None:
        if self.keep_last:
            prune_checkpoints(self.directory, self.keep_last, self.keep_every_epochs)

    def save(self, engine, state: dict[str, Any]) -> Path:
        """`state` from checkpoint.training_state (a collective: call on every rank)."""
        if self.sharded is not None:
            return self.sharded.save(engine, state)
        return save_checkpoint(self.directory, state, self.is_main, self.keep_last,
                               self.keep_every_epochs)

    def wait(self) -> None:
        """Until a background save (if any) is committed."""
        if self.sharded is not None:
            self.sharded.wait()
