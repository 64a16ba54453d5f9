"""Placement and wrapping: SyncBatchNorm under DDP for BN models, frozen teacher."""
from __future__ import annotations

import torch
from torch import nn

from dino_dist.distributed.env import DistEnv
from dino_dist.models import build_model
from dino_dist.distributed.parallel import place_models, wrap_student

CPU = torch.device("cpu")


def small_bn_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())


def test_batchnorm_becomes_syncbn_only_when_distributed():
    two = DistEnv(rank=0, world_size=2, local_rank=0, device=CPU)
    student, teacher = place_models(small_bn_model(), small_bn_model(), two)
    assert isinstance(student[1], nn.SyncBatchNorm) and isinstance(teacher[1], nn.SyncBatchNorm)
    one = DistEnv(rank=0, world_size=1, local_rank=0, device=CPU)
    student, _ = place_models(small_bn_model(), small_bn_model(), one)
    assert type(student[1]) is nn.BatchNorm2d


def test_teacher_is_frozen_and_single_process_is_not_wrapped():
    one = DistEnv(rank=0, world_size=1, local_rank=0, device=CPU)
    student = build_model("vit_mini", 8, 0.0, 64, head_hidden_dim=32, head_bottleneck_dim=16)
    teacher = build_model("vit_mini", 8, 0.0, 64, head_hidden_dim=32, head_bottleneck_dim=16)
    student, teacher = place_models(student, teacher, one)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert any(p.requires_grad for p in student.parameters())
    assert wrap_student(student, one) is student
