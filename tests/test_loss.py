"""The DINO loss against an independent transcription of the reference formula."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dino_dist.training.loss import DINOLoss


def reference_dino_loss(student_output, teacher_output, center, ncrops, student_temp, temp):
    """The reference implementation's arithmetic, pair by pair."""
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / temp, dim=-1).chunk(2)
    total, n_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            total += torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            n_terms += 1
    return total / n_terms


def test_matches_reference_formula():
    torch.manual_seed(0)
    batch, ncrops, out_dim = 5, 6, 64
    student = torch.randn(batch * ncrops, out_dim)
    teacher = torch.randn(batch * 2, out_dim)
    loss_fn = DINOLoss(out_dim, student_temp=0.1)
    loss_fn.center.copy_(torch.randn(1, out_dim) * 0.1)
    ours = loss_fn(student, teacher, teacher_temp=0.05, n_crops=ncrops)
    ref = reference_dino_loss(student, teacher, loss_fn.center, ncrops, 0.1, 0.05)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_uniform_outputs_give_log_out_dim():
    out_dim = 256
    loss = DINOLoss(out_dim)(torch.zeros(4 * 4, out_dim), torch.zeros(4 * 2, out_dim), 0.04, 4)
    assert math.isclose(loss.item(), math.log(out_dim), rel_tol=1e-6)


def test_forward_does_not_move_center_and_update_is_ema():
    out_dim = 8
    loss_fn = DINOLoss(out_dim, center_momentum=0.9)
    teacher = torch.arange(4 * out_dim, dtype=torch.float32).view(4, out_dim)
    loss_fn(torch.randn(8, out_dim), teacher, 0.04, 4)
    assert loss_fn.center.abs().sum() == 0
    loss_fn.update_center(teacher.sum(0), teacher.shape[0])
    torch.testing.assert_close(loss_fn.center, 0.1 * teacher.mean(0, keepdim=True))


def test_gradient_flows_only_to_student():
    student = torch.randn(12, 16, requires_grad=True)
    teacher = torch.randn(4, 16, requires_grad=True)
    DINOLoss(16)(student, teacher, 0.04, 6).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
