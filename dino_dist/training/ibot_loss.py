"""The iBOT masked-patch loss of dinov2 and its teacher center.

The student sees the global crops with some patches masked; at each masked patch it must
predict the teacher's (unmasked) patch distribution. Only masked tokens enter the loss, each
weighted so that every image counts the same however many of its patches were masked.

Teacher targets come either from the center below ("center" mode) or from
training.sinkhorn.sinkhorn_knopp over the step's masked teacher patch logits (Sinkhorn-Knopp
mode), as in dinov2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn




def ibot_patch_loss(student_patch_logits: torch.Tensor, teacher_patch_probs: torch.Tensor,
                    mask_weights: torch.Tensor, n_images: int,
                    student_temp: float = 0.1) -> torch.Tensor:
    """dinov2's iBOTPatchLoss.forward_masked: a float32 scalar.

    Rows are the masked tokens [M, K] (student logits, teacher probabilities), `mask_weights`
    [M] from models.patch_masks.mask_weights. The weighted cross-entropies are summed and divided by
    `n_images`: every global-crop image of the micro-batch, masked or not, so an image
    without masks still dilutes the loss as in dinov2.
    """
    student_logp = F.log_softmax(student_patch_logits.float() / student_temp, dim=-1)
    per_token = (teacher_patch_probs.float() * student_logp).sum(dim=-1)
    return -(per_token * mask_weights.float()).sum() / n_images


class IBOTCenter(nn.Module):
    """EMA center of the teacher's masked-patch logits ("center" mode).

    The batch center of a step is the mean over every masked token of the step on every
    rank: the engine all-reduces the sum of logits and the token count and passes both to
    `update`. dinov2 instead averages each rank's own token mean (sum of per-rank means /
    world size), which weights a rank's tokens by 1 / its count: the two agree only when
    every rank masks the same number of tokens. Here the center depends neither on the
    world size nor on how the tokens fall on ranks and micro-batches.
    The buffer is [1, K] (dinov2's is [1, 1, K]).
    """

    def __init__(self, out_dim: int, center_momentum: float = 0.9):
        super().__init__()
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def probabilities(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        """Centred, sharpened teacher targets [M, K], float32 (the softmax at T ~ 0.04
        overflows in half precision)."""
        return F.softmax((teacher_logits.float() - self.center) / temp, dim=-1)

    @torch.no_grad()
    def update(self, global_sum: torch.Tensor, global_count: float | torch.Tensor,
               applied: torch.Tensor | None = None) -> None:
        """Fold the step's all-reduced masked-token logit sum [K] and count into the EMA.

        `applied` (a device bool) keeps the center when false, so a skipped step is decided
        on the device without a host read. A step without any masked token (count 0) keeps
        the center too, rather than averaging zero tokens into it.
        """
        device = self.center.device
        # A host count becomes a device fill, not a host-to-device copy (which would wait).
        count = (global_count.to(device, torch.float32) if torch.is_tensor(global_count)
                 else torch.full((), float(global_count), device=device))
        batch_center = global_sum.float().view_as(self.center) / count.clamp(min=1)
        moved = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        keep = count <= 0 if applied is None else (count <= 0) | ~applied
        self.center.copy_(torch.where(keep, self.center, moved))
