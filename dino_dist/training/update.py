"""The optimizer update of one step: unscale (fp16), clip, schedule, and a step gated by the
step's verdict, so a step with a non-finite loss or gradients changes nothing.

The verdict is a device bool. With a fused optimizer (the default, see build_optimizer) the
gate is applied on the device: the host never waits for it. Under fp16 the GradScaler has a
verdict of its own (inf/NaN in the scaled gradients) that it gives only as a host read; the
step is applied when both agree it may be: a non-finite loss is skipped even when the
gradients the scaler saw were finite.
"""
from __future__ import annotations

import torch
from torch import nn

from dino_dist.training.clipping import clip_gradients
from dino_dist.training.schedules import Schedules


class OptimizerUpdate:
    def __init__(self, optimizer: torch.optim.Optimizer, schedules: Schedules,
                 trainable: list[nn.Parameter], device: torch.device, precision: str = "fp32",
                 clip_grad: float = 0.0, clip_mode: str = "per_param",
                 freeze_last_layer_epochs: int = 0,
                 last_layer_params: list[nn.Parameter] | None = None):
        self.optimizer, self.schedules, self.trainable = optimizer, schedules, trainable
        self.clip_grad, self.clip_mode = clip_grad, clip_mode
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        self.last_layer_params = last_layer_params or []
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    def unscale_and_clip(self, epoch: int, stats=None) -> torch.Tensor:
        """The gradients as the optimizer will use them; returns their norm before clipping.
        The last layer's gradient is dropped while it is frozen (DINO's first epochs)."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_gradients(self.trainable, self.clip_grad, self.clip_mode, stats)
        if epoch < self.freeze_last_layer_epochs:
            for p in self.last_layer_params:
                p.grad = None
        return grad_norm

    def step(self, schedule_step: int, verdict: torch.Tensor) -> torch.Tensor:
        """Set lr and weight decay for `schedule_step`, step if `verdict` (a device bool) lets
        it; returns whether the step was applied (fp16: also by the GradScaler)."""
        self._apply_schedule(schedule_step)
        if self.scaler.is_enabled():
            return self._scaled_step_if(verdict)
        self._step_if(verdict)
        return verdict

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _apply_schedule(self, step: int) -> None:
        lr, wd = float(self.schedules.lr[step]), float(self.schedules.wd[step])
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_multiplier", 1.0)
            if group.get("weight_decay_applies", True):
                group["weight_decay"] = wd

    def _step_if(self, verdict: torch.Tensor) -> None:
        """A fused optimizer skips on the device when handed `found_inf`, as under a
        GradScaler (parameters, moments and step counts untouched); others need the host."""
        if not self.optimizer.defaults.get("fused"):
            if bool(verdict):
                self.optimizer.step()
            return
        self.optimizer.found_inf = (~verdict).float()
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf

    def _scaled_step_if(self, verdict: torch.Tensor) -> torch.Tensor:
        """fp16: the GradScaler skips a step with inf/NaN gradients and says so only by
        lowering its scale, a host read, so this path waits for the device every step anyway.
        update() runs on every step: it backs the scale off after an overflow, skipped or not."""
        scale_before = self.scaler.get_scale()
        if bool(verdict):
            self.scaler.step(self.optimizer)
        self.scaler.update()
        scaler_applied = self.scaler.get_scale() >= scale_before
        return verdict & torch.tensor(scaler_applied, device=verdict.device)
