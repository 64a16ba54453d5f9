"""Writes a run's checkpoints in the format its parallelism needs.

DDP (and single-process) runs: one rank-0 file per save (`single_file`). FSDP runs: one
folder of shards per save (`sharded`), optionally written in the background. Both prune old
checkpoints only after the new one is committed.

What is saved is the caller's business: `save` takes an object with `state_dict(weights=...)`
(the whole state, or all but the weights) and `sharded_weights()` (the weights in DCP's
layout), such as `dino_dist.training.state.TrainingState`.
"""
from __future__ import annotations

from pathlib import Path

from dino_dist.checkpoint.directory import prune_checkpoints
from dino_dist.checkpoint.sharded import ShardedSaver
from dino_dist.checkpoint.single_file import save_file


class CheckpointWriter:
    def __init__(self, directory: Path, is_main: bool, keep_last: int = 0,
                 keep_every_epochs: int = 0, sharded: bool = False, async_save: bool = False):
        self.directory, self.is_main = directory, is_main
        self.keep_last, self.keep_every_epochs = keep_last, keep_every_epochs
        self.sharded_saver = ShardedSaver(directory, is_main, async_save, self._prune) \
            if sharded else None

    @property
    def writes_in_background(self) -> bool:
        return self.sharded_saver is not None and self.sharded_saver.async_save

    def _prune(self) -> None:
        if self.keep_last:
            prune_checkpoints(self.directory, self.keep_last, self.keep_every_epochs)

    def save(self, state) -> Path:
        """A collective: call on every rank (each contributes its RNG state, and its shards)."""
        if self.sharded_saver is not None:
            return self.sharded_saver.save(state.sharded_weights(), state.state_dict(weights=False))
        path = save_file(self.directory, state.state_dict(weights=True), self.is_main)
        if self.is_main:
            self._prune()
        return path

    def wait(self) -> None:
        """Until a background save (if any) is committed."""
        if self.sharded_saver is not None:
            self.sharded_saver.wait()
