"""The training loop: epochs → optimizer steps → micro-batches, with logging and saving.

A step's micro-batch count is known before it starts (the epoch length is fixed), so the
last, possibly short, group of an epoch weights its micro-batches by 1/len(group) and is
still an exact mean over the images it holds.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

from dino_dist.config import Config
from dino_dist.dist import DistEnv
from dino_dist.engine import DinoEngine, StepResult
from dino_dist.metrics import MetricsWriter, ThroughputMeter, console_line, peak_memory_mb

LOG = logging.getLogger("dino_dist")


@dataclass
class Position:
    """Where training stands: optimizer steps done, current epoch, steps done in it."""
    step: int = 0
    epoch: int = 0
    epoch_step: int = 0


def micro_batches_per_epoch(samples_per_rank: int, batch_size: int) -> int:
    return samples_per_rank // batch_size


def steps_per_epoch(micro_batches: int, accum_steps: int) -> int:
    return -(-micro_batches // accum_steps)


def total_steps(cfg: Config, schedule_steps: int) -> int:
    return min(schedule_steps, cfg.train.max_steps) if cfg.train.max_steps else schedule_steps


def train_loop(cfg: Config, env: DistEnv, engine: DinoEngine, loader, sampler,
               metrics: MetricsWriter, start: Position,
               save: Callable[[Position], None]) -> Position:
    batch, accum = cfg.optim.batch_size_per_gpu, cfg.optim.accum_steps
    micro_total = micro_batches_per_epoch(sampler.samples_per_rank, batch)
    per_epoch = steps_per_epoch(micro_total, accum)
    last_step = total_steps(cfg, engine.schedules.total_steps)
    pos, meter, run_start = Position(start.step, start.epoch, start.epoch_step), ThroughputMeter(), time.perf_counter()
    first_step = pos.step
    while pos.step < last_step and pos.epoch < cfg.train.epochs:
        # Clamped: a checkpoint from more processes can hold a position past this shard's end.
        consumed = min(pos.epoch_step * accum * batch, sampler.samples_per_rank)
        sampler.set_epoch(pos.epoch, start=consumed)
        batches = iter(loader)
        while pos.epoch_step < per_epoch and pos.step < last_step:
            group = min(accum, micro_total - pos.epoch_step * accum)
            for j in range(group):
                wait_start = time.perf_counter()
                crops, _labels, skipped = next(batches)
                meter.add_wait(time.perf_counter() - wait_start)
                engine.micro_step(crops, pos.step, 1.0 / group, sync_grads=j == group - 1,
                                  skipped_images=skipped)
            result = engine.finish_step(pos.step, pos.epoch)
            pos = Position(pos.step + 1, pos.epoch, pos.epoch_step + 1)
            meter.add_images(result.images)
            if pos.step % cfg.log.every_steps == 0 or pos.step == last_step:
                _log_step(engine, metrics, meter, result, pos, last_step, first_step, run_start)
            if cfg.checkpoint.every_steps and pos.step % cfg.checkpoint.every_steps == 0 \
                    and pos.epoch_step < per_epoch:
                save(pos)
        if pos.epoch_step >= per_epoch:
            pos = Position(pos.step, pos.epoch + 1, 0)
            save(pos)
    return pos


def _log_step(engine: DinoEngine, metrics: MetricsWriter, meter: ThroughputMeter,
              result: StepResult, pos: Position, last_step: int, first_step: int,
              run_start: float) -> None:
    images_per_s, wait_share = meter.read()
    meter.reset()
    values = {"epoch": pos.epoch, "loss": result.loss, **engine.schedules.at(pos.step - 1),
              "grad_norm": float(result.grad_norm), "images_per_s": images_per_s,
              "data_wait_share": wait_share, "peak_memory_mb": peak_memory_mb(engine.env.device),
              "skipped_images": engine.skipped_images, "skipped_steps": engine.skipped_steps}
    elapsed = time.perf_counter() - run_start
    eta = elapsed / max(pos.step - first_step, 1) * (last_step - pos.step)
    LOG.info(console_line(pos.step, last_step, values, eta))
    metrics.write(pos.step, values)
