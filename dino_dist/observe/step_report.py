"""What a logging step reports besides loss and schedules: collapse and stability statistics,
memory, and the warnings they trigger.

The loop asks `statistics_for(logging)` before each step: on logging steps the engine gets a
fresh StepStatistics to fill, on all others None, so ordinary steps do no extra work and no
extra host synchronisation.
"""
from __future__ import annotations

import logging

from dino_dist.config import Config
from dino_dist.observe.diagnostics import StepStatistics, parameter_groups, state_values
from dino_dist.observe.health import HealthMonitor, HealthWarning, small_batch_warning
from dino_dist.observe.memory import memory_values

LOG = logging.getLogger("dino_dist")


class StepReporter:
    def __init__(self, cfg: Config, engine, dataset_size: int, total_batch: int):
        self.engine = engine
        groups = parameter_groups(engine.student, engine.trainable,
                                  engine.last_layer_params)
        patch_center = engine.objective.patch_center
        self.stats = StepStatistics(cfg.model.out_dim, groups, engine.env.device,
                                    0 if patch_center is None else patch_center.center.shape[-1])
        self.collecting = False
        self.monitor = HealthMonitor(cfg.model.out_dim, cfg.log.collapse_window,
                                     cfg.train.precision,
                                     settle_steps=engine.schedules.steps_per_epoch)
        warning = small_batch_warning(total_batch, cfg.optim.teacher_momentum, dataset_size)
        if warning is not None:
            LOG.warning("warning: %s", warning.message)

    def statistics_for(self, logging_step: bool) -> StepStatistics | None:
        self.collecting = logging_step
        if not logging_step:
            return None
        self.stats.reset()
        return self.stats

    def values(self, loss: float) -> dict:
        """Diagnostics of the step just finished (if it collected them), state and memory."""
        engine = self.engine
        collected = self.stats.read(loss) if self.collecting else {}
        return {**collected, **state_values(engine.loss_fn.center, engine.scaler),
                **memory_values(engine.env.device)}

    def warnings(self, step: int, values: dict) -> list[HealthWarning]:
        found = self.monitor.check(step, values)
        for warning in found:
            LOG.warning("warning at step %d: %s", step, warning.message)
        return found
