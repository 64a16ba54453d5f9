"""The DINO loss and its center.

The center is an EMA of the teacher's mean output over the *global* batch. The engine adds
each micro-batch's teacher outputs into `StepSums.teacher_sum` (training.step_sums); the sum
is all-reduced once per optimizer step and only then folded into the center, so every
micro-batch of a step (and every rank) uses the same old center — which is what makes k
micro-batches or N ranks give the same math as one big batch.
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
        """Cross-entropy over every (teacher global crop i, student crop v != i) pair, the
        teacher centred and sharpened. Outputs are crop-major: crop 0's batch, then crop 1's."""
        return self.cross_entropy(student_out, self.teacher_probabilities(teacher_out, teacher_temp),
                                  n_crops)

    @torch.no_grad()
    def teacher_probabilities(self, teacher_out: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """softmax((t - center) / T), in fp32: the sharpened softmax (T = 0.04) overflows in
        half precision."""
        return F.softmax((teacher_out.float() - self.center) / teacher_temp, dim=-1)

    def cross_entropy(self, student_out: torch.Tensor, teacher_p: torch.Tensor,
                      n_crops: int) -> torch.Tensor:
        """The mean over the (i, v != i) pairs of -<p_i, log softmax(s_v / T_s)>, per image;
        `teacher_p`: the targets of the global crops (centred, or Sinkhorn-Knopp's)."""
        student_logp = F.log_softmax(student_out.float() / self.student_temp, dim=-1)
        out_dim = student_logp.shape[-1]
        student_logp = student_logp.view(n_crops, -1, out_dim)
        teacher_p = teacher_p.detach().view(self.n_global_crops, -1, out_dim)
        # Sum over pairs (i, v != i) of <p_i, logp_v> = <sum_i p_i, sum_v logp_v>
        # - sum_i <p_i, logp_i>: two products of the batch's size instead of one per pair,
        # which halves the loss's share of a step with 10 crops (dino-bench's loss phase).
        all_pairs = (teacher_p.sum(0) * student_logp.sum(0)).sum()
        same_crop = (teacher_p * student_logp[: self.n_global_crops]).sum()
        pairs = self.n_global_crops * (n_crops - 1)
        batch = student_logp.shape[1]
        return (same_crop - all_pairs) / (batch * pairs)

    @torch.no_grad()
    def update_center(self, global_sum: torch.Tensor, global_count: float | torch.Tensor,
                      applied: torch.Tensor | None = None) -> None:
        """Fold the all-reduced sum of teacher outputs of one optimizer step into the EMA.

        `applied` (a device bool) leaves the center as it was when false: a skipped step
        decides on the device, so the host never waits for the verdict."""
        batch_center = (global_sum / global_count).view_as(self.center)
        moved = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        self.center.copy_(moved if applied is None else torch.where(applied, moved, self.center))
