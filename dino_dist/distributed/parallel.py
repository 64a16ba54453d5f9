"""How the student and teacher are placed, wrapped and sharded (DDP, FSDP2): the one place
that applies parallelism to the models. (The engine then only asks the wrapper for gradient
sync or its shards; the sharded checkpoint format stores whatever layout it is given.)

Everything applied to the models happens here, in one fixed order (`prepare_models`):
activation checkpointing per block, then torch.compile per block, then sharding (FSDP2:
each block, then the root) or the DDP wrapper. Checkpointing must wrap the eager block that
compile then traces, and FSDP must see the final blocks to hook its all-gathers around them.

DDP: the teacher is never trained, so it is not wrapped. FSDP: the teacher is sharded exactly
like the student, so the EMA runs shard by shard with no gather. Models with BatchNorm (ResNet)
get SyncBatchNorm so their statistics cover the global batch, as in the reference recipe.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dino_dist.config import TrainConfig
from dino_dist.distributed.env import DistEnv


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


def block_units(model: nn.Module) -> list[nn.Module]:
    """The repeated units of a DINO model (student or teacher): transformer blocks, or the
    four ResNet stages. They are what gets checkpointed, compiled and sharded one by one."""
    backbone = getattr(model, "backbone", model)
    if hasattr(backbone, "blocks"):
        return list(backbone.blocks)
    return [getattr(backbone, f"layer{i}") for i in range(1, 5) if hasattr(backbone, f"layer{i}")]


def apply_block_options(model: nn.Module, train: TrainConfig) -> None:
    """Activation checkpointing, then compile, per block; in place, parameter names unchanged."""
    for unit in block_units(model):
        if train.activation_checkpointing:
            from torch.distributed._composable import checkpoint as checkpoint_activations
            checkpoint_activations(unit)
        if train.compile:
            unit.compile()


def shard(model: nn.Module, precision: str) -> nn.Module:
    """FSDP2 per block, then the root. bf16: bf16 compute, fp32 master weights and reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" else MixedPrecisionPolicy()
    for unit in block_units(model):
        fully_shard(unit, mp_policy=policy)
    return fully_shard(model, mp_policy=policy)


def prepare_models(student: nn.Module, teacher: nn.Module, env: DistEnv,
                   train: TrainConfig) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(module to run forward/backward on, student, teacher), all options applied."""
    student, teacher = place_models(student, teacher, env)
    apply_block_options(student, train)
    # The teacher never runs backward: recomputing its activations would buy nothing.
    apply_block_options(teacher, TrainConfig(compile=train.compile))
    if train.parallel == "fsdp" and env.distributed:
        student, teacher = shard(student, train.precision), shard(teacher, train.precision)
        return student, student, teacher
    return wrap_student(student, env), student, teacher


def release_gathered_parameters(model: nn.Module) -> None:
    """Free what a sharded root gathered for its last forward (a no-op when not sharded).

    FSDP2 keeps a root's gathered parameters until its backward. A forward with no backward
    after it (the teacher, evaluation) must release them: otherwise the next forward would
    reuse them even after the shards changed (the teacher's EMA).
    """
    if hasattr(model, "reshard"):
        model.reshard()
