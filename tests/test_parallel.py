"""Placement and wrapping: SyncBatchNorm under DDP for BN models, frozen teacher; the units
each model declares, and that checkpointing, compile and sharding apply to exactly those."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from dino_dist.config import TrainConfig
from dino_dist.distributed.env import DistEnv
from dino_dist.distributed.parallel import (apply_block_options, place_models, prepare_models,
                                            release_gathered_parameters, shard, wrap_student)
from dino_dist.distributed.units import ParallelUnits, declared_units
from dino_dist.models import DINOHead, MultiCropWrapper, build_backbone, build_model
from dino_dist.models.resnet import resnet50_backbone

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


# What each model declares (distributed/units.py), and that parallel.py applies exactly that.

def mini_model(arch: str = "vit_mini") -> nn.Module:
    return build_model(arch, 8, 0.0, 64, head_hidden_dim=32, head_bottleneck_dim=16, img_size=32)


def test_vit_declares_each_block_for_every_option():
    vit = build_backbone("vit_mini", 8, img_size=32)
    units = declared_units(vit)
    for declared in (units.shard, units.compile, units.checkpoint):
        assert list(declared) == list(vit.blocks) and len(declared) == 4


def test_resnet_declares_its_four_stages():
    resnet = resnet50_backbone()
    stages = [resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4]
    units = declared_units(resnet)
    assert list(units.shard) == list(units.compile) == list(units.checkpoint) == stages


def test_head_is_one_shard_unit_neither_compiled_nor_recomputed():
    head = DINOHead(16, 8, hidden_dim=32, bottleneck_dim=8)
    assert declared_units(head) == ParallelUnits(shard=[head])


def test_multicrop_declares_the_backbone_units_then_the_head():
    model = mini_model("resnet50")
    backbone, head = declared_units(model.backbone), declared_units(model.head)
    units = declared_units(model)
    assert list(units.shard) == [*backbone.shard, model.head]
    assert list(units.compile) == list(backbone.compile) == list(units.checkpoint)
    assert head.compile == head.checkpoint == ()


def test_a_model_without_declarations_is_refused():
    one = DistEnv(rank=0, world_size=1, local_rank=0, device=CPU)
    with pytest.raises(TypeError, match="^Sequential declares no parallel units: give it a "
                                        "parallel_units"):
        prepare_models(small_bn_model(), small_bn_model(), one, TrainConfig())
    undeclared = MultiCropWrapper(nn.Sequential(nn.Flatten(), nn.Linear(12, 16)),
                                  DINOHead(16, 8, hidden_dim=32, bottleneck_dim=8))
    with pytest.raises(TypeError, match="^Sequential declares no parallel units"):
        apply_block_options(undeclared, TrainConfig())


def test_units_from_outside_the_model_are_refused():
    class Borrower(nn.Module):
        def __init__(self):
            super().__init__()
            self.own = nn.Linear(2, 2)

        def parallel_units(self) -> ParallelUnits:
            return ParallelUnits(shard=[self.own, nn.Conv2d(1, 1, 1)])

    with pytest.raises(TypeError, match="names modules that are not part of it: Conv2d"):
        declared_units(Borrower())


def forward_counts(modules: dict[str, nn.Module]) -> dict[str, int]:
    counts = dict.fromkeys(modules, 0)
    for name, module in modules.items():
        module.register_forward_hook(lambda *_, name=name: counts.__setitem__(name, counts[name] + 1))
    return counts


def test_activation_checkpointing_recomputes_the_declared_units_only():
    model = mini_model()
    apply_block_options(model, TrainConfig(activation_checkpointing=True))
    # Inner modules of a checkpointed unit run again in backward; the unit's own hook does not.
    counts = forward_counts({f"attn{i}": b.attn for i, b in enumerate(model.backbone.blocks)}
                            | {"head": model.head.mlp[0], "patches": model.backbone.patch_embed})
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert counts == {"attn0": 2, "attn1": 2, "attn2": 2, "attn3": 2, "head": 1, "patches": 1}


def test_compile_applies_to_the_declared_units_only():
    model = mini_model()
    apply_block_options(model, TrainConfig(compile=True))  # lazy: nothing is traced yet
    compiled = [name for name, m in model.named_modules() if m._compiled_call_impl is not None]
    assert compiled == [f"backbone.blocks.{i}" for i in range(4)]


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_sharding_wraps_the_declared_units_and_release_frees_the_head(one_rank_group):
    model = shard(mini_model(), "fp32")
    assert [name for name, m in model.named_modules() if isinstance(m, FSDPModule)] == [
        "", "backbone.blocks.0", "backbone.blocks.1", "backbone.blocks.2", "backbone.blocks.3",
        "head"]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    # The head (the last unit) stays gathered for a backward that a no-grad pass never runs.
    assert not isinstance(model.head.mlp[0].weight, DTensor)
    assert isinstance(model.backbone.blocks[0].attn.qkv.weight, DTensor)
    release_gathered_parameters(model)
    assert all(isinstance(p, DTensor) for p in model.parameters())


def test_sharding_a_model_that_declares_no_shard_units_is_refused(one_rank_group):
    class Flat(nn.Linear):
        def parallel_units(self) -> ParallelUnits:
            return ParallelUnits()

    with pytest.raises(TypeError, match="Flat declares no units to shard"):
        shard(Flat(2, 2), "fp32")
