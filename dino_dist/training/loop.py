"""The training loop: epochs → optimizer steps → micro-batches, with logging and saving.

A step's micro-batch count is known before it starts (the epoch length is fixed), so the
last, possibly short, group of an epoch weights its micro-batches by 1/len(group) and is
still an exact mean over the images it holds. A stop request (signal) is honoured at the next
step boundary, on all ranks together, with a checkpoint at that step.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Callable

from dino_dist.config import Config
from dino_dist.data import split_batch
from dino_dist.delays import pause_seconds
from dino_dist.distributed.env import DistEnv
from dino_dist.training.engine import DinoEngine, StepResult
from dino_dist.training.schedules import total_batch_size
from dino_dist.distributed.stop import STOP_REQUEST
from dino_dist.observe.memory import peak_memory_mb
from dino_dist.observe.metrics import MetricsWriter, ThroughputMeter, console_line
from dino_dist.observe.sample_log import SampleLog
from dino_dist.observe.step_report import StepReporter

LOG = logging.getLogger("dino_dist")


@dataclass(frozen=True)
class Position:
    """Where training stands.

    step: optimizer steps done (names checkpoints, counts `train.max_steps`).
    epoch, epoch_step: the current epoch and the optimizer steps done in it.
    epoch_samples: images of this epoch already consumed, all ranks together: with the epoch's
        fixed global order this says exactly which samples are left, at any world size.
    schedule_step: index into the per-step schedules; equals `step` unless the run was resumed
        on another number of processes (the schedules then have another length per epoch).
    """
    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    epoch_samples: int = 0
    schedule_step: int = 0

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> "Position":
        """From a checkpoint; one written before `epoch_step`/`epoch_samples`/`schedule_step`
        existed starts its epoch over and indexes the schedules by its step."""
        return cls(int(state["step"]), int(state["epoch"]), int(state.get("epoch_step", 0)),
                   int(state.get("epoch_samples", 0)),
                   int(state.get("schedule_step", state["step"])))

    def after_step(self, images: int) -> "Position":
        return Position(self.step + 1, self.epoch, self.epoch_step + 1,
                        self.epoch_samples + images, self.schedule_step + 1)

    def next_epoch(self, steps_per_epoch: int) -> "Position":
        return Position(self.step, self.epoch + 1, 0, 0, (self.epoch + 1) * steps_per_epoch)


@dataclass(frozen=True)
class LoopEnd:
    position: Position
    stop_reason: str | None  # None: the configured training is complete
    early_stop: str | None = None  # why periodic evaluation ended training before its end
    images: int = 0  # images trained on by this process's loop, all ranks together


def training_done(cfg: Config, pos: Position) -> bool:
    return pos.epoch >= cfg.train.epochs or bool(cfg.train.max_steps and pos.step >= cfg.train.max_steps)


def is_logging_step(cfg: Config, step: int, last_step: int) -> bool:
    return step % cfg.log.every_steps == 0 or step == last_step


def saves_at(cfg: Config, step: int) -> bool:
    """A checkpoint every `checkpoint.every_steps` steps (epoch ends save anyway)."""
    return bool(cfg.checkpoint.every_steps) and step % cfg.checkpoint.every_steps == 0


def planned_steps(cfg: Config, schedules, pos: Position) -> int:
    """The step number training will end at, from where it stands now (for progress and ETA)."""
    end = pos.step + max(schedules.total_steps - pos.schedule_step, 0)
    return min(end, cfg.train.max_steps) if cfg.train.max_steps else end


def train_loop(cfg: Config, env: DistEnv, engine: DinoEngine, loader, sampler,
               metrics: MetricsWriter, start: Position,
               save: Callable[[Position], None],
               on_epoch_end: Callable[[Position], str | None] | None = None) -> LoopEnd:
    """`on_epoch_end` (periodic evaluation) runs before the epoch-end save, so its state is in
    that checkpoint; a reason it returns ends training there (all ranks get the same one)."""
    batch, accum = cfg.optim.batch_size_per_gpu, cfg.optim.accum_steps
    last_step = planned_steps(cfg, engine.schedules, start)
    pos, meter, run_start = start, ThroughputMeter(), time.perf_counter()
    reporter = StepReporter(cfg, engine, sampler.dataset_len,
                            total_batch_size(cfg, env.world_size))
    images = 0
    step_pause = pause_seconds("DINO_DIST_TEST_STEP_DELAY_S")  # read once: not per step
    sample_log = SampleLog.from_env(env.rank, env.world_size)
    while not training_done(cfg, pos):
        sampler.set_epoch(pos.epoch, consumed=min(pos.epoch_samples, sampler.dataset_len))
        micro_left = len(sampler) // batch
        batches = iter(loader)
        while micro_left > 0 and not training_done(cfg, pos):
            group = min(accum, micro_left)
            micro_left -= group
            logging_step = is_logging_step(cfg, pos.step + 1, last_step)
            stats = reporter.statistics_for(logging_step)
            for j in range(group):
                wait_start = time.perf_counter()
                crops, labels, skipped, masks = split_batch(next(batches))
                meter.add_wait(time.perf_counter() - wait_start)
                if sample_log:
                    sample_log.record(pos.step + 1, j, labels)
                engine.micro_step(crops, pos.schedule_step, 1.0 / group,
                                  sync_grads=j == group - 1, skipped_images=skipped, stats=stats,
                                  masks=masks)
            # Ordinary steps leave their figures on the device until the next step; steps
            # that log or save read them at once.
            saving = micro_left == 0 or saves_at(cfg, pos.step + 1)
            result = engine.finish_step(pos.schedule_step, pos.epoch, STOP_REQUEST.requested,
                                        stats, read_now=logging_step or saving)
            if step_pause:
                time.sleep(step_pause)
            pos = pos.after_step(result.images)
            meter.add_images(result.images)
            images += result.images
            if logging_step:
                _log_step(engine, metrics, meter, result, pos, last_step, start.step, run_start,
                          reporter)
            if result.stop:
                save(pos)
                return LoopEnd(pos, STOP_REQUEST.reason or "another rank was asked to stop",
                               images=images)
            if saves_at(cfg, pos.step) and micro_left > 0:
                save(pos)
        if micro_left == 0:
            pos = pos.next_epoch(engine.schedules.steps_per_epoch)
            early_stop = on_epoch_end(pos) if on_epoch_end else None
            save(pos)
            if early_stop:
                return LoopEnd(pos, None, early_stop, images)
    return LoopEnd(pos, None, images=images)


def _log_step(engine: DinoEngine, metrics: MetricsWriter, meter: ThroughputMeter,
              result: StepResult, pos: Position, last_step: int, first_step: int,
              run_start: float, reporter: StepReporter) -> None:
    images_per_s, wait_share = meter.read()
    meter.reset()
    values = {"epoch": pos.epoch, "epoch_samples": pos.epoch_samples, "loss": result.loss, **engine.schedules.at(pos.schedule_step - 1),
              "grad_norm": float(result.grad_norm), "images_per_s": images_per_s,
              "data_wait_share": wait_share, "peak_memory_mb": peak_memory_mb(engine.env.device),
              "skipped_images": engine.skipped_images, "skipped_steps": engine.skipped_steps,
              **reporter.values(result.loss)}
    elapsed = time.perf_counter() - run_start
    eta = elapsed / max(pos.step - first_step, 1) * (last_step - pos.step)
    LOG.info(console_line(pos.step, last_step, values, eta))
    warnings = reporter.warnings(pos.step, values)
    if warnings:
        values["warnings"] = [w.code for w in warnings]
    metrics.write(pos.step, values)
