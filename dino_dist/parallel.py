"""The only module that knows about DDP: how the student (and teacher) are placed and wrapped.

The teacher is never trained, so it is not wrapped; the student is wrapped in DDP when there
is more than one process. Models with BatchNorm (ResNet) get SyncBatchNorm under DDP so their
statistics cover the global batch, as in the reference recipe.
"""
from __future__ import annotations

import inspect

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dino_dist.dist import DistEnv


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def place_models(student: nn.Module, teacher: nn.Module, env: DistEnv) -> tuple[nn.Module, nn.Module]:
    if env.distributed and has_batchnorm(student):
        student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
    student, teacher = student.to(env.device), teacher.to(env.device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def wrap_student(student: nn.Module, env: DistEnv) -> nn.Module:
    """The module the engine calls forward/backward on (DDP when distributed)."""
    if not env.distributed:
        return student
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    # No buffer sync in forward: BN statistics are synchronised by SyncBatchNorm already.
    # (torch renamed the flag; the old name still works but warns.)
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in params
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(student, device_ids=device_ids, **no_buffer_sync)
