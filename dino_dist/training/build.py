"""Assemble a run from its config: models, loss, optimizer, schedules, data, engine.

Kept apart from the entry point so tests and tools (benchmark, k-NN) build exactly what
training builds.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dino_dist.config import Config, ConfigError
from dino_dist.data import build_train_loader
from dino_dist.distributed.env import DistEnv, configure_cpu_threads
from dino_dist.training.engine import DinoEngine
from dino_dist.data.masking import MaskSampler
from dino_dist.training.ibot_loss import IBOTCenter
from dino_dist.training.loss import DINOLoss
from dino_dist.training.objective import Objective, ObjectiveSettings
from dino_dist.models import build_model, last_layer_parameters
from dino_dist.training.param_groups import optimizer_param_groups
from dino_dist.models.packing import packs_evenly
from dino_dist.distributed.parallel import prepare_models
from dino_dist.training.schedules import build_schedules, micro_batches_per_epoch, steps_per_epoch

LOG = logging.getLogger("dino_dist")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def student_packs_crops(cfg: Config) -> bool:
    """model.packed_crops (config validation has checked the arch); uneven crop counts warn."""
    if not cfg.model.packed_crops:
        return False
    n_global, n_local = cfg.data.global_crops_number, cfg.data.local_crops_number
    if n_local and not packs_evenly(n_global, n_local):
        LOG.warning("model.packed_crops: %d local crops do not split evenly over %d global "
                    "crops, so the student runs per crop resolution (unpacked)", n_local, n_global)
    return True


def patch_head_width(cfg: Config) -> int:
    """The iBOT targets' width: the DINO head's, or the separate patch head's."""
    if cfg.ibot.separate_head:
        return cfg.ibot.out_dim or cfg.model.out_dim
    return cfg.model.out_dim


def build_student_teacher(cfg: Config) -> tuple[nn.Module, nn.Module]:
    """Student and teacher start identical; the teacher has no stochastic depth and sees
    one resolution (the global crops), so it never packs."""
    m, ibot = cfg.model, cfg.ibot.weight > 0
    common = dict(arch=m.arch, patch_size=m.patch_size, img_size=m.img_size, out_dim=m.out_dim,
                  use_bn_in_head=m.use_bn_in_head, norm_last_layer=m.norm_last_layer,
                  head_hidden_dim=m.head_hidden_dim, head_bottleneck_dim=m.head_bottleneck_dim)
    if m.arch.startswith("vit"):
        common.update(layerscale_init=m.layerscale, num_registers=m.num_registers, ffn=m.ffn,
                      drop_path_uniform=m.drop_path_uniform, mask_token=ibot,
                      patch_head_out_dim=patch_head_width(cfg) if ibot and cfg.ibot.separate_head else 0)
    student = build_model(drop_path_rate=m.drop_path_rate, packed_crops=student_packs_crops(cfg),
                          **common)
    teacher = build_model(drop_path_rate=0.0, **common)
    teacher.load_state_dict(student.state_dict())
    return student, teacher


def build_objective(cfg: Config, device: torch.device) -> Objective:
    """The DINO term and its center, and the DINOv2 options the config turns on."""
    dino = DINOLoss(cfg.model.out_dim, cfg.data.global_crops_number, cfg.loss.student_temp,
                    cfg.loss.center_momentum).to(device)
    patch_center = None
    if cfg.ibot.weight > 0:
        patch_center = IBOTCenter(patch_head_width(cfg), cfg.loss.center_momentum).to(device)
    return Objective(ObjectiveSettings.from_config(cfg), dino, patch_center)


def build_masking(cfg: Config) -> MaskSampler | None:
    """The iBOT masks of a sample's global crops, drawn in the loader (None when iBOT is off)."""
    if cfg.ibot.weight == 0:
        return None
    grid = cfg.data.global_crop_size // cfg.model.patch_size
    return MaskSampler(cfg.data.global_crops_number, grid, cfg.ibot.mask_probability,
                       tuple(cfg.ibot.mask_ratio))


def build_optimizer(student: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    groups = optimizer_param_groups(student, cfg.optim.layerwise_decay,
                                    cfg.optim.patch_embed_lr_mult)
    # The fused kernel (CUDA and CPU) runs the whole update in one pass per tensor:
    # 2.4-7x faster than the foreach path on CPU (dino-bench's optimizer phase).
    fast = {"fused": True} if device.type in ("cuda", "cpu") else {"foreach": True}
    return torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.optim.betas), **fast)


@dataclass
class Training:
    engine: DinoEngine
    student: nn.Module  # unwrapped
    teacher: nn.Module
    loader: object
    sampler: object


def require_koleo_neighbours(cfg: Config, world_size: int) -> None:
    """KoLeo needs a nearest *other* row. With one row the row is its own neighbour, at
    distance eps, and its gradient is noise of norm ~100 (a loss of ~32), so refuse it."""
    if cfg.loss.koleo_weight == 0:
        return
    # The smallest set KoLeo sees: one micro-batch, on one rank or (global scope) on every
    # rank; an epoch's short last group may hold a single micro-batch.
    per_rank = cfg.loss.koleo_scope == "per_rank"
    rows = cfg.optim.batch_size_per_gpu * (1 if per_rank else world_size)
    if rows < 2:
        where = "per rank" if per_rank else f"over {world_size} rank(s)"
        raise ConfigError(
            f"loss.koleo_weight={cfg.loss.koleo_weight} needs at least 2 images per micro-batch "
            f"{where} (KoLeo spreads each feature away from its nearest other one), got "
            f"optim.batch_size_per_gpu={cfg.optim.batch_size_per_gpu}: raise "
            f"optim.batch_size_per_gpu, or set loss.koleo_weight=0")


def build_training(cfg: Config, env: DistEnv, clock=None) -> Training:
    """`clock`: the engine's phase clock (dino-bench); None in training."""
    require_koleo_neighbours(cfg, env.world_size)
    configure_cpu_threads(env, cfg.data.num_workers)
    seed_everything(cfg.train.seed)  # identical initial weights on every rank
    student, teacher = build_student_teacher(cfg)
    wrapped, student, teacher = prepare_models(student, teacher, env, cfg.train)
    seed_everything(cfg.train.seed + env.rank)  # stochastic depth differs per rank
    o = cfg.optim
    loader, sampler, _dataset = build_train_loader(
        cfg.data, o.batch_size_per_gpu, env.rank, env.world_size, cfg.train.seed,
        pin_memory=env.device.type == "cuda", masking=build_masking(cfg))
    # At least one: the loader refuses a dataset with fewer images per rank than one batch.
    micro = micro_batches_per_epoch(sampler.samples_per_rank, o.batch_size_per_gpu)
    schedules = build_schedules(cfg, env.world_size, steps_per_epoch(micro, o.accum_steps))
    engine = DinoEngine(
        wrapped, student, teacher, build_objective(cfg, env.device),
        build_optimizer(student, cfg, env.device), schedules,
        env, precision=cfg.train.precision, clip_grad=o.clip_grad, clip_mode=o.clip_mode,
        freeze_last_layer_epochs=o.freeze_last_layer,
        last_layer_params=last_layer_parameters(student),
        max_nonfinite_steps=cfg.train.max_nonfinite_steps, clock=clock)
    teacher.train()  # as the reference: BN (ResNet) uses batch statistics in the teacher too
    wrapped.train()
    return Training(engine, student, teacher, loader, sampler)
