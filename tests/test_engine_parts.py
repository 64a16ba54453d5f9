"""The pieces of the optimizer step, each alone: forward, step sums, clipping, the optimizer
update, the teacher's EMA, the host-side counters and the trained weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dino_dist.errors import NonFiniteLossError
from dino_dist.training.build import build_objective, build_student_teacher, seed_everything
from dino_dist.training.clipping import clip_gradients
from dino_dist.training.counters import StepCounters
from dino_dist.training.ema import TeacherEMA
from dino_dist.training.forward import DinoForward
from dino_dist.training.schedules import Schedules
from dino_dist.training.step_sums import FIGURES, StepSums
from dino_dist.training.update import OptimizerUpdate
from dino_dist.training.weights import TrainedWeights
from tests.test_engine import random_crops, tiny_cfg

CPU = torch.device("cpu")


def flat_schedules(steps: int = 4, lr: float = 0.1, wd: float = 0.05) -> Schedules:
    full = lambda value: np.full(steps, value)  # noqa: E731
    return Schedules(lr=full(lr), wd=full(wd), momentum=full(0.9), teacher_temp=full(0.04),
                     steps_per_epoch=steps)


def linear_with_grads(seed: int = 0, scale: float = 1.0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(6, 5)
    for p in layer.parameters():
        p.grad = torch.randn_like(p) * scale
    return layer


def test_forward_is_the_loss_of_the_teacher_on_global_crops_and_the_student_on_all(tmp_path):
    cfg = tiny_cfg(tmp_path)
    seed_everything(0)
    student, teacher = build_student_teacher(cfg)
    objective = build_objective(cfg, CPU)
    crops = random_crops(4, 0)
    out = DinoForward(teacher, objective, "fp32", CPU)(student, crops, teacher_temp=0.04)
    teacher_out = teacher(crops[:2]).detach()
    student_out = student(crops)
    expected_targets = torch.softmax((teacher_out - objective.dino_loss.center) / 0.04, dim=-1)
    assert torch.equal(out.targets.cls, expected_targets) and not out.targets.cls.requires_grad
    assert torch.equal(out.student, student_out)
    assert torch.equal(out.loss, objective.dino_loss(student_out, teacher_out, 0.04, len(crops)))
    assert out.loss.requires_grad  # the student's graph is there for the backward


def test_forward_runs_under_the_precision_s_autocast(tmp_path):
    cfg = tiny_cfg(tmp_path)
    student, teacher = build_student_teacher(cfg)
    forward = DinoForward(teacher, build_objective(cfg, CPU), "bf16", CPU)
    crops = random_crops(4, 0)
    out = forward(student, crops, teacher_temp=0.04)
    assert out.student.dtype == torch.bfloat16
    # The teacher runs in bf16 (its outputs are bf16 values) and is upcast for the targets.
    teacher_out = forward.teacher_pass(crops, None).cls
    assert teacher_out.dtype == torch.float32
    assert torch.equal(teacher_out, teacher_out.to(torch.bfloat16).float())
    assert out.loss.dtype == torch.float32  # the loss upcasts: T = 0.04 overflows half precision


def test_step_sums_reduce_to_the_figures_of_every_micro_batch():
    sums = StepSums(out_dim=3, device=CPU)
    first, second = torch.ones(4, 3), torch.full((2, 3), 2.0)
    sums.add(first, torch.tensor(1.5), loss_weight=0.5, skipped_images=1)
    sums.add(second, torch.tensor(float("nan")), loss_weight=0.5)
    teacher_sum, patch_sums, figures = sums.reduce(stop_requested=True)
    assert teacher_sum.tolist() == [8.0, 8.0, 8.0] and patch_sums is None  # iBOT off
    values = dict(zip(FIGURES, figures.tolist()))
    assert values["non_finite"] == 1 and values["count"] == 6
    assert values["skipped_images"] == 1 and values["stop_votes"] == 1
    assert values["loss_sum"] != values["loss_sum"]  # NaN: a non-finite loss is not hidden
    sums.reset()
    assert sums.count == 0 and sums.teacher_sum.abs().sum() == 0


def test_step_sums_carry_the_masked_patch_sums_and_count_for_the_ibot_center():
    sums = StepSums(out_dim=3, device=CPU, patch_dim=2)
    sums.add(torch.ones(4, 3), torch.tensor(1.0), 0.5, teacher_patches=torch.ones(5, 2))
    sums.add(torch.ones(4, 3), torch.tensor(1.0), 0.5, teacher_patches=torch.zeros(0, 2))
    sums.add(torch.ones(4, 3), torch.tensor(1.0), 0.5, teacher_patches=torch.full((1, 2), 3.0))
    teacher_sum, patch_sums, figures = sums.reduce(stop_requested=False)
    assert patch_sums.tolist() == [8.0, 8.0, 6.0]  # the sum of 6 masked tokens, then 6
    assert dict(zip(FIGURES, figures.tolist()))["count"] == 12


@pytest.mark.parametrize("mode", ["per_param", "global"])
def test_clipping_caps_gradient_norms_and_returns_the_norm_before(mode):
    params = list(linear_with_grads(scale=3.0).parameters())
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
    total = clip_gradients(params, 0.01, mode)
    torch.testing.assert_close(total, expected)
    norms = torch.stack([p.grad.norm() for p in params])
    if mode == "per_param":
        assert norms.max() <= 0.01 * (1 + 1e-4)
    else:
        assert norms.norm() == pytest.approx(0.01, rel=1e-3)


def test_clipping_off_leaves_gradients_and_no_gradients_give_zero():
    params = list(linear_with_grads().parameters())
    before = [p.grad.clone() for p in params]
    clip_gradients(params, 0.0)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, params))
    for p in params:
        p.grad = None
    assert clip_gradients(params, 1.0).item() == 0.0


def make_update(layer: nn.Module, precision: str = "fp32", **kwargs) -> OptimizerUpdate:
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.0, fused=True)
    return OptimizerUpdate(optimizer, flat_schedules(), list(layer.parameters()), CPU,
                           precision, **kwargs)


def optimizer_snapshot(update: OptimizerUpdate) -> list[torch.Tensor]:
    moments = [t for state in update.optimizer.state.values() for t in state.values()]
    return [t.detach().clone() for t in [*update.trainable, *moments]]


def test_update_steps_only_when_the_verdict_lets_it():
    layer = linear_with_grads()
    update = make_update(layer)
    update.unscale_and_clip(epoch=0)
    update.step(0, torch.tensor(True))  # creates the moments
    before = optimizer_snapshot(update)
    assert not update.step(1, torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(before, optimizer_snapshot(update)))
    assert update.step(2, torch.tensor(True))
    assert not torch.equal(before[0], layer.weight)
    group = update.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.1, 0.05)  # the schedule's, at that step


def scaled_backward(update: OptimizerUpdate, layer: nn.Linear) -> None:
    layer.zero_grad(set_to_none=True)
    update.scaler.scale(layer(torch.ones(2, 6)).sum()).backward()


def test_fp16_update_skips_a_non_finite_loss_though_the_scaler_sees_finite_gradients():
    layer = linear_with_grads()
    update = make_update(layer, "fp16")
    scaled_backward(update, layer)
    before = optimizer_snapshot(update)
    update.unscale_and_clip(epoch=0)  # finite gradients: the GradScaler would step
    assert not update.step(0, torch.tensor(False))  # the step's loss was not finite
    assert all(torch.equal(a, b) for a, b in zip(before, optimizer_snapshot(update)))
    assert update.scaler.get_scale() == 2.0**16  # no overflow: the scale stays


def test_fp16_update_skips_what_the_scaler_vetoes_and_backs_off():
    layer = linear_with_grads()
    update = make_update(layer, "fp16")
    scaled_backward(update, layer)
    layer.weight.grad[0, 0] = float("inf")
    before = optimizer_snapshot(update)
    update.unscale_and_clip(epoch=0)
    assert not update.step(0, torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(before, optimizer_snapshot(update)))
    assert update.scaler.get_scale() == 2.0**15
    scaled_backward(update, layer)
    update.unscale_and_clip(epoch=0)
    assert update.step(1, torch.tensor(True))  # both agree: the step is applied
    assert not torch.equal(before[0], layer.weight)


def test_update_drops_the_last_layer_gradient_while_it_is_frozen():
    layer = linear_with_grads()
    update = make_update(layer, freeze_last_layer_epochs=1, last_layer_params=[layer.bias])
    update.unscale_and_clip(epoch=0)
    assert layer.bias.grad is None and layer.weight.grad is not None
    layer.bias.grad = torch.ones_like(layer.bias)
    update.unscale_and_clip(epoch=1)
    assert layer.bias.grad is not None


@pytest.mark.parametrize("fused_lerp", [True, False])  # False: a torch without the lerp overload
def test_ema_follows_the_student_only_on_applied_steps(fused_lerp, monkeypatch):
    from dino_dist.training import ema as ema_module
    if fused_lerp and not ema_module._LERP_TAKES_A_TENSOR:
        pytest.skip("this torch has no _foreach_lerp_ with a tensor weight")
    monkeypatch.setattr(ema_module, "_LERP_TAKES_A_TENSOR", fused_lerp)
    torch.manual_seed(0)
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 3)
    ema = TeacherEMA(student, teacher)
    kept = [p.detach().clone() for p in teacher.parameters()]
    ema.update(0.9, torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(kept, teacher.parameters()))
    ema.update(0.9, torch.tensor(True))
    for t0, t1, s in zip(kept, teacher.parameters(), student.parameters()):
        t0, s = t0.double(), s.detach().double()
        # 0.9 is rounded to float32 on the device: compare at the scale of the terms.
        scale = max(t0.abs().max(), s.abs().max())
        assert (t1.double() - (0.9 * t0 + 0.1 * s)).abs().max() <= 1e-6 * scale


def post(counters: StepCounters, loss: float, applied: bool, stop: float = 0.0,
         step: int = 0) -> None:
    figures = torch.tensor([loss, float(loss != loss), 8.0, 1.0, stop])
    counters.post(figures, torch.tensor(applied), step, epoch=0)


def test_counters_read_loss_skips_images_and_stop_votes():
    counters = StepCounters(CPU, world_size=2, max_nonfinite_steps=3)
    post(counters, 3.0, applied=True, stop=1.0)
    assert counters.settle() == (1.5, False)  # the mean over the two ranks
    assert counters.settle() is None  # nothing in flight
    assert counters.take_stop() and not counters.take_stop()  # taken once
    post(counters, float("nan"), applied=False)
    assert counters.state_dict() == {"skipped_steps": 1, "skipped_images": 2}  # settles first


def test_counters_stop_the_run_past_the_bad_step_limit_and_a_good_step_resets():
    counters = StepCounters(CPU, world_size=1, max_nonfinite_steps=1)
    post(counters, float("nan"), applied=False)
    counters.settle()
    post(counters, 2.0, applied=True)
    counters.settle()
    assert counters.bad_streak == 0
    post(counters, 2.0, applied=False, step=7)  # finite loss: the gradients were not
    counters.settle()
    post(counters, 2.0, applied=False, step=8)
    with pytest.raises(NonFiniteLossError, match="2 optimizer steps in a row had non-finite "
                                                 "gradients .the last at step 8, epoch 0"):
        counters.settle()
    assert counters.skipped_steps == 3


def test_counters_load_what_they_saved_and_old_states_without_them():
    counters = StepCounters(CPU, world_size=1)
    counters.load_state_dict({"skipped_steps": 3, "skipped_images": 5})
    assert counters.state_dict() == {"skipped_steps": 3, "skipped_images": 5}
    counters.load_state_dict({})
    assert counters.state_dict() == {"skipped_steps": 0, "skipped_images": 0}


def test_trained_weights_round_trip():
    source = [nn.Linear(3, 2), nn.Linear(3, 2)]
    optimizer = torch.optim.AdamW(source[0].parameters())
    source[0].weight.grad = torch.ones_like(source[0].weight)
    optimizer.step()
    saved = TrainedWeights(*source, optimizer).state_dict()
    assert list(saved) == ["student", "teacher", "optimizer"]
    target = [nn.Linear(3, 2), nn.Linear(3, 2)]
    target_optimizer = torch.optim.AdamW(target[0].parameters())
    TrainedWeights(*target, target_optimizer).load_state_dict(saved)
    for a, b in zip(source, target):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                      b.state_dict().values()))
    assert torch.equal(target_optimizer.state_dict()["state"][0]["exp_avg"],
                       optimizer.state_dict()["state"][0]["exp_avg"])
