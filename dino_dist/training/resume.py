"""Where a run starts: the resume policy.

A run restarted with the same `train.output_dir` continues from the newest valid checkpoint
by itself (`checkpoint.resume`), or from `checkpoint.resume_from`; `checkpoint.resume=false`
refuses to start over existing checkpoints rather than prune them. A checkpoint written on
another number of processes continues the interrupted epoch with the samples it had left,
and the schedules follow the config's rules for the new total batch.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from dino_dist.checkpoint.compat import check_compatible
from dino_dist.checkpoint.directory import is_sharded, list_checkpoints, remove_unfinished_writes
from dino_dist.checkpoint.reader import load_checkpoint, load_newest_valid
from dino_dist.checkpoint.sharded import read_weights
from dino_dist.config import Config
from dino_dist.distributed.collectives import barrier
from dino_dist.distributed.env import DistEnv
from dino_dist.errors import CheckpointError
from dino_dist.training.loop import Position
from dino_dist.training.schedules import Schedules, total_batch_size
from dino_dist.training.state import TrainingState, check_contents

LOG = logging.getLogger("dino_dist")


def refuse_fresh_start_over_checkpoints(cfg: Config, checkpoint_dir: Path) -> None:
    """checkpoint.resume=false must never write over (or prune) an earlier run's checkpoints."""
    existing = list_checkpoints(checkpoint_dir)
    if not cfg.checkpoint.resume and not cfg.checkpoint.resume_from and existing:
        raise CheckpointError(
            f"checkpoint.resume=false but {checkpoint_dir} already holds {existing[0].name}: "
            f"choose an empty train.output_dir, or drop checkpoint.resume=false to continue")


def find_checkpoint(cfg: Config, checkpoint_dir: Path, env: DistEnv):
    """(path, state) of the checkpoint to start from, or (None, None) for a fresh start."""
    if cfg.checkpoint.resume_from:
        path = Path(cfg.checkpoint.resume_from)
        return path, load_checkpoint(path, map_location=env.device)
    if not cfg.checkpoint.resume:
        return None, None
    if env.is_main:
        remove_unfinished_writes(checkpoint_dir)
    barrier()
    return load_newest_valid(checkpoint_dir, map_location=env.device)


def resume(cfg: Config, state: TrainingState, checkpoint_dir: Path, env: DistEnv) -> Position:
    """Load the checkpoint to start from (if any) into `state`; the position to continue at."""
    path, saved = find_checkpoint(cfg, checkpoint_dir, env)
    if saved is None:
        return state.position
    sharded = is_sharded(path)
    check_contents(path, saved, sharded)
    check_compatible(path, saved["config"], cfg.to_dict())
    if sharded:
        state.load_sharded_weights(read_weights(path, state.sharded_weights()))
    elif cfg.train.parallel == "fsdp" and env.distributed:
        raise CheckpointError(
            f"checkpoint '{path}' is a single-file (DDP) checkpoint and this run shards the "
            f"model (train.parallel=fsdp): resume it with train.parallel=ddp, or start afresh "
            f"in a new train.output_dir")
    state.load_state_dict(saved)
    position = state.position
    LOG.info("resumed from %s (step %d, epoch %d, %d samples of the epoch done)", path,
             position.step, position.epoch, position.epoch_samples)
    saved_world = int(saved.get("world_size", env.world_size))
    if saved_world != env.world_size:
        position = reshard_position(cfg, state.engine.schedules, position, saved["config"],
                                    saved_world, env.world_size)
        state.position = position
    return position


def reshard_position(cfg: Config, schedules: Schedules, saved: Position, saved_config: dict,
                     saved_world: int, world: int) -> Position:
    """Continue on another number of processes: same samples left, schedules by progress.

    The schedules are rebuilt for this world size by the config's rules (the lr's linear
    scaling included), so they are indexed by how far through the epoch the run is, not by
    the old step count.
    """
    saved_optim = saved_config.get("optim", {})
    saved_batch = (saved_optim.get("batch_size_per_gpu", 0) * saved_world
                   * saved_optim.get("accum_steps", 1))
    batch = total_batch_size(cfg, world)
    schedule_step = saved.epoch * schedules.steps_per_epoch + saved.epoch_samples // batch
    LOG.warning(
        "resuming on %d processes a checkpoint written by %d: total batch %d -> %d, so the "
        "schedules follow the config's rules for the new batch (peak lr %.3g); epoch %d "
        "continues after its first %d samples, dealt to %d ranks (none repeated); stochastic "
        "depth restarts its random stream from the seed", world, saved_world, saved_batch,
        batch, float(schedules.lr.max()), saved.epoch, saved.epoch_samples, world)
    return dataclasses.replace(saved, schedule_step=schedule_step)
