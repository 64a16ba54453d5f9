"""The DINO forward: the teacher on the global crops, the student on every crop, the loss.

Training (the engine's micro-batches) and the validation loss (eval.periodic) run this one
forward, so the validation loss is the training loss on other images, not a second copy of it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from dino_dist.distributed.parallel import release_gathered_parameters
from dino_dist.training.clock import IdleClock
from dino_dist.training.loss import DINOLoss

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ForwardOutputs:
    teacher: torch.Tensor  # [global crops x batch, out_dim], no grad
    student: torch.Tensor  # [crops x batch, out_dim]
    loss: torch.Tensor


class DinoForward:
    def __init__(self, teacher: nn.Module, loss_fn: DINOLoss, n_global_crops: int,
                 precision: str, device: torch.device, clock=None):
        self.teacher, self.loss_fn, self.n_global_crops = teacher, loss_fn, n_global_crops
        self.autocast_dtype = AUTOCAST_DTYPES.get(precision)
        self.device = device
        self.clock = clock or IdleClock()

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def __call__(self, student: nn.Module, crops: list[torch.Tensor],
                 teacher_temp: float) -> ForwardOutputs:
        """`student`: the module to run (training passes its DDP wrapper, evaluation the model
        itself); the crops are crop-major and already on the device."""
        with self.autocast():
            with torch.no_grad():
                teacher_out = self.teacher(crops[: self.n_global_crops])
            # A sharded teacher keeps what it gathered until a backward that never comes:
            # the next forward would then use the weights from before the EMA.
            release_gathered_parameters(self.teacher)
            self.clock.mark("teacher_forward")
            student_out = student(crops)
            self.clock.mark("student_forward")
            loss = self.loss_fn(student_out, teacher_out, teacher_temp, len(crops))
            self.clock.mark("loss")
        return ForwardOutputs(teacher_out, student_out, loss)
