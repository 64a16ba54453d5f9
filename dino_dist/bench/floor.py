"""The model floor: the arithmetic a DINO step cannot avoid, with nothing else.

Student forward and backward over all crops and teacher forward over the global crops,
batched by resolution exactly as training does (MultiCropWrapper) and under the same
autocast — but no loss, center, clipping, optimizer or EMA. Images/s of the real step
divided by images/s of this floor is the framework's efficiency.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class ModelFloor:
    def __init__(self, student: nn.Module, teacher: nn.Module, n_global_crops: int,
                 autocast_dtype: torch.dtype | None, device: torch.device):
        self.student, self.teacher = student, teacher
        self.n_global_crops = n_global_crops
        self.autocast_dtype, self.device = autocast_dtype, device
        self._output_grad: torch.Tensor | None = None

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def __call__(self, crops: list[torch.Tensor]) -> None:
        with self._autocast():
            with torch.no_grad():
                self.teacher(crops[: self.n_global_crops])
            student_out = self.student(crops)
        if self._output_grad is None or self._output_grad.shape != student_out.shape:
            self._output_grad = torch.ones_like(student_out)
        # The gradient of the outputs is given directly: no loss is computed at all.
        student_out.backward(self._output_grad)
        self.student.zero_grad(set_to_none=True)
