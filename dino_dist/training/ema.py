"""The teacher as an exponential moving average of the student, with fused foreach ops."""
from __future__ import annotations

import torch
from torch import nn

from dino_dist.training.clipping import local_tensors


class TeacherEMA:
    def __init__(self, student: nn.Module, teacher: nn.Module):
        # Every student tensor (trainable or frozen) mirrors a teacher tensor, in order.
        self.student = list(student.parameters())
        self.teacher = list(teacher.parameters())

    @torch.no_grad()
    def update(self, momentum: float, applied: torch.Tensor) -> None:
        """teacher = momentum * teacher + (1 - momentum) * student, where `applied` (a device
        bool) holds; a skipped step keeps the teacher (momentum 1), decided on the device."""
        # Sharded models are sharded alike, so the EMA runs shard by shard with no gather.
        # The shards are looked up each time: FSDP may re-point them (e.g. at its lazy init).
        teacher, student = local_tensors(self.teacher), local_tensors(self.student)
        kept = torch.where(applied, momentum, 1.0)
        torch._foreach_mul_(teacher, kept)
        torch._foreach_add_(teacher, torch._foreach_mul(student, 1.0 - kept))
