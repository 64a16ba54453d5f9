"""Per-optimizer-step schedule arrays, indexed by the global step (as in the DINO code).

Precomputing them makes a resumed run, a run with more ranks or a run with accumulation read
exactly the same values at the same step: nothing depends on wall time or on a counter kept
elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np

from dino_dist.config import LR_SCHEDULES, Config


def cosine_schedule(base: float, final: float, epochs: int, steps_per_epoch: int,
                    warmup_epochs: int = 0, warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from `warmup_start` to `base`, then a half cosine from `base` to `final`."""
    warmup_steps = min(warmup_epochs * steps_per_epoch, epochs * steps_per_epoch)
    warmup = np.linspace(warmup_start, base, warmup_steps, endpoint=False)
    decay_steps = epochs * steps_per_epoch - warmup_steps
    return np.concatenate((warmup, _cosine(base, final, np.arange(decay_steps), decay_steps)))


def _cosine(base: float, final: float, t: np.ndarray, length: int) -> np.ndarray:
    return final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(length, 1)))


def _progress(n: int) -> np.ndarray:
    """0 at the first decay step, 1 at the last, so linear-type decays end exactly at `final`."""
    return np.arange(n) / max(n - 1, 1)


def lr_schedule(kind: str, base: float, final: float, epochs: int, steps_per_epoch: int,
                warmup_epochs: int = 0, cycle_epochs: int = 0, power: float = 1.0,
                decay_epochs: int = 0) -> np.ndarray:
    """Linear warm-up from 0 to `base` over `warmup_epochs`, then over the n remaining steps
    (t = 0..n-1, p = t / (n - 1)):

    cosine                final + (base - final) * (1 + cos(pi t / n)) / 2   (DINO)
    linear                base + (final - base) * p
    cosine_restarts       the cosine restarted from `base` every `cycle_epochs` epochs
    polynomial            final + (base - final) * (1 - p) ** power
    constant_after_decay  the cosine over `decay_epochs` epochs, then `final` to the end
    """
    if kind == "cosine":
        return cosine_schedule(base, final, epochs, steps_per_epoch, warmup_epochs)
    total = epochs * steps_per_epoch
    warmup_steps = min(warmup_epochs * steps_per_epoch, total)
    n = total - warmup_steps
    t = np.arange(n)
    if kind == "linear":
        decay = base + (final - base) * _progress(n)
    elif kind == "cosine_restarts":
        cycle = max(cycle_epochs * steps_per_epoch, 1)
        decay = _cosine(base, final, t % cycle, cycle)
    elif kind == "polynomial":
        decay = final + (base - final) * (1 - _progress(n)) ** power
    elif kind == "constant_after_decay":
        length = min(decay_epochs * steps_per_epoch, n)
        decay = np.where(t < length, _cosine(base, final, np.minimum(t, length), length), final)
    else:
        raise ValueError(f"unknown lr schedule '{kind}': choose one of {', '.join(LR_SCHEDULES)}")
    return np.concatenate((np.linspace(0.0, base, warmup_steps, endpoint=False), decay))


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int,
                          steps_per_epoch: int) -> np.ndarray:
    """Linear warm-up *per epoch* (constant within an epoch), as the reference recipe does."""
    warmup_epochs = min(warmup_epochs, epochs)
    per_epoch = np.concatenate((np.linspace(warmup_temp, temp, warmup_epochs),
                                np.full(epochs - warmup_epochs, temp)))
    return np.repeat(per_epoch, steps_per_epoch)


def micro_batches_per_epoch(samples_per_rank: int, batch_size: int) -> int:
    return samples_per_rank // batch_size


def steps_per_epoch(micro_batches: int, accum_steps: int) -> int:
    """Optimizer steps per epoch: the last, possibly short, group of micro-batches is a step."""
    return -(-micro_batches // accum_steps)


def total_batch_size(cfg: Config, world_size: int) -> int:
    return cfg.optim.batch_size_per_gpu * world_size * cfg.optim.accum_steps


@dataclass
class Schedules:
    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return len(self.lr)

    def index(self, step: int) -> int:
        """The step clamped to the last value: a run resumed on another world size rounds its
        position into the new schedule and may land one step past the end."""
        return min(step, self.total_steps - 1)

    def teacher_temp_at(self, step: int) -> float:
        return float(self.teacher_temp[self.index(step)])

    def at(self, step: int) -> dict[str, float]:
        step = self.index(step)
        return {"lr": float(self.lr[step]), "wd": float(self.wd[step]),
                "teacher_momentum": float(self.momentum[step]),
                "teacher_temp": float(self.teacher_temp[step])}


def peak_lr(cfg: Config, world_size: int) -> float:
    """optim.lr scaled to the total batch: DINO's linear rule (per 256 images) or DINOv2's
    square-root rule (per 1,024)."""
    batch = total_batch_size(cfg, world_size)
    if cfg.optim.lr_scaling == "sqrt_1024":
        return cfg.optim.lr * math.sqrt(batch / 1024.0)
    return cfg.optim.lr * batch / 256.0


def build_schedules(cfg: Config, world_size: int, steps_per_epoch: int) -> Schedules:
    o, epochs = cfg.optim, cfg.train.epochs
    return Schedules(
        lr=lr_schedule(o.lr_schedule, peak_lr(cfg, world_size), o.min_lr, epochs, steps_per_epoch,
                       o.warmup_epochs, o.lr_cycle_epochs, o.lr_power, o.lr_decay_epochs),
        wd=cosine_schedule(o.weight_decay, o.weight_decay_end, epochs, steps_per_epoch),
        momentum=cosine_schedule(o.teacher_momentum, o.teacher_momentum_end, epochs,
                                 steps_per_epoch),
        teacher_temp=teacher_temp_schedule(cfg.loss.warmup_teacher_temp, cfg.loss.teacher_temp,
                                           cfg.loss.warmup_teacher_temp_epochs, epochs,
                                           steps_per_epoch),
        steps_per_epoch=steps_per_epoch,
    )
