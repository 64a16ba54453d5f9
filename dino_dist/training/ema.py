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
        taken = torch.where(applied, 1.0 - momentum, 0.0)
        if _LERP_TAKES_A_TENSOR:
            # teacher + taken * (student - teacher): one pass over both lists, no temporary
            # copy of the student (mul, mul and add took three and one); a skipped step
            # (taken 0) leaves the teacher exactly as it was.
            torch._foreach_lerp_(teacher, student, taken)
        else:
            torch._foreach_mul_(teacher, 1.0 - taken)
            torch._foreach_add_(teacher, torch._foreach_mul(student, taken))


def _lerp_takes_a_tensor() -> bool:
    """Whether this torch has _foreach_lerp_ with a tensor weight (one read on the device)."""
    try:
        torch._foreach_lerp_([torch.zeros(1)], [torch.ones(1)], torch.tensor(0.5))
    except (RuntimeError, TypeError):
        return False
    return True


_LERP_TAKES_A_TENSOR = _lerp_takes_a_tensor()
