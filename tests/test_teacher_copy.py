"""The teacher's low-precision twin (training/teacher_copy.py): bit-identical to the teacher
under autocast, refreshed from it at every pass, sharing all but the cast weights."""
from __future__ import annotations

import torch

from dino_dist.config import load_config
from dino_dist.distributed.env import DistEnv
from dino_dist.training.build import build_student_teacher, seed_everything
from dino_dist.training.teacher_copy import LowPrecisionTeacher
from tests.conftest import tiny_overrides
from tests.test_engine import make_engine, random_crops

CPU = torch.device("cpu")
DINOV2 = ["ibot.weight=1.0", "ibot.separate_head=true", "ibot.out_dim=64", "model.num_registers=2",
          "model.layerscale=1e-5"]


def teacher_of(tmp_path, *extra: str):
    seed_everything(0)
    cfg = load_config(None, tiny_overrides(tmp_path, tmp_path) + list(extra))
    return build_student_teacher(cfg)[1].train()


def run(teacher, crops, masks=None):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return teacher(crops[:2], output="train", masks=masks, mask_inputs=False)


def test_twin_gives_the_teacher_s_outputs_bit_for_bit_and_follows_its_updates(tmp_path):
    teacher = teacher_of(tmp_path, *DINOV2)
    twin = LowPrecisionTeacher(teacher, torch.bfloat16)
    crops = random_crops(4, 0)
    for update in range(2):
        expected, got = run(teacher, crops), run(twin.module(), crops)
        assert torch.equal(got.head, expected.head) and torch.equal(got.global_cls, expected.global_cls)
        with torch.no_grad():  # as the EMA: the fp32 teacher changes in place
            for param in teacher.parameters():
                param.mul_(0.9).add_(0.01)
    stale = [low.clone() for low in twin.low]
    twin.module()
    assert not all(torch.equal(a, b) for a, b in zip(stale, twin.low))  # refreshed, not kept


def test_twin_holds_only_the_matmul_weights_and_shares_the_rest(tmp_path):
    teacher = teacher_of(tmp_path, *DINOV2)
    twin = LowPrecisionTeacher(teacher, torch.bfloat16).module()
    own = {name for name, p in twin.named_parameters() if p.dtype == torch.bfloat16}
    assert own and all(name.endswith(("weight", "bias")) for name in own)
    assert "backbone.blocks.0.attn.qkv.weight" in own and "backbone.patch_embed.proj.weight" in own
    originals = dict(teacher.named_parameters())
    for name, param in twin.named_parameters():
        assert (param is originals[name]) == (name not in own), name
    assert all(p.dtype == torch.float32 for p in teacher.parameters())  # what is saved and EMA'd


def test_resnet_twin_updates_the_teacher_s_batch_norm_statistics(tmp_path):
    teacher = teacher_of(tmp_path, "model.arch=resnet50", "model.packed_crops=false")
    twin = LowPrecisionTeacher(teacher, torch.bfloat16)
    before = {k: v.clone() for k, v in teacher.state_dict().items() if "running_mean" in k}
    run(twin.module(), random_crops(4, 1))
    after = teacher.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_twin_only_where_autocast_casts_per_use(tmp_path):
    teacher = teacher_of(tmp_path)
    assert LowPrecisionTeacher.applies(teacher, torch.bfloat16)
    assert not LowPrecisionTeacher.applies(teacher, None)  # fp32: nothing is cast
    teacher.backbone.blocks[0].compile()  # a compiled teacher fuses its casts
    assert not LowPrecisionTeacher.applies(teacher, torch.bfloat16)


def test_bf16_steps_with_the_twin_equal_steps_without_it(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, tmp_path) + ["train.precision=bf16"])
    with_twin, without = make_engine(cfg), make_engine(cfg)
    assert with_twin.forward.low_precision_teacher is not None
    without.forward.low_precision_teacher = None
    for step in range(3):
        for engine in (with_twin, without):
            engine.micro_step(random_crops(4, step), step, 1.0, sync_grads=True)
            engine.finish_step(step, epoch=1)
    for part in ("student", "teacher", "loss_fn"):
        ours, theirs = getattr(with_twin, part).state_dict(), getattr(without, part).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), part
