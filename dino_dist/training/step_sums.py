"""What a step gathers over its micro-batches, summed over ranks in one all-reduce.

Device sums (teacher outputs, weighted loss, non-finite flag) grow micro-batch by micro-batch
without a host read; host counts (teacher rows, unreadable images, this rank's stop request)
join them only at the reduction, through pinned memory without blocking (a plain host-to-device
copy waits for the device).
"""
from __future__ import annotations

import torch

from dino_dist.distributed.collectives import all_reduce_sum_

# The step's figures after the reduction, in this order (summed over ranks).
FIGURES = ("loss_sum", "non_finite", "count", "skipped_images", "stop_votes")


class StepSums:
    def __init__(self, out_dim: int, device: torch.device, patch_dim: int = 0):
        """`patch_dim`: the patch head's width when the iBOT patch center is kept, else 0."""
        self.out_dim, self.patch_dim, self.device = out_dim, patch_dim, device
        self.reset()

    def reset(self) -> None:
        self.teacher_sum = torch.zeros(self.out_dim, device=self.device)
        # The teacher's masked-patch outputs summed, then their count (iBOT's center).
        self.patch_sum = torch.zeros(self.patch_dim + 1 if self.patch_dim else 0,
                                     device=self.device)
        self.loss = torch.zeros(2, device=self.device)  # weighted loss, non-finite flag
        self.count = 0  # teacher rows: global crops x images
        self.skipped_images = 0

    @torch.no_grad()
    def add(self, teacher_out: torch.Tensor, loss: torch.Tensor, loss_weight: float,
            skipped_images: int = 0, teacher_patches: torch.Tensor | None = None) -> None:
        loss = loss.detach()
        self.teacher_sum += teacher_out.float().sum(dim=0)
        if self.patch_dim and teacher_patches is not None:
            self.patch_sum[:-1] += teacher_patches.float().sum(dim=0)
            self.patch_sum[-1] += teacher_patches.shape[0]
        self.loss += torch.stack((loss * loss_weight, (~torch.isfinite(loss)).float()))
        self.count += teacher_out.shape[0]
        self.skipped_images += skipped_images

    def reduce(self, stop_requested: bool, stats=None
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """All-reduce [statistics |] teacher sum | patch sum and count | FIGURES; returns
        (teacher sum, patch sum and count or None, figures). `stats`
        (observe.diagnostics.StepStatistics, logging steps) rides in the same call."""
        host = torch.tensor([self.count, self.skipped_images, float(stop_requested)],
                            dtype=torch.float32)
        if self.device.type == "cuda":
            host = host.pin_memory()
        parts = (self.teacher_sum, self.patch_sum, self.loss,
                 host.to(self.device, non_blocking=True))
        if stats is not None:
            parts = (stats.reduction_part(), *parts)
        reduced = all_reduce_sum_(torch.cat(parts))
        if stats is not None:
            reduced = stats.take_reduced(reduced)
        patches = reduced[self.out_dim:self.out_dim + len(self.patch_sum)]
        return (reduced[: self.out_dim], patches if len(patches) else None,
                reduced[-len(FIGURES):])
