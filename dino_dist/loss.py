"""The DINO loss and its center.

The center is an EMA of the teacher's mean output over the *global* batch. The engine adds
each micro-batch's teacher outputs into `pending_sum`; the sum is all-reduced once per
optimizer step and only then folded into the center, so every micro-batch of a step (and
every rank) uses the same old center — which is what makes k micro-batches or N ranks give
the same math as one big batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOLoss(nn.Module):
    def __init__(self, out_dim: int, n_global_crops: int = 2, student_temp: float = 0.1,
                 center_momentum: float = 0.9):
        super().__init__()
        self.n_global_crops = n_global_crops
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_out: torch.Tensor, teacher_out: torch.Tensor,
                teacher_temp: float, n_crops: int) -> torch.Tensor:
        """Cross-entropy over every (teacher global crop i, student crop v != i) pair.

        Outputs are crop-major: crop 0's batch, then crop 1's, ... Computed in fp32 because
        the sharpened teacher softmax (T = 0.04) overflows in half precision.
        """
        student_logp = F.log_softmax(student_out.float() / self.student_temp, dim=-1)
        teacher_p = F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1)
        student_chunks = student_logp.chunk(n_crops)
        teacher_chunks = teacher_p.detach().chunk(self.n_global_crops)
        total, pairs = student_out.new_zeros((), dtype=torch.float32), 0
        for i, target in enumerate(teacher_chunks):
            for v, logp in enumerate(student_chunks):
                if v == i:
                    continue
                total = total + torch.sum(-target * logp, dim=-1).mean()
                pairs += 1
        return total / pairs

    @torch.no_grad()
    def update_center(self, global_sum: torch.Tensor, global_count: float) -> None:
        """Fold the all-reduced sum of teacher outputs of one optimizer step into the EMA."""
        batch_center = (global_sum / global_count).view_as(self.center)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)
