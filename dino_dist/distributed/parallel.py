"""How the student and teacher are placed, wrapped and sharded (DDP, FSDP2): the one place
that applies parallelism to the models. (The engine then only asks the wrapper for gradient
sync or its shards; the sharded checkpoint format stores whatever layout it is given.)

Everything applied to the models happens here, in one fixed order (`prepare_models`):
activation checkpointing per unit, then torch.compile per unit, then sharding (FSDP2: each
unit, then the root) or the DDP wrapper. Checkpointing must wrap the eager unit that compile
then traces, and FSDP must see the final units to hook its all-gathers around them. The units
are what each model declares (`distributed/units.py`: ViT blocks, ResNet stages, the DINO
head); a model that declares none is refused rather than wrapped whole.

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
from dino_dist.distributed.units import declared_units


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


def apply_block_options(model: nn.Module, train: TrainConfig) -> None:
    """Activation checkpointing, then compile, on the units the model declares; in place,
    parameter names unchanged."""
    units = declared_units(model)
    if train.activation_checkpointing:
        from torch.distributed._composable import checkpoint as checkpoint_activations
        for unit in units.checkpoint:
            checkpoint_activations(unit)
    if train.compile:
        for unit in units.compile:
            unit.compile()


def shard(model: nn.Module, precision: str) -> nn.Module:
    """FSDP2 per declared unit, then the root. bf16: bf16 compute, fp32 master weights and
    reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    units = list(declared_units(model).shard)
    if not units:  # one whole-model unit would gather every parameter at once
        raise TypeError(f"{type(model).__name__} declares no units to shard")
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" else MixedPrecisionPolicy()
    for unit in units[:-1]:
        fully_shard(unit, mp_policy=policy)
    # Backward starts with the unit forward ended with (the DINO head): resharding it after
    # forward would only all-gather it again at once. After a forward with no backward,
    # release_gathered_parameters frees it.
    fully_shard(units[-1], mp_policy=policy, reshard_after_forward=False)
    return fully_shard(model, mp_policy=policy)


def prepare_models(student: nn.Module, teacher: nn.Module, env: DistEnv,
                   train: TrainConfig) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(module to run forward/backward on, student, teacher), all options applied. Both
    models must declare their units (`apply_block_options` asks them in every run)."""
    student, teacher = place_models(student, teacher, env)
    apply_block_options(student, train)
    # The teacher never runs backward: recomputing its activations would buy nothing.
    apply_block_options(teacher, TrainConfig(compile=train.compile))
    if train.parallel == "fsdp" and env.distributed:
        student, teacher = shard(student, train.precision), shard(teacher, train.precision)
        return student, student, teacher
    return wrap_student(student, env), student, teacher


def release_gathered_parameters(model: nn.Module) -> None:
    """Free what sharded modules gathered for their last forward (a no-op when not sharded).

    FSDP2 keeps the gathered parameters of the root and of the last unit (`shard`) until
    their backward. A forward with no backward after it (the teacher, evaluation) must release
    them: otherwise the next forward would reuse them even after the shards changed (the
    teacher's EMA). `reshard` is per module, not recursive.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
